# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Tiled decoding: tiles cover the volume, blend weights sum to one, tiled == whole decode within the seam bound,
automatic switching by size, key validation, and one tiled run through the real bundle CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import VQVAE

from meddiff.networks import Pseudo3DUNet
from meddiff.sampling import LatentDiffusionSampler
from meddiff.sampling.tiled_decode import TiledDecoder, auto_tile_size, blend_weights, check_tiling, tile_starts
from meddiff.schedulers import make_sampling_scheduler
from tests.bundles.conftest import CT_BUNDLE


def _autoencoder(levels: int = 2) -> VQVAE:
    torch.manual_seed(0)
    channels = (8, 16)[:levels]
    return VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=channels, num_res_layers=1,
                 num_res_channels=channels, downsample_parameters=[(2, 4, 1, 1)] * levels,
                 upsample_parameters=[(2, 4, 1, 1, 0)] * levels, num_embeddings=16, embedding_dim=4).eval()


def _latents(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("size,tile,overlap", [(11, 6, 2), (64, 27, 8), (32, 32, 8), (7, 3, 0), (20, 9, 8)])
def test_tiles_cover_the_axis_with_at_least_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, size) == size
    for a, b in zip(starts, starts[1:]):
        assert 0 < b - a and a + tile - b >= overlap  # advances, overlaps by >= overlap
    weights = blend_weights(size * 4, [s * 4 for s in starts], tile * 4, overlap * 4)
    total = torch.zeros(size * 4)
    for s, w in zip(starts, weights):
        assert (w >= 0).all() and len(w) == min(tile * 4, size * 4 - s * 4)
        total[s * 4:s * 4 + len(w)] += w
    torch.testing.assert_close(total, torch.ones(size * 4))  # a partition of unity: no weight volume needed


def test_blend_weights_ignore_the_cut_edges_and_not_the_volume_borders():
    w = blend_weights(64, [0, 24], 40, 16)
    assert w[0][0] == 1 and w[1][-1] == 1  # the volume's own borders keep full weight
    assert (w[0][-4:] == 0).all() and (w[1][:4] == 0).all()  # a quarter of the overlap next to a cut is dropped


@pytest.mark.parametrize("levels,latent", [(2, (1, 4, 21, 17, 13)), (1, (2, 4, 23, 19, 17))])
def test_tiled_decode_matches_whole_decode_within_one_percent(levels, latent):
    autoencoder = _autoencoder(levels)
    z = _latents(latent)  # sizes not multiples of the tiles: the last tile of each axis overlaps more
    with torch.no_grad():
        whole = autoencoder.decode_stage_2_outputs(z)
    tiled = TiledDecoder(tile_size=[12, 11, 10], overlap=8, threshold=0)(autoencoder, z)
    assert tiled.shape == whole.shape and tiled.dtype == torch.float32
    assert (tiled - whole).abs().max() <= 0.01 * 2.0  # <= 1 % of the [-1, 1] intensity range
    no_overlap = TiledDecoder(tile_size=[12, 11, 10], overlap=0, threshold=0)(autoencoder, z)
    assert (no_overlap - whole).abs().max() > 0.01 * 2.0  # the overlap is what removes the seams


