# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Resampling to a voxel spacing, per datalist item when the denoiser is conditioned on spacing."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacing

from meddiff.utils import as_bool

__all__ = ["SPACING_KEY", "ItemSpacingd", "check_spacing"]

#: datalist / batch key of a volume's voxel spacing (mm per axis, after preprocessing)
SPACING_KEY = "spacing"


def check_spacing(spacing: Any, source: str) -> list[float]:
    """Three positive finite spacings in mm.

    Args:
        spacing: the value to check.
        source: what it is (named in the error), e.g. ``"sample_spacing"``.

    Returns:
        The spacing as three floats.

    Raises:
        ValueError: not three positive finite numbers.
    """
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{source} must be three positive voxel spacings in mm (x, y, z), got {spacing!r}.")
    return values


class ItemSpacingd(MapTransform):
    """MONAI's ``Spacingd`` to ``pixdim``, or, with ``condition_on_spacing``, to each item's own spacing.

    Without ``condition_on_spacing`` this is ``Spacingd(keys, pixdim, mode, padding_mode)`` and nothing else.
    With it, an item that has a ``spacing`` key (datalist, mm per axis after ``Orientationd``) is resampled to
    that spacing, any other item to ``pixdim`` (whose non-positive entries keep the volume's own spacing on that
    axis, as in ``Spacingd``); the spacing the volume then has (from its affine) is written to the item's
    ``spacing`` key as a float32 tensor ``(3,)``, which a batch collates to ``(N, 3)`` for the denoiser.

    Args:
        keys: image keys to resample (the spacing is read from the first).
        pixdim: target spacing in mm (non-positive entries: keep the volume's own spacing on that axis).
        mode: interpolation mode.
        padding_mode: padding mode outside the volume.
        condition_on_spacing: resample to each item's ``spacing`` and record the resulting spacing.
        spacing_key: item key of the spacing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] | float,
        mode: str = "bilinear",
        padding_mode: str = "border",
        condition_on_spacing: bool = False,
        spacing_key: str = SPACING_KEY,
    ) -> None:
        super().__init__(keys)
        self.pixdim = pixdim
        self.mode = mode
        self.padding_mode = padding_mode
        self.condition_on_spacing = as_bool(condition_on_spacing, "condition_on_spacing")
        self.spacing_key = spacing_key
        self.default = Spacing(pixdim=pixdim, mode=mode, padding_mode=padding_mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        spacing = self.default
        if self.condition_on_spacing and d.get(self.spacing_key) is not None:
            first = d.get(self.first_key(d))
            name = first.meta.get("filename_or_obj", "an item") if isinstance(first, MetaTensor) else "an item"
            target = check_spacing(d[self.spacing_key], f"the datalist '{self.spacing_key}' of {name}")
            spacing = Spacing(pixdim=target, mode=self.mode, padding_mode=self.padding_mode)
        for key in self.key_iterator(d):
            d[key] = spacing(d[key])
        if self.condition_on_spacing:
            first = d[self.first_key(d)]
            if not isinstance(first, MetaTensor):
                raise ValueError(f"condition_on_spacing needs images with metadata (a MetaTensor) at "
                                 f"'{self.first_key(d)}' to read their spacing.")
            d[self.spacing_key] = torch.as_tensor(first.pixdim, dtype=torch.float32).reshape(-1)[:3].clone()
        return d
