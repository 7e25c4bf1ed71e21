# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Corruptions for self-supervised restoration pre-training (the Models Genesis pretext).

A network is trained to undo, in one pass, a random mix of: a non-linear intensity remapping
(a random cubic Bezier curve, sometimes inverted), local voxel shuffling inside many small blocks,
and in-painting (boxes replaced by noise) or out-painting (everything but a few boxes replaced by
noise). Restoring them needs texture, shape and context, so the whole encoder-decoder learns
features useful for segmentation (Zhou et al., Models Genesis, MedIA 2021).

All transforms are MONAI ``RandomizableTransform``s: their draws come from ``self.R``, so
``set_random_state(seed)`` (or a MONAI ``DataLoader`` under ``set_determinism``) makes them
reproducible. Inputs are channel-first ``(C, X, Y, Z)`` arrays or tensors with intensities scaled to
``[0, 1]`` (values outside are clipped by the remapping); a ``MetaTensor`` keeps its metadata.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy

__all__ = [
    "RandBezierRemap",
    "RandBezierRemapd",
    "RandLocalShuffle",
    "RandLocalShuffled",
    "RandPaint",
    "RandPaintd",
    "RestorationCorruptiond",
    "bezier_curve",
]


def bezier_curve(p1: Sequence[float], p2: Sequence[float], num_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Points of the cubic Bezier curve from ``(0, 0)`` to ``(1, 1)`` with inner control points ``p1``, ``p2``.

    Args:
        p1: first inner control point ``(x, y)``.
        p2: second inner control point ``(x, y)``.
        num_points: number of samples along the curve.

    Returns:
        ``(x, y)`` arrays of the samples, ordered by ``x`` so they can be used with ``numpy.interp``.
    """
    t = np.linspace(0.0, 1.0, num_points)
    c = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3], axis=1)
    points = np.array([[0.0, 0.0], list(p1), list(p2), [1.0, 1.0]])
    xy = c @ points
    order = np.argsort(xy[:, 0], kind="stable")
    return xy[order, 0], xy[order, 1]


def _box(rng: np.random.RandomState, spatial: Sequence[int], lo: float, hi: float) -> tuple[slice, ...]:
    """A random box whose edge along each axis is a fraction in ``[lo, hi]`` of that axis."""
    slices = []
    for n in spatial:
        size = int(np.clip(round(rng.uniform(lo, hi) * n), 1, n))
        start = rng.randint(0, n - size + 1)
        slices.append(slice(start, start + size))
    return tuple(slices)


class RandBezierRemap(RandomizableTransform):
    """Remap intensities in ``[0, 1]`` through a random cubic Bezier curve (optionally inverted).

    Args:
        prob: probability of remapping.
        invert_prob: probability that the curve is flipped (``y -> 1 - y``), inverting the contrast.
        num_points: samples of the curve used for interpolation.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, prob: float = 0.9, invert_prob: float = 0.5, num_points: int = 1000) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= invert_prob <= 1.0:
            raise ValueError(f"invert_prob must be in [0, 1], got {invert_prob}")
        self.invert_prob = invert_prob
        self.num_points = num_points
        self._controls = np.zeros((2, 2))
        self._invert = False

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply, the two control points and the inversion."""
        super().randomize(None)
        if not self._do_transform:
            return
        self._controls = self.R.uniform(0.0, 1.0, size=(2, 2))
        self._invert = bool(self.R.rand() < self.invert_prob)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Apply to ``img`` (any shape, values expected in ``[0, 1]``).

        Args:
            img: the image.
            randomize: draw new parameters first.

        Returns:
            The remapped image, same type, shape and metadata.
        """
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        xs, ys = bezier_curve(self._controls[0], self._controls[1], self.num_points)
        if self._invert:
            ys = 1.0 - ys
        arr = convert_to_numpy(img, dtype=np.float32)
        out = np.interp(np.clip(arr, 0.0, 1.0), xs, ys).astype(np.float32)
        return convert_to_dst_type(out, img)[0]


