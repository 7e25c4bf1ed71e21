# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/sampling_sizes.py at toy size: every size sampled and scored against real volumes of its size."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE

from meddiff.networks import Pseudo3DUNet
from tests.helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("sampling_sizes")


def _volumes(n: int, size: tuple[int, int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool3d(torch.rand(n, 1, *size, generator=g), 3, stride=1, padding=1)
    return (x - x.amin()) / (x.amax() - x.amin()) * 2 - 1


def test_sizes_bench_toy(bench):
    torch.manual_seed(0)
    autoencoder = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), num_res_layers=1,
                        num_res_channels=(8, 8), downsample_parameters=((2, 4, 1, 1),) * 2,
                        upsample_parameters=((2, 4, 1, 1, 0),) * 2, num_embeddings=16, embedding_dim=4)
    model = Pseudo3DUNet(3, 4, 4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
                         norm_num_groups=4, depth_position=True)
    info = {"scale_factor": 1.0, "latent_shape": [4, 4, 4, 4], "objective": "rflow", "prediction_type": "v_prediction",
            "num_train_timesteps": 20}
    sizes = [(16, 16, 16), (24, 16, 20)]
    references = {size: (_volumes(4, size, 1), _volumes(3, size, 2)) for size in sizes}
    result = bench.run_sizes_bench(autoencoder, model, info, references, seeds=range(4), steps=3,
                                   num_train_timesteps=20, max_shift=1)
    rows = result["rows"]
    assert [r["spatial_size"] for r in rows] == [list(s) for s in sizes]
    assert [r["latent_shape"] for r in rows] == [[4, 4, 4, 4], [4, 6, 4, 5]]
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["voxel_ratio"] == pytest.approx(24 * 20 / (16 * 16))
    for row in rows:
        assert row["evaluations"] == 3 and row["seconds_per_volume"] > 0 and len(row["nn_ncc_per_seed"]) == 4
        assert 0 <= row["real"]["nn_ncc_range"][0] <= row["real"]["nn_ncc_range"][1] <= 1
        assert set(row["inside"]) == {"intensity_mmd", "feature_mmd", "msssim", "nn_ncc"}
    json.dumps(result)  # JSON-ready
    table = bench.format_table(result)
    assert "| 24×16×20 | 4×6×4×5 |" in table and "Band (training size 16×16×16" in table
    with pytest.raises(ValueError, match="multiple of"):  # a size the chain cannot make
        bench.run_sizes_bench(autoencoder, model, info, {(20, 16, 16): references[sizes[0]]}, seeds=range(3),
                              steps=2, num_train_timesteps=20)