def test_overlap_beyond_the_receptive_field_is_exact():
    autoencoder = _autoencoder(1)  # receptive field: about 4 latent voxels; weights start a quarter overlap in
    z = _latents((1, 4, 40, 9, 8))
    with torch.no_grad():
        whole = autoencoder.decode_stage_2_outputs(z)
    tiled = TiledDecoder(tile_size=[24, 9, 8], overlap=[16, 0, 0], threshold=0)(autoencoder, z)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_automatic_tile_size_stays_within_the_threshold():
    spatial, scale, overlap = [64, 64, 32], [8, 8, 8], [8, 8, 8]
    tiles = auto_tile_size(spatial, scale, overlap, 1 << 24)
    assert math.prod(t * f for t, f in zip(tiles, scale)) <= 1 << 24
    assert tiles == [27, 36, 32] or tiles == [36, 27, 32]  # 6 tiles, 1.42x the latent voxels
    assert auto_tile_size([32, 32, 32], scale, overlap, 1 << 24) == [32, 32, 32]  # fits: one tile
    autoencoder = _autoencoder(2)
    z = _latents((1, 4, 10, 9, 6))
    decoder = TiledDecoder(tile_size=None, overlap=2, threshold=12 * 4 * 12 * 4 * 12 * 4 // 2)
    with torch.no_grad():
        whole = autoencoder.decode_stage_2_outputs(z)
    assert (decoder(autoencoder, z) - whole).abs().max() <= 0.02


def _sampler(**tiling) -> LatentDiffusionSampler:
    torch.manual_seed(1)
    denoiser = Pseudo3DUNet(3, 4, 4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
                            norm_num_groups=4)
    info = {"scale_factor": 1.5, "latent_shape": [4, 20, 18, 8], "objective": "rflow"}
    return LatentDiffusionSampler(_autoencoder(2), denoiser, make_sampling_scheduler("rflow", 20), latent_info=info,
                                  num_inference_steps=2, progress=False, decode_dtype="bfloat16", **tiling)


def test_sampler_tiles_automatically_above_the_threshold():
    latents = _latents((1, 4, 20, 18, 8)) * 1.5
    voxels = 80 * 72 * 32
    below, at = _sampler(decode_tile_threshold=voxels - 1, decode_tile_size=[12, 11, 8], decode_overlap=[8, 8, 0]), \
        _sampler(decode_tile_threshold=voxels, decode_tile_size=[12, 11, 8], decode_overlap=[8, 8, 0])
    assert below.tiled_decoder.applies(below.autoencoder, latents)
    assert not at.tiled_decoder.applies(at.autoencoder, latents)
    assert not _sampler(decode_tile_threshold=None).tiled_decoder.applies(at.autoencoder, latents)
    tiled, whole = below.decode(latents), at.decode(latents)
    assert tiled.shape == whole.shape == (1, 1, 80, 72, 32)
    assert tiled.min() >= -1 and tiled.max() <= 1
    assert (tiled - whole).abs().max() <= 0.02  # bf16 decode in both; quantized once, over the whole latent


@pytest.mark.parametrize("kwargs,key", [
    ({"tile_size": 4, "overlap": 4}, "decode_tile_size"),
    ({"tile_size": [8, 8], "overlap": 2}, "decode_tile_size"),
    ({"tile_size": 0, "overlap": 0}, "decode_tile_size"),
    ({"tile_size": "big", "overlap": 0}, "decode_tile_size"),
    ({"tile_size": 8, "overlap": -1}, "decode_overlap"),
    ({"tile_size": 8, "overlap": 2, "threshold": -5}, "decode_tile_threshold"),
    ({"tile_size": 8, "overlap": 2, "threshold": "many"}, "decode_tile_threshold"),
    ({"tile_size": None, "overlap": 2, "threshold": 0}, "decode_tile_threshold"),
])
def test_bad_tiling_keys_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        check_tiling(kwargs["tile_size"], kwargs["overlap"], kwargs.get("threshold", 1))
    with pytest.raises(ValueError, match=key):
        _sampler(decode_tile_size=kwargs["tile_size"], decode_overlap=kwargs["overlap"],
                 decode_tile_threshold=kwargs.get("threshold", 1))


def test_threshold_too_small_for_any_tile_names_the_key():
    with pytest.raises(ValueError, match="decode_tile_threshold"):
        auto_tile_size([16, 16, 16], [4, 4, 4], [8, 8, 8], 100)
    assert check_tiling(None, 8, "null") == (None, [8, 8, 8], None)  # the CLI's spelling of "never"


def _sample_ct_demo(out, *extra: str) -> np.ndarray:
    configs = "['configs/common.json','configs/train_autoencoder.json','configs/inference.json'," \
              "'configs/demo_head_ct.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", ".",
           "--num_samples", "1", "--output_dir", str(out), "--progress", "false", *extra]
    proc = subprocess.run(cmd, cwd=CT_BUNDLE, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.asarray(nib.load(next(out.glob("sample_*.nii.gz"))).dataobj).astype(np.float32)


@pytest.mark.slow
def test_bundle_cli_tiled_decode_matches_whole_decode(tmp_path):
    """The shipped CT demo weights (4x VQ-GAN, latent 16^3) with 8 tiles of 12^3 latent voxels vs one decode."""
    whole = _sample_ct_demo(tmp_path / "whole", "--decode_tile_threshold", "None")
    tiled = _sample_ct_demo(tmp_path / "tiled", "--decode_tile_size", "12", "--decode_overlap", "8",
                            "--decode_tile_threshold", "0")
    assert tiled.shape == whole.shape == (64, 64, 64)
    assert 0 < np.abs(tiled - whole).max() <= 0.01 * 2048  # tiled (not bit-identical), within 1 % of [-1024, 1024]