class RandLocalShuffle(RandomizableTransform):
    """Shuffle the voxels inside many small random blocks (each block separately, all channels alike).

    Blocks are shuffled one after the other in place, so overlapping blocks only move values around: the
    image's histogram is unchanged.

    Args:
        prob: probability of shuffling.
        coverage: expected fraction of voxels inside a shuffled block (blocks may overlap).
        max_block_fraction: largest block edge along each axis, as a fraction of that axis (at least 1 voxel).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, prob: float = 0.5, coverage: float = 0.5, max_block_fraction: float = 0.1) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 < coverage <= 4.0:
            raise ValueError(f"coverage must be in (0, 4], got {coverage}")
        if not 0.0 < max_block_fraction <= 1.0:
            raise ValueError(f"max_block_fraction must be in (0, 1], got {max_block_fraction}")
        self.coverage = coverage
        self.max_block_fraction = max_block_fraction

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Apply to a channel-first ``img`` ``(C, *spatial)``.

        Args:
            img: the image.
            randomize: draw whether to apply first.

        Returns:
            The shuffled image, same type, shape and metadata.
        """
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        src = convert_to_numpy(img)
        out = src.copy()
        spatial = src.shape[1:]
        max_edge = [max(1, int(n * self.max_block_fraction)) for n in spatial]
        mean_volume = float(np.prod([(m + 1) / 2 for m in max_edge]))
        num_blocks = int(round(self.coverage * np.prod(spatial) / mean_volume))
        sizes = np.stack([self.R.randint(1, m + 1, size=num_blocks) for m in max_edge], axis=1)
        starts = (self.R.random_sample(sizes.shape) * (np.asarray(spatial) - sizes + 1)).astype(int)
        for size, start in zip(sizes.tolist(), starts.tolist()):
            count = size[0] * size[1] * size[2] if len(size) == 3 else int(np.prod(size))
            if count < 2:
                continue
            window = (slice(None), *(slice(a, a + s) for a, s in zip(start, size)))
            block = out[window].reshape(src.shape[0], count)  # shuffle in place: values are only moved
            out[window] = block[:, self.R.permutation(count)].reshape(out[window].shape)
        return convert_to_dst_type(out, img)[0]


class RandPaint(RandomizableTransform):
    """In-painting (a few boxes replaced by uniform noise) or out-painting (all but a few boxes replaced).

    Args:
        prob: probability of painting.
        inpaint_prob: given painting, probability of in-painting rather than out-painting.
        max_boxes: at most this many boxes (at least one).
        inpaint_size: range of in-painted box edges, as fractions of each axis.
        outpaint_size: range of kept box edges for out-painting, as fractions of each axis.
        fill_range: ``(low, high)`` of the uniform noise; ``None``: the image's own min and max.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = 0.9,
        inpaint_prob: float = 0.2,
        max_boxes: int = 5,
        inpaint_size: tuple[float, float] = (1 / 6, 1 / 3),
        outpaint_size: tuple[float, float] = (3 / 7, 4 / 7),
        fill_range: tuple[float, float] | None = None,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        for name, (lo, hi) in (("inpaint_size", inpaint_size), ("outpaint_size", outpaint_size)):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        self.inpaint_prob = inpaint_prob
        self.max_boxes = max_boxes
        self.inpaint_size = inpaint_size
        self.outpaint_size = outpaint_size
        self.fill_range = fill_range

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Apply to a channel-first ``img`` ``(C, *spatial)``.

        Args:
            img: the image.
            randomize: draw whether to apply first.

        Returns:
            The painted image, same type, shape and metadata.
        """
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        src = convert_to_numpy(img)
        lo, hi = self.fill_range if self.fill_range is not None else (float(src.min()), float(src.max()))
        spatial = src.shape[1:]
        inpaint = self.R.rand() < self.inpaint_prob
        num_boxes = self.R.randint(1, self.max_boxes + 1)
        if inpaint:
            out = src.copy()
            for _ in range(num_boxes):
                box = (slice(None), *_box(self.R, spatial, *self.inpaint_size))
                out[box] = self.R.uniform(lo, hi, size=out[box].shape)
        else:
            out = self.R.uniform(lo, hi, size=src.shape).astype(src.dtype)
            for _ in range(num_boxes):
                box = (slice(None), *_box(self.R, spatial, *self.outpaint_size))
                out[box] = src[box]
        return convert_to_dst_type(out.astype(src.dtype, copy=False), img)[0]


