# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/sampling.py at toy size: tiny untrained networks made here, every sampler family, the band, JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE
from torch import nn

from meddiff.networks import Pseudo3DUNet
from tests.helpers import load_bench

T = 20
LATENT = [4, 4, 4, 4]


@pytest.fixture(scope="module")
def bench():
    return load_bench("sampling")


class _Constant(nn.Module):
    """A 'denoiser' that always predicts the same large output: its samples are far from the baseline's."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full_like(x, 3.0)


def _autoencoder() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), num_res_layers=1,
                 num_res_channels=(8, 8), downsample_parameters=((2, 4, 1, 1),) * 2,
                 upsample_parameters=((2, 4, 1, 1, 0),) * 2, num_embeddings=16, embedding_dim=4)


def _denoiser() -> Pseudo3DUNet:
    torch.manual_seed(1)
    return Pseudo3DUNet(3, 4, 4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
                        norm_num_groups=4)


def _volumes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool3d(torch.rand(n, 1, 16, 16, 16, generator=g), 3, stride=1, padding=1)
    return (x - x.amin()) / (x.amax() - x.amin()) * 2 - 1


def _info(objective: str) -> dict:
    # no latent_min/latent_max: an untrained denoiser's x0 estimates would sit on the clip range for every step count
    return {"scale_factor": 1.0, "latent_shape": LATENT, "objective": objective, "prediction_type": "epsilon"}


def test_seed_subsets(bench):
    assert bench.seed_subsets(4, 2) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    drawn = bench.seed_subsets(12, 6, max_subsets=20)
    assert len(drawn) == 20 < math.comb(12, 6) and len(set(drawn)) == 20
    assert all(len(s) == 6 and len(set(s)) == 6 for s in drawn)
    with pytest.raises(ValueError, match="subset_size"):
        bench.seed_subsets(4, 5)


def test_sampling_bench_toy(bench, tmp_path):
    rows = [("ddpm", T), ("ddim", 4), ("ddim", 10), ("dpmpp_2m", 3), ("rflow", 4), ("rflow", 3)]
    denoisers = {"ddpm": (_denoiser(), _info("ddpm")), "rflow": (_Constant(), _info("rflow"))}
    result = bench.run_sampling_bench(_autoencoder(), denoisers, _volumes(5, 1), _volumes(4, 2), seeds=range(4),
                                      rows=rows, reference_steps=10, num_train_timesteps=T, max_shift=1)
    got = {(r["method"], r["steps"]): r for r in result["rows"]}
    assert list(got) == rows
    base = got[("ddpm", T)]
    assert base["time_ratio"] == pytest.approx(1.0) and base["stochastic"] and "ref_error" not in base
    assert [got[r]["evaluations"] for r in rows] == [T, 4, 10, 3, 4, 3]
    # deterministic samplers: the run with the reference's step count is the reference, the shorter one is not
    assert got[("ddim", 10)]["ref_error"] == 0.0
    assert got[("ddim", 10)]["ref_latent_error"] == 0.0 and got[("ddim", 4)]["ref_latent_error"] > 0.0
    assert len(got[("dpmpp_2m", 3)]["ref_error_per_seed"]) == 4
    # band: 5th..95th percentile of the baseline over the C(4, 2) seed pairs; the baseline's median lies inside
    assert result["settings"]["num_subsets"] == 6
    for name, (lo, hi) in result["band"].items():
        assert lo <= base[name] <= hi and len(base["subset_values"][name]) == 6
    assert base["inside_band"]
    # a denoiser that always predicts the same velocity drifts every sample far from the baseline's: outside
    assert not got[("rflow", 4)]["inside_band"] and not got[("rflow", 4)]["inside"]["intensity_mmd"]
    assert -1.0 <= min(result["real"]["nn_ncc"]) <= max(result["real"]["nn_ncc"]) <= 1.0
    # JSON-ready, and the table has every row and verdict
    path = tmp_path / "sampling.json"
    path.write_text(json.dumps(result))
    assert json.loads(path.read_text())["rows"][1]["method"] == "ddim"
    table = bench.format_table(result)
    assert table.count("\n| ") == len(rows) + 1 and "| no (" in table


def test_sampling_bench_needs_baseline_denoiser(bench):
    with pytest.raises(ValueError, match="baseline"):
        bench.run_sampling_bench(_autoencoder(), {"rflow": (_Constant(), _info("rflow"))}, _volumes(3, 1),
                                 _volumes(3, 2), seeds=range(3), rows=[("ddpm", T)], num_train_timesteps=T)
