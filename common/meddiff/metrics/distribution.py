# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Distances between the real and the synthetic distribution: MMD and FID (MONAI's metrics), and their features.

* **MMD** is MONAI's ``MMDMetric``: the unbiased estimate of the squared maximum mean discrepancy with a *linear*
  kernel, i.e. the squared distance between the two sample means with the self-pairs left out. It needs no weights,
  so it is always computed on **pooled intensities**: each volume, scaled to [0, 1], is average-pooled to a small
  grid (``mmd_grid``) and flattened; the vectors are divided by the square root of their length, so the value is a
  mean per-voxel squared difference and does not grow with the grid. With a feature network it is also computed on
  the features. A linear-kernel MMD compares the mean image (anatomy and intensity) of the two sets, not their
  spread: read it together with the diversity metric.
* **FID** is MONAI's ``FIDMetric`` (Fréchet distance of Gaussians fitted to feature vectors). It is only as meaningful
  as the feature network, whose weights must be a local file the user chooses (never downloaded); without one,
  :func:`not_computed` records why. Few volumes (fewer than the feature dimension) make the covariances singular:
  the value is then a rough indication and is flagged in the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric, MMDMetric
from torch import nn

from meddiff.networks.pretrained import load_weights

__all__ = [
    "FeatureExtractor",
    "fid_score",
    "load_feature_network",
    "mmd_score",
    "not_computed",
    "pooled_intensities",
]

logger = logging.getLogger(__name__)


def not_computed(reason: str) -> dict[str, Any]:
    """The record of a metric that could not be computed, with the reason (never a fake value)."""
    logger.warning("not computed: %s", reason)
    return {"computed": False, "value": None, "reason": reason}


