# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Reconstruction and diversity metrics on cases whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric

from meddiff.metrics import (
    DEFAULT_MSSSIM_WEIGHTS,
    fit_msssim,
    fit_window,
    pairwise_msssim,
    random_pairs,
    reconstruction_metrics,
    summarize,
)
from tests.helpers import unit_batch


def test_identical_volumes_give_perfect_scores_and_infinite_psnr():
    x = unit_batch(2, 16) * 500.0 - 500.0  # HU-like units, negative values included
    values = reconstruction_metrics(x, x.clone(), intensity_range=(-1000.0, 0.0))
    assert values["psnr"] == [math.inf, math.inf]
    assert values["ssim"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert values["mae"] == [0.0, 0.0]
    summary = summarize(values["psnr"])
    assert summary == {"mean": math.inf, "sd": None, "n": 2, "num_infinite": 2, "num_nan": 0}


def test_psnr_and_mae_are_in_data_units():
    target = torch.zeros(1, 1, 16, 16, 16)
    recon = torch.full_like(target, 10.0)
    values = reconstruction_metrics(recon, target, intensity_range=(0.0, 100.0))
    assert values["mae"] == pytest.approx([10.0])
    assert values["psnr"] == pytest.approx([20 * math.log10(100.0) - 10 * math.log10(100.0)])  # 20 dB
    assert values["ssim"][0] < 1.0


def test_summary_keeps_infinite_values_apart():
    summary = summarize([30.0, 32.0, math.inf])
    assert summary["mean"] == pytest.approx(31.0) and summary["sd"] == pytest.approx(math.sqrt(2.0))
    assert summary["num_infinite"] == 1 and summary["n"] == 3
    assert summarize([5.0])["sd"] == 0.0
    assert summarize([])["mean"] is None


def test_reconstruction_rejects_bad_inputs():
    x = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="shapes differ"):
        reconstruction_metrics(x, torch.zeros(1, 1, 8, 8, 4), (0.0, 1.0))
    with pytest.raises(ValueError, match="intensity_range"):
        reconstruction_metrics(x, x, (1.0, 1.0))
    assert fit_window(11, (16, 8, 16)) == 7 and fit_window(11, (32, 32, 32)) == 11


@pytest.mark.parametrize("shape, scales", [((16, 16, 16), 2), ((64, 64, 64), 4), ((128, 128, 128), 5),
                                           ((4, 4, 4), 1)])
def test_msssim_settings_fit_monai_for_every_size(shape, scales):
    kernel, weights = fit_msssim(shape, 7, DEFAULT_MSSSIM_WEIGHTS)
    assert len(weights) == scales and sum(weights) == pytest.approx(sum(DEFAULT_MSSSIM_WEIGHTS))
    if max(shape) <= 16:  # small enough to run MONAI's metric here
        x = torch.rand(1, 1, *shape)
        value = MultiScaleSSIMMetric(spatial_dims=3, kernel_size=kernel, weights=weights)(x, x)
        assert float(value) == pytest.approx(1.0, abs=1e-5)


def test_msssim_is_one_for_identical_and_low_for_independent_noise():
    gen = torch.Generator().manual_seed(0)
    noise = [torch.rand(1, 16, 16, 16, generator=gen) for _ in range(3)]
    values, settings = pairwise_msssim([noise[0], noise[0].clone(), noise[1], noise[2]], [(0, 1), (2, 3), (0, 2)])
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert max(values[1:]) < 0.3
    assert settings["kernel_size"] == 7 and len(settings["weights"]) == 2


def test_msssim_rejects_pairs_of_different_shapes():
    with pytest.raises(ValueError, match=r"pair \(0, 1\): shapes differ"):
        pairwise_msssim([torch.rand(1, 16, 16, 16), torch.rand(1, 16, 16, 12)], [(0, 1)])


def test_random_pairs_are_distinct_seeded_and_capped():
    pairs = random_pairs(20, 15, seed=3)
    assert len(pairs) == len(set(pairs)) == 15 and all(i < j for i, j in pairs)
    assert pairs == random_pairs(20, 15, seed=3) != random_pairs(20, 15, seed=4)
    assert random_pairs(4, 100) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert random_pairs(1, 10) == []
    with pytest.raises(ValueError, match="num_pairs"):
        random_pairs(4, -1)
