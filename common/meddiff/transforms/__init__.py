# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""MONAI-style transforms shared by the bundles."""

from __future__ import annotations

from .intensity import ScaleFromUnitRange, ScaleFromUnitRanged, scale_from_unit_range
from .nyul import (
    DEFAULT_PERCENTILES,
    NyulLandmarks,
    NyulStandardize,
    NyulStandardized,
    fit_nyul_landmarks,
    image_landmarks,
    learn_nyul_landmarks,
)

__all__ = [
    "DEFAULT_PERCENTILES",
    "NyulLandmarks",
    "NyulStandardize",
    "NyulStandardized",
    "ScaleFromUnitRange",
    "ScaleFromUnitRanged",
    "fit_nyul_landmarks",
    "image_landmarks",
    "learn_nyul_landmarks",
    "scale_from_unit_range",
]
