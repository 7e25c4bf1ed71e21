# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""MMD, FID and the feature network on cases whose answer is known."""

from __future__ import annotations

import pytest
import torch
from monai.metrics import MMDMetric
from torch import nn

from meddiff.metrics import (
    FeatureExtractor,
    fid_score,
    load_feature_network,
    mmd_score,
    not_computed,
    pooled_intensities,
)


def test_mmd_measures_the_mean_difference_per_feature():
    gen = torch.Generator().manual_seed(0)
    real = 0.01 * torch.randn(40, 64, generator=gen)
    same = mmd_score(real[:20], real[20:])
    shifted = mmd_score(real, real[:30] + 0.5)
    assert abs(same["value"]) < 1e-3
    assert shifted["value"] == pytest.approx(0.25, rel=0.02)  # (0.5)^2 per feature
    assert shifted["num_real"] == 40 and shifted["num_synthetic"] == 30 and shifted["num_features"] == 64


def test_mmd_equals_monai_for_equal_sizes_and_extends_it_to_unequal_sizes():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen) + 0.3
    expected = float(MMDMetric()(a.double() / 10**0.5, b.double() / 10**0.5))
    assert mmd_score(a, b)["value"] == pytest.approx(expected)
    c = torch.randn(9, 10, generator=gen)
    m, n = 6, 9
    aa, cc, ac = a.double() @ a.double().T / 10, c.double() @ c.double().T / 10, c.double() @ a.double().T / 10
    manual = ((aa.sum() - aa.trace()) / (m * (m - 1)) + (cc.sum() - cc.trace()) / (n * (n - 1))
              - 2 * ac.sum() / (m * n))
    assert mmd_score(a, c)["value"] == pytest.approx(float(manual))


def test_fid_of_identical_and_translated_features():
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    assert fid_score(real, real.clone())["value"] == pytest.approx(0.0, abs=1e-6)
    result = fid_score(real, real + 1.0)  # same covariance, mean moved by 1 in each of 4 dimensions
    assert result["computed"] and result["value"] == pytest.approx(4.0, rel=1e-6)
    assert result["rank_deficient"] is False


def test_too_few_volumes_are_reported_not_faked():
    one = torch.randn(1, 8)
    for result in (fid_score(one, torch.randn(5, 8)), mmd_score(torch.randn(5, 8), one)):
        assert result["computed"] is False and result["value"] is None and "at least two" in result["reason"]
    assert not_computed("why")["reason"] == "why"
    with pytest.raises(ValueError, match="FID needs"):
        fid_score(torch.randn(3, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="MMD needs"):
        mmd_score(torch.randn(3, 8), torch.randn(3, 7))


def test_pooled_intensities_shape():
    assert pooled_intensities(torch.rand(3, 1, 16, 16, 8), [4, 4, 16]).shape == (3, 4 * 4 * 8)
    assert pooled_intensities(torch.rand(1, 16, 16, 16), [16, 16, 16]).shape == (1, 16**3)


class _TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_feature_network_loads_local_weights_and_ignores_heads(tmp_path):
    source = _TinyEncoder()
    path = tmp_path / "features.pt"
    torch.save({"state_dict": {**{f"module.{k}": v for k, v in source.state_dict().items()},
                               "module.conv_seg.weight": torch.zeros(2)}}, path)
    net = load_feature_network(_TinyEncoder(), path)
    assert torch.equal(net.conv.weight, source.conv.weight)
    features = FeatureExtractor(net)(torch.rand(2, 1, 8, 8, 8))
    assert features.shape == (2, 6)  # spatial output pooled


def test_feature_network_rejects_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(6, 1, 5, 5, 5)}, path)
    with pytest.raises(ValueError, match=f"{path}: weights do not fit _TinyEncoder"):
        load_feature_network(_TinyEncoder(), path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_feature_network(_TinyEncoder(), tmp_path / "missing.pt")
