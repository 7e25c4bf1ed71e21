# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Tests for meddiff.transforms.intensity (mapping model outputs back from [-1, 1])."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRanged

from meddiff.transforms import ScaleFromUnitRange, ScaleFromUnitRanged, scale_from_unit_range


@pytest.mark.parametrize("a_min, a_max", [(-1000.0, 1000.0), (0.0, 1.0), (-57.5, 3071.0)])
def test_round_trip_with_monai_forward(a_min: float, a_max: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(a_min, a_max, size=(1, 8, 8, 8)).astype(np.float32)
    fwd = ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=-1.0, b_max=1.0, clip=True)
    unit = fwd({"image": x})["image"]
    assert float(unit.min()) >= -1 and float(unit.max()) <= 1
    back = scale_from_unit_range(unit, a_min, a_max)
    tol = 4 * np.finfo(np.float32).eps * max(abs(a_min), abs(a_max))
    np.testing.assert_allclose(np.asarray(back), x, rtol=0, atol=tol)
    np.testing.assert_allclose(scale_from_unit_range(np.asarray(unit), a_min, a_max), x, rtol=0, atol=tol)


def test_values_clip_and_types() -> None:
    t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    torch.testing.assert_close(scale_from_unit_range(t, 0.0, 10.0), torch.tensor([0.0, 0.0, 5.0, 10.0, 10.0]))
    torch.testing.assert_close(
        scale_from_unit_range(t, 0.0, 10.0, clip=False), torch.tensor([-5.0, 0.0, 5.0, 10.0, 20.0])
    )
    n = scale_from_unit_range(np.array([-1, 0, 1]), -100.0, 100.0)
    assert isinstance(n, np.ndarray) and n.dtype == np.float32
    np.testing.assert_array_equal(n, [-100, 0, 100])
    d64 = scale_from_unit_range(np.array([0.5]), 0.0, 2.0)
    assert d64.dtype == np.float64 and d64[0] == 1.5
    np.testing.assert_array_equal(ScaleFromUnitRange(10.0, 0.0)(np.array([-1.0, 1.0])), [10.0, 0.0])


def test_dict_transform_keeps_metadata() -> None:
    img = MetaTensor(torch.zeros(1, 2, 2, 2), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    d = ScaleFromUnitRanged(["image", "other"], -1000.0, 1000.0, allow_missing_keys=True)({"image": img})
    assert isinstance(d["image"], MetaTensor) and "other" not in d
    torch.testing.assert_close(d["image"].affine, img.affine)
    assert float(d["image"].abs().max()) == 0.0
