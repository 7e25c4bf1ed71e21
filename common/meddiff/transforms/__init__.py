# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""MONAI-style transforms shared by the bundles."""

from __future__ import annotations

from .intensity import ScaleFromUnitRange, ScaleFromUnitRanged, scale_from_unit_range
from .label_maps import MASK_AUGMENTATIONS, MaskAugmentation, one_hot_labels
from .nyul import (
    DEFAULT_PERCENTILES,
    NyulLandmarks,
    NyulStandardize,
    NyulStandardized,
    fit_nyul_landmarks,
    image_landmarks,
    learn_nyul_landmarks,
)
from .spacing import SPACING_KEY, ItemSpacingd, check_spacing

__all__ = [
    "DEFAULT_PERCENTILES",
    "ItemSpacingd",
    "MASK_AUGMENTATIONS",
    "MaskAugmentation",
    "NyulLandmarks",
    "NyulStandardize",
    "NyulStandardized",
    "SPACING_KEY",
    "ScaleFromUnitRange",
    "ScaleFromUnitRanged",
    "check_spacing",
    "fit_nyul_landmarks",
    "image_landmarks",
    "learn_nyul_landmarks",
    "one_hot_labels",
    "scale_from_unit_range",
]
