# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/sampling_sizes_crops.py: texture data, latent crops, and the whole --train + sample run at toy size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import load_bench

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "mri_generative_diffusion"


@pytest.fixture(scope="module")
def bench():
    return load_bench("sampling_sizes_crops")


def test_texture_is_stationary_and_seeded(bench):
    a, b = bench.make_texture_volume((32, 32, 16), seed=3), bench.make_texture_volume((32, 32, 16), seed=3)
    assert a.shape == (1, 32, 32, 16) and a.dtype == torch.float32 and torch.equal(a, b)
    assert -1 <= float(a.min()) < float(a.max()) <= 1
    assert not torch.equal(a, bench.make_texture_volume((32, 32, 16), seed=4))
    big = bench.make_texture_volume((64, 64, 16), seed=0)
    quadrants = [big[:, i:i + 32, j:j + 32] for i in (0, 32) for j in (0, 32)]
    means = torch.stack([q.mean() for q in quadrants])
    assert float(means.max() - means.min()) < 0.5 * float(big.std())  # no trend across the field of view
    with pytest.raises(ValueError, match="three positive"):
        bench.make_texture_volume((32, 32), seed=0)


def test_centre_crop_and_latent_crops(bench):
    volumes = torch.arange(2 * 8 * 6 * 4, dtype=torch.float32).reshape(2, 1, 8, 6, 4)
    crop = bench.centre_crop(volumes, (4, 2, 4))
    assert torch.equal(crop, volumes[:, :, 2:6, 2:4, :])
    with pytest.raises(ValueError, match="larger than the volumes"):
        bench.centre_crop(volumes, (10, 2, 4))
    latents = [torch.randn(4, 8, 8, 4) for _ in range(2)]
    crops = bench.LatentCrops(latents, (4, 4, 4), crops_per_latent=5)
    assert len(crops) == 10
    torch.manual_seed(0)
    items = [crops[0]["image"] for _ in range(6)]
    assert all(item.shape == (4, 4, 4, 4) for item in items)
    assert len({tuple(item.flatten()[:3].tolist()) for item in items}) > 1  # fresh offsets per draw
    with pytest.raises(ValueError, match="larger than a latent"):
        bench.LatentCrops(latents, (16, 4, 4))


def test_texture_statistics(bench):
    real = torch.stack([bench.make_texture_volume((64, 64, 32), seed=i) for i in range(3)])
    same = bench.texture_statistics(real, real)
    assert same["std"] == pytest.approx(same["real_std"]) and same["power_ratio"] == pytest.approx([1.0] * 6)
    smooth = torch.nn.functional.avg_pool3d(real, 5, stride=1, padding=2)  # low-pass: less power at high frequency
    ratio = bench.texture_statistics(smooth, real)["power_ratio"]
    assert ratio[-1] < 0.1 < ratio[0] and bench.texture_statistics(smooth, real)["std"] < same["std"]


@pytest.mark.slow
def test_train_and_sample_toy(bench, tmp_path):
    out = tmp_path / "result.json"
    result = bench.main([
        "--bundle", str(BUNDLE), "--weights_dir", str(tmp_path / "weights"), "--train",
        "--volume_size", "64,64,32", "--crop", "32,32,32", "--sizes", "32,32,32", "64,64,32",
        "--num_train", "2", "--num_heldout", "3", "--autoencoder_steps", "2", "--diffusion_steps", "2",
        "--batch_size", "2", "--seeds", "3", "--steps", "2", "--sample_batch_size", "3", "--out", str(out),
        "--markdown", str(tmp_path / "result.md")])
    info = json.loads((tmp_path / "weights" / "model.json").read_text())
    assert info["latent_shape"] == [4, 8, 8, 8] and info["objective"] == "rflow"  # the crop's latent, not the volume's
    saved = json.loads(out.read_text())
    assert [r["spatial_size"] for r in saved["rows"]] == [[32, 32, 32], [64, 64, 32]]
    assert [r["latent_shape"] for r in saved["rows"]] == [[4, 8, 8, 8], [4, 16, 16, 8]]
    assert saved["training"]["diffusion"]["latent_crop"] == [4, 8, 8, 8]
    assert saved["training"]["autoencoder"]["steps"] == 2
    assert all(r["real"]["intensity_mmd"] is not None for r in saved["rows"])
    assert result["rows"][1]["voxel_ratio"] == pytest.approx(4.0)
    table = (tmp_path / "result.md").read_text()
    assert "| 64×64×32 | 4×16×16×8 |" in table and "| 64×64×32 | " in table.split("real-vs-real")[1]
    assert len(saved["rows"][0]["extra"]["power_ratio"]) == len(bench.FREQUENCY_BANDS) - 1
    second = bench.main([  # reuses the trained weights without --train
        "--bundle", str(BUNDLE), "--weights_dir", str(tmp_path / "weights"), "--volume_size", "64,64,32",
        "--crop", "32,32,32", "--sizes", "32,32,32", "--num_train", "2", "--num_heldout", "3", "--seeds", "3",
        "--steps", "2", "--out", str(tmp_path / "again.json")])
    assert second["training"] == saved["training"]
    with pytest.raises(FileNotFoundError, match="--train"):
        bench.main(["--bundle", str(BUNDLE), "--weights_dir", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
