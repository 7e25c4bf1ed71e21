# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Intensity mapping of model outputs from the network range ``[-1, 1]`` back to image units.

The forward direction is MONAI's ``ScaleIntensityRanged(a_min, a_max, b_min=-1, b_max=1, clip=True)``;
:func:`scale_from_unit_range` with ``out_min=a_min, out_max=a_max`` inverts it for values inside the range.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

__all__ = ["ScaleFromUnitRange", "ScaleFromUnitRanged", "scale_from_unit_range"]


def scale_from_unit_range(x: NdarrayOrTensor, out_min: float, out_max: float, clip: bool = True) -> NdarrayOrTensor:
    """Map ``[-1, 1]`` linearly onto ``[out_min, out_max]``.

    Args:
        x: numpy array or tensor (a ``MetaTensor`` keeps its metadata); integer inputs become float32,
            floating inputs keep their dtype.
        out_min: value that ``-1`` maps to.
        out_max: value that ``1`` maps to (may be below ``out_min`` for a decreasing map).
        clip: clip the result to the output range (equivalently the input to ``[-1, 1]``).

    Returns:
        The mapped values, same type (and device) as ``x``.
    """
    half = (float(out_max) - float(out_min)) / 2.0
    lo, hi = min(out_min, out_max), max(out_min, out_max)
    if isinstance(x, torch.Tensor):
        y = x if x.is_floating_point() else x.to(torch.float32)
        y = (y + 1.0) * half + float(out_min)
        return y.clamp(lo, hi) if clip else y
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    y = ((arr + 1.0) * half + out_min).astype(arr.dtype, copy=False)
    return np.clip(y, lo, hi) if clip else y


class ScaleFromUnitRange(Transform):
    """Array transform wrapping :func:`scale_from_unit_range`.

    Args:
        out_min: value that ``-1`` maps to.
        out_max: value that ``1`` maps to.
        clip: clip the result to the output range.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, out_min: float, out_max: float, clip: bool = True) -> None:
        self.out_min = out_min
        self.out_max = out_max
        self.clip = clip

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Map ``img`` from ``[-1, 1]`` to ``[out_min, out_max]``.

        Args:
            img: numpy array or tensor.

        Returns:
            The mapped image, same type as ``img``.
        """
        return scale_from_unit_range(img, self.out_min, self.out_max, self.clip)


class ScaleFromUnitRanged(MapTransform):
    """Dictionary wrapper of :class:`ScaleFromUnitRange`.

    Args:
        keys: keys of the items to map.
        out_min: value that ``-1`` maps to.
        out_max: value that ``1`` maps to.
        clip: clip the result to the output range.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = ScaleFromUnitRange.backend

    def __init__(
        self, keys: KeysCollection, out_min: float, out_max: float, clip: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleFromUnitRange(out_min, out_max, clip)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Map ``data[key]`` for each key.

        Args:
            data: data dictionary.

        Returns:
            A shallow copy of ``data`` with the items mapped.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d