def pooled_intensities(volume: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Average-pool volumes to ``grid`` and flatten them.

    Args:
        volume: shape (N, 1, H, W, D) (or (1, H, W, D) for one volume).
        grid: output size per axis; an axis already smaller is kept as it is.

    Returns:
        Shape (N, prod(grid')) float32, ``grid'`` being ``grid`` clipped to the volume size.
    """
    x = volume.float()
    if x.ndim == 4:
        x = x[None]
    size = [min(int(g), int(s)) for g, s in zip(grid, x.shape[2:])]
    return F.adaptive_avg_pool3d(x, size).flatten(1)


def mmd_score(real: torch.Tensor, synthetic: torch.Tensor) -> dict[str, Any]:
    """MONAI ``MMDMetric`` (unbiased, linear kernel) between two sets of vectors, per feature.

    Args:
        real: shape (M, F).
        synthetic: shape (N, F).

    Returns:
        ``{"computed": True, "value": mmd, "num_real", "num_synthetic", "num_features"}``, or a
        :func:`not_computed` record if either set has fewer than two vectors.

    Raises:
        ValueError: if the feature lengths differ.
    """
    if real.ndim != 2 or synthetic.ndim != 2 or real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"MMD needs (M, F) and (N, F) vectors, got {tuple(real.shape)} and {tuple(synthetic.shape)}.")
    if len(real) < 2 or len(synthetic) < 2:
        return not_computed(f"MMD needs at least two real and two synthetic volumes, got {len(real)} and "
                            f"{len(synthetic)}.")
    num_features = real.shape[1]
    value = _unbiased_linear_mmd(real.double() / math.sqrt(num_features), synthetic.double() / math.sqrt(num_features))
    return {"computed": True, "value": value, "num_real": len(real), "num_synthetic": len(synthetic),
            "num_features": int(num_features)}


def _unbiased_linear_mmd(real: torch.Tensor, synthetic: torch.Tensor) -> float:
    """MONAI's ``MMDMetric`` when the sets have equal sizes (it requires that); the same estimator otherwise."""
    if len(real) == len(synthetic):
        return float(MMDMetric()(real, synthetic))
    m, n = len(real), len(synthetic)
    rr, ss, rs = real @ real.T, synthetic @ synthetic.T, synthetic @ real.T
    a = (rr.sum() - rr.diagonal().sum()) / (m * (m - 1))
    b = (ss.sum() - ss.diagonal().sum()) / (n * (n - 1))
    return float(a + b - 2.0 * rs.sum() / (m * n))


def fid_score(real: torch.Tensor, synthetic: torch.Tensor) -> dict[str, Any]:
    """MONAI ``FIDMetric`` between two sets of feature vectors.

    Args:
        real: shape (M, F).
        synthetic: shape (N, F).

    Returns:
        ``{"computed": True, "value": fid, "num_real", "num_synthetic", "num_features", "rank_deficient"}``
        (``rank_deficient``: fewer vectors than features, so the covariances are singular and the value is only
        indicative), or a :func:`not_computed` record if either set has fewer than two vectors.

    Raises:
        ValueError: if the feature lengths differ.
    """
    if real.ndim != 2 or synthetic.ndim != 2 or real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"FID needs (M, F) and (N, F) features, got {tuple(real.shape)} and {tuple(synthetic.shape)}.")
    if len(real) < 2 or len(synthetic) < 2:
        return not_computed(f"FID needs at least two real and two synthetic volumes, got {len(real)} and "
                            f"{len(synthetic)}.")
    value = float(FIDMetric()(synthetic.double(), real.double()))
    return {"computed": True, "value": value, "num_real": len(real), "num_synthetic": len(synthetic),
            "num_features": int(real.shape[1]), "rank_deficient": min(len(real), len(synthetic)) <= real.shape[1]}


def load_feature_network(network: nn.Module, path: str | Path) -> nn.Module:
    """Load feature-extractor weights from a local file, ignoring heads the network does not have.

    Accepts a plain state dict, ``{"state_dict": ...}`` and DDP ``module.`` prefixes (e.g. MedicalNet's
    ``resnet_10_23dataset.pth`` into ``resnet10(..., feed_forward=False, shortcut_type="B",
    bias_downsample=False)``; its segmentation head ``conv_seg`` is ignored).

    Args:
        network: the feature network built from the config.
        path: local weights file.

    Returns:
        ``network`` in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict, or some of the network's parameters are missing from it or have
            another shape.
    """
    state = load_weights(path)
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise ValueError(f"{path}: weights do not fit {type(network).__name__}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"wrong shape {wrong[:5]}{'...' if len(wrong) > 5 else ''}.")
    extra = [k for k in state if k not in own]
    if extra:
        logger.info("%s: ignoring %d entries the feature network lacks (e.g. %s)", path, len(extra), extra[0])
    network.load_state_dict({k: state[k] for k in own})
    return network.eval()


class FeatureExtractor:
    """Feature vectors of 3D volumes from a network, one row per volume.

    Each volume (values in [-1, 1]) is standardised to zero mean and unit variance over all its voxels (as
    MedicalNet's networks expect z-scored input) and passed through the network; outputs with spatial dimensions
    are global-average-pooled, so any 3D encoder works (``resnet10(feed_forward=False)`` gives 512 features).

    Args:
        network: 3D network taking (N, 1, H, W, D).
        device: where to run it.
        standardize: z-score each volume first.
    """

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu", standardize: bool = True) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.standardize = standardize

    @torch.no_grad()
    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        """Features of ``volume`` (N, 1, H, W, D) or (1, H, W, D) as (N, F) float32 on the CPU."""
        x = volume.float().to(self.device)
        if x.ndim == 4:
            x = x[None]
        if self.standardize:
            flat = x.flatten(1)
            mean = flat.mean(1).view(-1, 1, 1, 1, 1)
            std = flat.std(1).clamp_min(1e-6).view(-1, 1, 1, 1, 1)
            x = (x - mean) / std
        out = self.network(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim > 2:
            out = out.flatten(2).mean(2)
        return out.float().cpu()
