# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Reconstruction fidelity of the autoencoder in the data's own units (Nyul scale for MRI, HU for CT).

All three metrics wrap MONAI's: ``PSNRMetric`` (peak = the width of ``intensity_range``), ``SSIMMetric`` (3D
Gaussian window, data range = the width of ``intensity_range``, computed on intensities shifted so that the lower
end of the range is 0, which makes the luminance term well defined for negative units such as HU) and
``MAEMetric``. Identical volumes give an infinite PSNR, which is kept as ``inf`` per volume and counted apart in
:func:`summarize` rather than poisoning the mean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric

__all__ = ["fit_window", "reconstruction_metrics", "summarize"]

logger = logging.getLogger(__name__)


def fit_window(kernel_size: int, spatial_shape: Sequence[int]) -> int:
    """Largest odd window no larger than ``kernel_size`` that fits every axis of ``spatial_shape``.

    Args:
        kernel_size: requested window (positive).
        spatial_shape: image size per axis.

    Returns:
        The window size actually usable (at least 1).

    Raises:
        ValueError: if ``kernel_size`` is not positive.
    """
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel_size}.")
    size = min(int(kernel_size), *(int(s) for s in spatial_shape))
    return size if size % 2 == 1 else max(size - 1, 1)


def _check_pair(reconstruction: torch.Tensor, target: torch.Tensor) -> None:
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction and target shapes differ: {tuple(reconstruction.shape)} vs {tuple(target.shape)}."
        )
    if reconstruction.ndim != 5:
        raise ValueError(f"expected (N, C, H, W, D) volumes, got shape {tuple(reconstruction.shape)}.")


@torch.no_grad()
def reconstruction_metrics(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    intensity_range: Sequence[float],
    ssim_kernel_size: int = 11,
) -> dict[str, list[float]]:
    """Per-volume PSNR (dB), SSIM and MAE of volumes given in data units.

    Args:
        reconstruction: autoencoder outputs, shape (N, C, H, W, D), in data units.
        target: the inputs, same shape and units.
        intensity_range: ``(low, high)`` of the data units (the range that [-1, 1] maps to); its width is the
            PSNR peak and the SSIM data range, and ``low`` is subtracted before SSIM.
        ssim_kernel_size: SSIM Gaussian window (shrunk to fit small volumes, see :func:`fit_window`).

    Returns:
        ``{"psnr": [...], "ssim": [...], "mae": [...]}`` with one float per volume; PSNR is ``inf`` for an
        exact reconstruction.

    Raises:
        ValueError: on mismatched or non-5D shapes, or an empty intensity range.
    """
    _check_pair(reconstruction, target)
    low, high = (float(v) for v in intensity_range)
    span = abs(high - low)
    if not span > 0:
        raise ValueError(f"intensity_range must have two different values, got {list(intensity_range)}.")
    y_pred, y = reconstruction.float(), target.float()
    window = fit_window(ssim_kernel_size, y.shape[2:])
    psnr = PSNRMetric(max_val=span, reduction="none")(y_pred, y)
    mae = MAEMetric(reduction="none")(y_pred, y)
    ssim = SSIMMetric(spatial_dims=3, data_range=span, win_size=window, reduction="none")(
        y_pred - min(low, high), y - min(low, high)
    )
    return {
        "psnr": [float(v) for v in psnr.reshape(len(y), -1).mean(1)],
        "ssim": [float(v) for v in ssim.reshape(len(y), -1).mean(1)],
        "mae": [float(v) for v in mae.reshape(len(y), -1).mean(1)],
    }


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation of the finite values, with the counts of the others.

    Args:
        values: per-volume values; ``inf`` (e.g. PSNR of an exact copy) and NaN are counted, not averaged.

    Returns:
        ``{"mean", "sd", "n", "num_infinite", "num_nan"}``; ``mean``/``sd`` are ``None`` without finite values,
        except that ``mean`` is ``inf`` when every value is ``+inf``; ``sd`` is 0 for a single finite value.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    num_inf = int(np.isinf(arr).sum())
    num_nan = int(np.isnan(arr).sum())
    if finite.size:
        mean: float | None = float(finite.mean())
        sd: float | None = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    else:
        mean = math.inf if arr.size and num_inf == arr.size and bool(np.all(arr > 0)) else None
        sd = None
    return {"mean": mean, "sd": sd, "n": int(arr.size), "num_infinite": num_inf, "num_nan": num_nan}
