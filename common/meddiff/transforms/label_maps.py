# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Label maps as ControlNet conditions: one-hot encoding and seeded augmentation (nearest neighbour)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.transforms import Rand3DElastic, RandAffine

from meddiff.data.errors import DataError

__all__ = ["MASK_AUGMENTATIONS", "MaskAugmentation", "one_hot_labels"]

#: accepted ``mask_augmentation`` modes
MASK_AUGMENTATIONS = ("off", "affine", "elastic")


def one_hot_labels(labels: torch.Tensor, num_classes: int, source: str = "label map") -> torch.Tensor:
    """One-hot encode integer label maps.

    Args:
        labels: ``(N, 1, H, W, D)`` (or ``(1, H, W, D)``) with values ``0..num_classes-1``.
        num_classes: number of classes, background included.
        source: where the labels come from (their file), named by the error.

    Returns:
        Float32 ``(N, num_classes, H, W, D)`` (or ``(num_classes, H, W, D)``), a plain tensor (metadata dropped).

    Raises:
        DataError: non-integer values or values outside ``0..num_classes-1`` (naming ``source``).
    """
    values = torch.as_tensor(labels).as_subclass(torch.Tensor).float()  # no MetaTensor: its per-op cost in every layer
    rounded = values.round()
    if not torch.equal(rounded, values):
        raise DataError(source, "non-integer values: is it an image rather than a label map?")
    found = sorted(int(v) for v in torch.unique(rounded).tolist())
    bad = [v for v in found if not 0 <= v < num_classes]
    if bad:
        raise DataError(source, f"label values {bad} are outside 0..{num_classes - 1} "
                                f"(num_label_classes={num_classes}): relabel the map or set num_label_classes.")
    channel_dim = 1 if values.ndim == 5 else 0
    encoded = F.one_hot(rounded.long().squeeze(channel_dim), num_classes)
    return encoded.movedim(-1, channel_dim).float()


class MaskAugmentation:
    """Seeded random deformation of a label map so that generated pairs are not copies of the given masks.

    ``"affine"``: MONAI ``RandAffine`` (rotation up to ``rotate_degrees`` about every axis, scaling by up to
    ``scale_fraction``, translation up to ``translate_fraction`` of each side); ``"elastic"``: the same affine
    and a smooth ``Rand3DElastic`` displacement (``elastic_sigma`` voxels smoothness, ``elastic_magnitude``
    voxels amplitude); ``"off"``: the map unchanged. Resampling is nearest-neighbour, so the output holds only
    values of the input (label values preserved), on the same grid (same shape and affine). The same map and
    seed always give the same output.

    Args:
        mode: ``"off"``, ``"affine"`` or ``"elastic"``.
        rotate_degrees: largest rotation about each axis.
        scale_fraction: largest relative change of size per axis.
        translate_fraction: largest shift per axis as a fraction of the size.
        elastic_sigma: smoothing of the elastic displacement field (voxels).
        elastic_magnitude: amplitude of the elastic displacement (voxels).

    Raises:
        ValueError: an unknown ``mode``.
    """

    def __init__(
        self,
        mode: str = "off",
        rotate_degrees: float = 10.0,
        scale_fraction: float = 0.1,
        translate_fraction: float = 0.05,
        elastic_sigma: float = 6.0,
        elastic_magnitude: float = 3.0,
    ) -> None:
        if mode not in MASK_AUGMENTATIONS:
            raise ValueError(f"mask_augmentation must be one of {list(MASK_AUGMENTATIONS)}, got {mode!r}.")
        self.mode = mode
        self.rotate = math.radians(float(rotate_degrees))
        self.scale = float(scale_fraction)
        self.translate = float(translate_fraction)
        self.sigma = float(elastic_sigma)
        self.magnitude = float(elastic_magnitude)

    def __call__(self, label: torch.Tensor, seed: int) -> torch.Tensor:
        """The augmented label map.

        Args:
            label: ``(1, H, W, D)`` label map (a MONAI ``MetaTensor`` keeps its affine).
            seed: seed of the random deformation.

        Returns:
            The deformed map, same shape, dtype and grid as ``label``.
        """
        if self.mode == "off":
            return label
        size = label.shape[1:]
        translate = [self.translate * s for s in size]
        if self.mode == "affine":
            transform = RandAffine(prob=1.0, rotate_range=[self.rotate] * 3, scale_range=[self.scale] * 3,
                                   translate_range=translate, mode="nearest", padding_mode="zeros")
        else:
            transform = Rand3DElastic(sigma_range=(self.sigma, self.sigma), magnitude_range=(0.0, self.magnitude),
                                      prob=1.0, rotate_range=[self.rotate] * 3, scale_range=[self.scale] * 3,
                                      translate_range=translate, mode="nearest", padding_mode="zeros")
        transform.set_random_state(seed=int(seed) % (2**32))
        values = torch.as_tensor(transform(label.float(), randomize=True)).as_subclass(torch.Tensor)
        result = label.clone()  # the input's grid and metadata (MONAI would record the deformation in the affine)
        result.as_subclass(torch.Tensor).copy_(values.to(label.dtype))
        return result

    def describe(self) -> str:
        """Short text for provenance, e.g. ``"affine"``."""
        return self.mode
