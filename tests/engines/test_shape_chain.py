# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The shape chain image -> VQ-GAN latent -> denoiser is checked before either stage trains."""

from __future__ import annotations

import pytest

from meddiff.engines import check_shape_chain
from tests.bundles.conftest import MRI_BUNDLE, run_bundle, write_mixed_mri_dataset

PAPER_KNEE = dict(spatial_size=[256, 256, 32], autoencoder_channels=[64, 128, 256], embedding_dim=8,
                  unet_channels=[32, 64, 128, 256], unet_attention_levels=[False, True, True, True],
                  unet_head_channels=32, unet_norm_groups=8)


def test_valid_chains_give_the_latent_shape():
    assert check_shape_chain(**PAPER_KNEE) == [8, 32, 32, 4]
    brain = {**PAPER_KNEE, "spatial_size": [128, 128, 128], "autoencoder_channels": [64, 128]}
    assert check_shape_chain(**brain) == [8, 32, 32, 32]
    lidc = {**PAPER_KNEE, "spatial_size": [128] * 3, "unet_channels": [16, 32, 64, 128], "unet_head_channels": 16}
    assert check_shape_chain(**lidc) == [8, 16, 16, 16]


def test_one_error_names_every_key():
    with pytest.raises(ValueError) as err:
        check_shape_chain(**{**PAPER_KNEE, "spatial_size": [256, 256, 30]})
    assert "spatial_size [256, 256, 30] is not divisible by 8 (3 autoencoder downsamplings" in str(err.value)
    assert "[256, 256, 32]" in str(err.value)  # a suggestion
    with pytest.raises(ValueError, match="in-plane size \\[4, 4\\].*unet_channels of 4 levels"):
        check_shape_chain(**{**PAPER_KNEE, "spatial_size": [32, 32, 32]})
    with pytest.raises(ValueError, match="depth size \\[4\\]"):
        check_shape_chain(**PAPER_KNEE, denoiser_downsamples_depth=True)  # a full-3D denoiser halves depth too
    with pytest.raises(ValueError) as err:
        check_shape_chain(**{**PAPER_KNEE, "unet_channels": [36, 64, 128, 240], "unet_attention_levels": [False, True]})
    message = str(err.value)
    assert "unet_attention_levels has 2 entries" in message and "unet_norm_groups 8" in message
    assert "[240] at attention levels" in message and "unet_head_channels 32" in message


@pytest.mark.parametrize(("stage", "overrides", "keys"), [
    ("train_autoencoder",  # a size the VQ-GAN takes but stage 2's denoiser cannot: caught before stage 1 trains
     {"spatial_size": "[24,24,16]", "unet_channels": "[8,16,32]", "unet_attention_levels": "[False,True,True]"},
     ["unet_channels of 3 levels", "spatial_size", "autoencoder_channels"]),
    ("train_diffusion", {"spatial_size": "[16,16,10]"},
     ["spatial_size [16, 16, 10] is not divisible by 4", "autoencoder_channels"]),
])
def test_bundle_fails_before_training(tmp_path, stage, overrides, keys):
    """Through the real CLI: stage 1 already rejects a size that only stage 2's denoiser cannot take."""
    data = write_mixed_mri_dataset(tmp_path / "data")
    proc = run_bundle(MRI_BUNDLE, stage, {"dataset_dir": str(data), "bundle_root": str(tmp_path / "b"),
                                          "npy_spacing": "[1.2,1.2,2.5]", **overrides}, check=False, timeout=300)
    assert proc.returncode != 0
    for key in keys:
        assert key in proc.stderr + proc.stdout
    assert not (tmp_path / "b" / "models" / "nyul_landmarks.json").exists()  # no data was even standardised
    assert not list((tmp_path / "b").rglob("*.pt"))
