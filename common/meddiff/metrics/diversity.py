# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Diversity as the paper measured it: mean 3D MS-SSIM over random pairs of volumes.

Khader et al. compare the MS-SSIM of random synthetic pairs with that of random real pairs: similar values mean the
samples vary as much as the data; a higher synthetic value means less variety (mode collapse). The metric is MONAI's
``MultiScaleSSIMMetric`` on volumes scaled to [0, 1] (data range 1). MONAI refuses volumes too small for the number
of scales and the window (it requires ``size // (scales - 1) ** 2 > kernel_size - 1`` per axis), so
:func:`fit_msssim` drops the coarsest scales (renormalising the remaining weights) and then shrinks the window until
the volume fits; the settings actually used are returned and recorded.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric
from tqdm import tqdm

__all__ = ["DEFAULT_MSSSIM_WEIGHTS", "fit_msssim", "pairwise_msssim", "random_pairs"]

logger = logging.getLogger(__name__)

#: the five-scale weights of Wang et al. 2003 (MONAI's default)
DEFAULT_MSSSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _fits(spatial_shape: Sequence[int], kernel_size: int, num_scales: int) -> bool:
    div = max(1, num_scales - 1) ** 2
    return all(int(s) // div > kernel_size - 1 for s in spatial_shape)


def fit_msssim(
    spatial_shape: Sequence[int], kernel_size: int = 7, weights: Sequence[float] = DEFAULT_MSSSIM_WEIGHTS
) -> tuple[int, list[float]]:
    """MS-SSIM window and scale weights that MONAI accepts for volumes of ``spatial_shape``.

    Scales are dropped from the coarse end first (the finest scales carry the structure); if a single scale still
    does not fit, the window shrinks to the largest odd size that does.

    Args:
        spatial_shape: volume size per axis.
        kernel_size: requested odd Gaussian window.
        weights: requested per-scale weights, finest first.

    Returns:
        ``(kernel_size, weights)`` to pass to ``MultiScaleSSIMMetric``; weights sum to the requested total.

    Raises:
        ValueError: on an empty weight list, a non-positive window or a volume smaller than 2 voxels on an axis.
    """
    if not weights:
        raise ValueError("weights must not be empty.")
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel_size}.")
    if min(int(s) for s in spatial_shape) < 2:
        raise ValueError(f"volumes of shape {tuple(spatial_shape)} are too small for MS-SSIM.")
    total = float(sum(weights))
    for n in range(len(weights), 0, -1):
        if _fits(spatial_shape, kernel_size, n):
            kept = [float(w) for w in weights[:n]]
            scale = total / sum(kept) if sum(kept) > 0 else 1.0
            fitted = [w * scale for w in kept]
            if n < len(weights):
                logger.info("MS-SSIM: %s voxels fit %d of %d scales with window %d", tuple(spatial_shape), n,
                            len(weights), kernel_size)
            return kernel_size, fitted
    size = min(int(s) for s in spatial_shape)
    window = size if size % 2 == 1 else size - 1
    logger.info("MS-SSIM: %s voxels fit one scale with window %d only", tuple(spatial_shape), window)
    return window, [total]


def random_pairs(num_items: int, num_pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """Distinct unordered index pairs ``(i, j)`` with ``i < j``, drawn without replacement.

    Args:
        num_items: number of volumes.
        num_pairs: pairs wanted; all ``num_items * (num_items - 1) / 2`` pairs if there are no more than that.
        seed: seed of the draw (numpy ``default_rng``).

    Returns:
        The pairs, sorted.

    Raises:
        ValueError: if ``num_pairs`` is negative.
    """
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}.")
    if num_items < 2 or num_pairs == 0:
        return []
    total = num_items * (num_items - 1) // 2
    if num_pairs >= total:
        return list(itertools.combinations(range(num_items), 2))
    rng = np.random.default_rng(seed)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < num_pairs:
        i, j = rng.choice(num_items, size=2, replace=False)
        chosen.add((int(min(i, j)), int(max(i, j))))
    return sorted(chosen)


@torch.no_grad()
def pairwise_msssim(
    get_volume: Callable[[int], torch.Tensor] | Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    kernel_size: int = 7,
    weights: Sequence[float] = DEFAULT_MSSSIM_WEIGHTS,
    data_range: float = 1.0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "MS-SSIM",
) -> tuple[list[float], dict[str, object]]:
    """3D MS-SSIM of each pair of volumes.

    Args:
        get_volume: the volumes, each shape (1, H, W, D) (or (H, W, D)), scaled to ``[0, data_range]``; a
            sequence or a function of the index.
        pairs: index pairs, e.g. from :func:`random_pairs`.
        kernel_size: requested window, adapted by :func:`fit_msssim`.
        weights: requested per-scale weights, adapted by :func:`fit_msssim`.
        data_range: value range of the volumes.
        device: where to compute.
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        ``(values, settings)``: one MS-SSIM per pair and the ``kernel_size``/``weights`` used.

    Raises:
        ValueError: if the two volumes of a pair differ in shape.
    """
    fetch = get_volume if callable(get_volume) else get_volume.__getitem__
    values: list[float] = []
    settings: dict[str, object] = {"kernel_size": int(kernel_size), "weights": [float(w) for w in weights]}
    metric: MultiScaleSSIMMetric | None = None
    for i, j in tqdm(pairs, desc=desc, disable=not progress, dynamic_ncols=True):
        a, b = fetch(i), fetch(j)
        a = a.reshape(1, 1, *a.shape[-3:]).float().to(device)
        b = b.reshape(1, 1, *b.shape[-3:]).float().to(device)
        if a.shape != b.shape:
            raise ValueError(f"MS-SSIM pair ({i}, {j}): shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}.")
        if metric is None:
            window, fitted = fit_msssim(a.shape[2:], kernel_size, weights)
            settings = {"kernel_size": window, "weights": fitted}
            metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=window,
                                          weights=fitted, reduction="none")
        values.append(float(metric(a, b).reshape(-1)[0]))
    return values, settings