class _RandDict(RandomizableTransform, MapTransform):
    """Dictionary wrapper: one draw per call, the same corruption for every key."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection, transform: RandomizableTransform, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _RandDict:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.transform.randomize(None)
        state = self.transform.R.get_state()
        for key in keys:  # each key sees the same draws
            self.transform.R.set_state(state)
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandBezierRemapd(_RandDict):
    """Dictionary version of :class:`RandBezierRemap`.

    Args:
        keys: keys of the images.
        prob: probability of remapping.
        invert_prob: probability of inverting the curve.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.9, invert_prob: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, RandBezierRemap(prob=prob, invert_prob=invert_prob), allow_missing_keys)


class RandLocalShuffled(_RandDict):
    """Dictionary version of :class:`RandLocalShuffle` (the same blocks and permutations for every key).

    Args:
        keys: keys of the images.
        prob: probability of shuffling.
        coverage: expected fraction of shuffled voxels.
        max_block_fraction: largest block edge as a fraction of each axis.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.5, coverage: float = 0.5,
                 max_block_fraction: float = 0.1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, RandLocalShuffle(prob=prob, coverage=coverage, max_block_fraction=max_block_fraction),
                         allow_missing_keys)


class RandPaintd(_RandDict):
    """Dictionary version of :class:`RandPaint` (same boxes for every key).

    Args:
        keys: keys of the images.
        prob: probability of painting.
        inpaint_prob: probability of in-painting rather than out-painting.
        fill_range: range of the noise, or ``None`` for each image's own range.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.9, inpaint_prob: float = 0.2,
                 fill_range: tuple[float, float] | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, RandPaint(prob=prob, inpaint_prob=inpaint_prob, fill_range=fill_range),
                         allow_missing_keys)


class RestorationCorruptiond(RandomizableTransform, MapTransform):
    """Keep the clean image as the restoration target and corrupt the input (Models Genesis order).

    ``d[target_key] = d[key]`` (a copy), then ``d[key]`` goes through :class:`RandLocalShuffle`,
    :class:`RandBezierRemap` and :class:`RandPaint`, each applied with its own probability.

    Args:
        keys: the (single) image key.
        target_key: key for the clean copy.
        remap_prob: probability of the intensity remapping.
        invert_prob: probability that a remapping inverts the contrast.
        shuffle_prob: probability of local shuffling.
        shuffle_coverage: expected fraction of shuffled voxels.
        shuffle_block_fraction: largest shuffled block edge as a fraction of each axis.
        paint_prob: probability of in- or out-painting.
        inpaint_prob: given painting, probability of in-painting (else out-painting).
        fill_range: range of the painting noise (default ``(0, 1)``, the scaled intensity range).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection = "image",
        target_key: str = "target",
        remap_prob: float = 0.9,
        invert_prob: float = 0.5,
        shuffle_prob: float = 0.5,
        shuffle_coverage: float = 0.5,
        shuffle_block_fraction: float = 0.1,
        paint_prob: float = 0.9,
        inpaint_prob: float = 0.2,
        fill_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if len(self.keys) != 1:
            raise ValueError(f"keys must name one image, got {self.keys}")
        self.target_key = target_key
        self.corruptions: list[RandomizableTransform] = [
            RandLocalShuffle(prob=shuffle_prob, coverage=shuffle_coverage, max_block_fraction=shuffle_block_fraction),
            RandBezierRemap(prob=remap_prob, invert_prob=invert_prob),
            RandPaint(prob=paint_prob, inpaint_prob=inpaint_prob, fill_range=fill_range),
        ]

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RestorationCorruptiond:
        super().set_random_state(seed, state)
        for i, t in enumerate(self.corruptions):
            t.set_random_state(seed=None if seed is None else seed + i + 1, state=state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Corrupt ``d[key]`` and store the clean copy under ``target_key``.

        Args:
            data: a dict holding the image.

        Returns:
            A copy with the corrupted image and the target.
        """
        d = dict(data)
        key = self.keys[0]
        img = d[key]
        d[self.target_key] = img.clone() if hasattr(img, "clone") else np.array(img, copy=True)
        for t in self.corruptions:
            img = t(img)
        d[key] = img
        return d
