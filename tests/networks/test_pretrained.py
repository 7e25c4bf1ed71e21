# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Weights load into config-built networks, including checkpoints in the MONAI Generative (pre-1.4) layout."""

from __future__ import annotations

import re

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from meddiff.networks import load_pretrained


def _to_generative_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename current MONAI keys to the names the monai-generative package used."""
    old = {}
    for key, value in state.items():
        key = re.sub(r"\.attn\.(to_[qkv])\.", r".\1.", key)
        key = key.replace(".attn.out_proj.", ".proj_attn.")
        key = key.replace("postconv", "conv")
        old[key] = value
    return old


def _unet() -> DiffusionModelUNet:
    return DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 16), attention_levels=(False, True),
                              num_res_blocks=1, num_head_channels=8, norm_num_groups=8)


def _autoencoder() -> AutoencoderKL:
    return AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), latent_channels=2,
                         num_res_blocks=1, norm_num_groups=8, attention_levels=(False, True))


@pytest.mark.parametrize("make", [_unet, _autoencoder])
def test_generative_layout_checkpoint_loads(tmp_path, make):
    torch.manual_seed(0)
    trained = make().eval()
    old = _to_generative_layout(trained.state_dict())
    assert set(old) != set(trained.state_dict()), "the renaming must actually produce the old layout"
    path = tmp_path / "old.pt"
    torch.save(old, path)
    torch.manual_seed(1)
    fresh = load_pretrained(make(), path).eval()
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(1, 2 if make is _unet else 1, 8, 8, 8)
    with torch.no_grad():
        if make is _unet:
            t = torch.tensor([5])
            assert torch.equal(fresh(x, t), trained(x, t))
        else:
            assert torch.equal(fresh.reconstruct(x), trained.reconstruct(x))


def test_current_layout_and_ddp_prefix(tmp_path):
    trained = _unet()
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "w.pt")
    fresh = load_pretrained(_unet(), tmp_path / "w.pt")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pretrained(_unet(), tmp_path / "missing.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        load_pretrained(_unet(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        load_pretrained(torch.nn.Linear(3, 3), tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_pretrained(_unet(), tmp_path / "junk.pt")
