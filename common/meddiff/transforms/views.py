# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Two augmented views of one crop, for contrastive (SimCLR-style) pre-training.

Each view gets its own random flips, gamma, intensity scale and shift, Gaussian noise and
(optionally) an in-painted box; the network must map both views of a crop close together and
away from the other crops of the batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy

from meddiff.transforms.restoration import RandPaint

__all__ = ["ContrastiveViewsd"]


class ContrastiveViewsd(RandomizableTransform, MapTransform):
    """Replace ``d[key]`` by a random view of it and add a second, independent view under ``view_key``.

    Inputs are channel-first ``(C, X, Y, Z)`` with intensities in ``[0, 1]``.

    Args:
        keys: the (single) image key.
        view_key: key of the second view.
        flip_prob: probability of flipping each spatial axis.
        gamma_range: range of the random gamma (contrast) change.
        scale_range: the intensity is multiplied by ``1 + U(-scale_range, scale_range)``.
        shift_range: then shifted by ``U(-shift_range, shift_range)``.
        noise_std: maximum standard deviation of the added Gaussian noise.
        cutout_prob: probability of in-painting one to three boxes with noise.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: str = "image",
        view_key: str = "image_2",
        flip_prob: float = 0.5,
        gamma_range: tuple[float, float] = (0.7, 1.5),
        scale_range: float = 0.1,
        shift_range: float = 0.1,
        noise_std: float = 0.05,
        cutout_prob: float = 0.5,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if len(self.keys) != 1:
            raise ValueError(f"keys must name one image, got {self.keys}")
        if not 0 < gamma_range[0] <= gamma_range[1]:
            raise ValueError(f"gamma_range must be positive and increasing, got {gamma_range}")
        self.view_key = view_key
        self.flip_prob = flip_prob
        self.gamma_range = gamma_range
        self.scale_range = scale_range
        self.shift_range = shift_range
        self.noise_std = noise_std
        self.cutout = RandPaint(prob=cutout_prob, inpaint_prob=1.0, max_boxes=3, fill_range=(0.0, 1.0))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ContrastiveViewsd:
        super().set_random_state(seed, state)
        self.cutout.set_random_state(seed=None if seed is None else seed + 1, state=state)
        return self

    def _view(self, src: np.ndarray) -> np.ndarray:
        out = src
        for axis in range(1, src.ndim):
            if self.R.rand() < self.flip_prob:
                out = np.flip(out, axis=axis)
        out = np.clip(out, 0.0, 1.0) ** self.R.uniform(*self.gamma_range)
        out = out * (1.0 + self.R.uniform(-self.scale_range, self.scale_range))
        out = out + self.R.uniform(-self.shift_range, self.shift_range)
        out = out + self.R.normal(0.0, self.R.uniform(0.0, self.noise_std), size=out.shape)
        out = self.cutout(np.ascontiguousarray(out, dtype=np.float32))
        return np.ascontiguousarray(out, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Make the two views.

        Args:
            data: a dict holding the image.

        Returns:
            A copy with the first view under the image key and the second under ``view_key``.
        """
        d = dict(data)
        key = self.keys[0]
        src = convert_to_numpy(d[key], dtype=np.float32)
        d[self.view_key] = convert_to_dst_type(self._view(src), d[key])[0]
        d[key] = convert_to_dst_type(self._view(src), d[key])[0]
        return d
