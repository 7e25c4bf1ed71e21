# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Memorization audit: is any synthetic volume a near copy of a training volume?

**Image-space similarity** (:func:`shift_tolerant_ncc`). For a query volume ``q`` and a reference (training) volume
``r`` of the same shape, ``r`` is cropped by ``s`` voxels on each side (its central field of view ``C``) and ``q`` is
read through the same-sized window moved by every translation ``t`` with ``|t_k| <= s_k``; the similarity is

    ``NCC(q, r) = max_t  pearson(q[C + t], r[C])``,

the largest Pearson correlation (normalised cross-correlation, in [-1, 1]) over those integer shifts. It is 1 for a
copy shifted by up to ``s`` voxels and insensitive to a global intensity offset or gain. A constant window
correlates 0 with anything. The search is exhaustive and vectorised: for each shift, one matrix product of all
standardised query windows with all standardised reference crops.

**Feature-space similarity** (:func:`cosine_similarity_matrix`): cosine similarity of feature vectors (the FID
network's, or the autoencoder's latent when there are no FID weights) after subtracting the mean training feature
vector, so that what all volumes share does not make every pair look alike.

**Baseline and flag rule** (:func:`flag_threshold`): real-vs-real nearest-neighbour similarities (each held-out
validation volume to its most similar training volume) describe how close an independent volume of the same
distribution comes to the training set. A synthetic volume is flagged when its nearest-training similarity is
*strictly greater* than the ``percentile``-th percentile (linear interpolation) of that baseline. Flags are
computed in each space; a volume is flagged overall if flagged in one of ``flag_spaces`` (image space only by
default).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = [
    "AuditResult",
    "MemorizationAudit",
    "SpaceAudit",
    "audit_downsample_factor",
    "cosine_similarity_matrix",
    "flag_threshold",
    "shift_tolerant_ncc",
    "to_audit_grid",
]

logger = logging.getLogger(__name__)

_EPS = 1e-6


def audit_downsample_factor(spatial_shape: Sequence[int], max_size: int) -> int:
    """Integer average-pooling factor that brings the largest axis of ``spatial_shape`` to at most ``max_size``.

    Raises:
        ValueError: if ``max_size`` is not positive.
    """
    if max_size < 1:
        raise ValueError(f"audit max size must be positive, got {max_size}.")
    return max(1, -(-max(int(s) for s in spatial_shape) // int(max_size)))


def to_audit_grid(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool (N, 1, H, W, D) or (1, H, W, D) volumes by an integer ``factor`` (1: unchanged), as float32."""
    x = volume.float()
    if x.ndim == 4:
        x = x[None]
    return F.avg_pool3d(x, kernel_size=factor, ceil_mode=True) if factor > 1 else x


def _shifts(max_shift: Sequence[int]) -> list[tuple[int, int, int]]:
    return list(itertools.product(*(range(-s, s + 1) for s in max_shift)))


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Rows of (B, V) to zero mean and unit L2 norm; constant rows become zeros."""
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return x * torch.where(norm > _EPS, 1.0 / norm.clamp_min(_EPS), torch.zeros_like(norm))


def _check_shift(shape: Sequence[int], max_shift: int | Sequence[int]) -> list[int]:
    shift = [int(max_shift)] * 3 if isinstance(max_shift, (int, np.integer)) else [int(s) for s in max_shift]
    if len(shift) != 3 or min(shift) < 0:
        raise ValueError(f"max_shift must be a non-negative int or three of them, got {max_shift!r}.")
    for n, s in zip(shape, shift):
        if n - 2 * s < 2:
            raise ValueError(f"max_shift {shift} leaves fewer than 2 voxels of volumes of shape {tuple(shape)}.")
    return shift


@torch.no_grad()
def shift_tolerant_ncc(
    queries: torch.Tensor,
    references: torch.Tensor,
    max_shift: int | Sequence[int] = 2,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-over-translations normalised cross-correlation of every query with every reference (see module doc).

    Cost: ``(2s+1)^3`` matrix products of size ``N x V`` by ``V x M`` (``V`` voxels of the central crop); memory:
    the standardised central crops of all references, ``M x V`` floats, and one ``N x V`` query window.

    Args:
        queries: shape (N, 1, H, W, D) (synthetic or validation volumes).
        references: shape (M, 1, H, W, D) (training volumes), same spatial shape.
        max_shift: largest translation in voxels, per axis or one for all.
        device: where to compute.
        progress: show a progress bar over the translations.

    Returns:
        ``(similarity, shift)``: (N, M) float32 NCC in [-1, 1] and (N, M, 3) int64 translation of the query window
        at the maximum.

    Raises:
        ValueError: on empty inputs, mismatched shapes or a shift too large for the volumes.
    """
    if queries.ndim != 5 or references.ndim != 5:
        raise ValueError(f"expected (N, 1, H, W, D) volumes, got {tuple(queries.shape)} and {tuple(references.shape)}.")
    if len(queries) == 0 or len(references) == 0:
        raise ValueError(f"need at least one query and one reference, got {len(queries)} and {len(references)}.")
    if queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"query and reference volumes differ in shape: {tuple(queries.shape[1:])} vs "
                         f"{tuple(references.shape[1:])}.")
    shape = queries.shape[2:]
    s = _check_shift(shape, max_shift)
    device = torch.device(device)
    crop = tuple(slice(si, n - si) for si, n in zip(s, shape))
    refs = torch.cat([_standardize(references[i : i + 64, :, crop[0], crop[1], crop[2]].float().to(device).flatten(1))
                      for i in range(0, len(references), 64)])
    q_all = queries.float().to(device)
    shifts = _shifts(s)
    best = torch.full((len(queries), len(references)), -2.0, device=device)
    arg = torch.zeros((len(queries), len(references)), dtype=torch.int64, device=device)
    for k, t in enumerate(tqdm(shifts, desc="NCC over shifts", disable=not progress, dynamic_ncols=True)):
        window = tuple(slice(c.start + ti, c.stop + ti) for c, ti in zip(crop, t))
        q = q_all[:, :, window[0], window[1], window[2]].reshape(len(q_all), -1)
        # the references have zero mean, so the query mean drops out of the dot product (torch.var_mean is slower)
        norm = (q - q.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
        corr = (q @ refs.T) * torch.where(norm > _EPS, 1.0 / norm.clamp_min(_EPS), torch.zeros_like(norm))
        better = corr > best
        best = torch.where(better, corr, best)
        arg[better] = k
    shift = torch.as_tensor(shifts, dtype=torch.int64)[arg.cpu()]
    return best.clamp(-1.0, 1.0).cpu(), shift


def cosine_similarity_matrix(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query vector (N, F) with every reference vector (M, F), as (N, M).

    Raises:
        ValueError: on empty inputs or different feature lengths.
    """
    if queries.ndim != 2 or references.ndim != 2 or queries.shape[1] != references.shape[1]:
        raise ValueError(f"expected (N, F) and (M, F) features, got {tuple(queries.shape)} and "
                         f"{tuple(references.shape)}.")
    if len(queries) == 0 or len(references) == 0:
        raise ValueError(f"need at least one query and one reference, got {len(queries)} and {len(references)}.")
    return F.normalize(queries.double(), dim=1) @ F.normalize(references.double(), dim=1).T


def flag_threshold(baseline: torch.Tensor | Sequence[float], percentile: float) -> float:
    """The ``percentile``-th percentile (linear interpolation) of the real-vs-real similarities.

    Raises:
        ValueError: if the baseline is empty or the percentile is outside [0, 100].
    """
    values = np.asarray(baseline, dtype=np.float64).reshape(-1)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    if values.size == 0:
        raise ValueError("the real-vs-real baseline is empty: the audit needs at least one validation volume "
                         "(set val_fraction > 0).")
    return float(np.percentile(values, percentile))


@dataclass
class SpaceAudit:
    """Nearest-training-neighbour audit in one similarity space.

    Attributes:
        space: ``"image"`` or ``"feature"``.
        similarity: (N,) each synthetic volume's similarity to its nearest training volume.
        nearest: (N,) index of that training volume.
        baseline_similarity: (K,) each validation volume's similarity to its nearest training volume.
        baseline_nearest: (K,) index of that training volume.
        threshold: the baseline percentile above which a synthetic volume is flagged.
        flagged: (N,) bool.
        shift: (N, 3) translation at the maximum (image space only).
    """

    space: str
    similarity: torch.Tensor
    nearest: torch.Tensor
    baseline_similarity: torch.Tensor
    baseline_nearest: torch.Tensor
    threshold: float
    flagged: torch.Tensor
    shift: torch.Tensor | None = None


@dataclass
class AuditResult:
    """Both audits and the overall flag.

    Attributes:
        image: the image-space audit.
        feature: the feature-space audit, if features were given.
        flag_spaces: the spaces whose flags make up :attr:`flagged`.
        settings: the audit's settings, for the record.
    """

    image: SpaceAudit
    feature: SpaceAudit | None = None
    flag_spaces: tuple[str, ...] = ("image",)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> torch.Tensor:
        """(N,) bool: flagged in any of ``flag_spaces`` that was audited."""
        flags = self.image.flagged.clone() if "image" in self.flag_spaces else torch.zeros_like(self.image.flagged)
        if self.feature is not None and "feature" in self.flag_spaces:
            flags |= self.feature.flagged
        return flags


class MemorizationAudit:
    """Nearest-training-neighbour audit of synthetic volumes against a real-vs-real baseline (see module doc).

    Args:
        max_shift: translations searched, in voxels of the audit grid, per axis or one for all.
        percentile: baseline percentile of the flag rule, in [0, 100].
        flag_spaces: spaces whose flags make a volume flagged overall: ``"image"`` (default) and/or ``"feature"``.
            Feature-space flags are always computed and reported; count them only with features that mean
            something (a pretrained network), not with an untrained or barely trained autoencoder's latents.
        device: where to compute.
        progress: show progress bars.

    Raises:
        ValueError: if ``percentile`` is outside [0, 100] or ``flag_spaces`` is empty or names another space.
    """

    def __init__(
        self,
        max_shift: int | Sequence[int] = 2,
        percentile: float = 95.0,
        flag_spaces: Sequence[str] = ("image",),
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> None:
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
        spaces = tuple(str(f) for f in ([flag_spaces] if isinstance(flag_spaces, str) else flag_spaces))
        if not spaces or not set(spaces) <= {"image", "feature"}:
            raise ValueError(f"flag_spaces must name 'image' and/or 'feature', got {flag_spaces!r}.")
        self.flag_spaces = spaces
        self.max_shift = max_shift
        self.percentile = float(percentile)
        self.device = device
        self.progress = progress

    def _space(self, space: str, syn: torch.Tensor, base: torch.Tensor, shift: torch.Tensor | None) -> SpaceAudit:
        """Nearest neighbours from (N, M) and (K, M) similarity matrices, and the flags."""
        sim, idx = syn.max(dim=1)
        bsim, bidx = base.max(dim=1)
        threshold = flag_threshold(bsim, self.percentile)
        return SpaceAudit(space=space, similarity=sim.float(), nearest=idx, baseline_similarity=bsim.float(),
                          baseline_nearest=bidx, threshold=threshold, flagged=sim.double() > threshold,
                          shift=None if shift is None else shift[torch.arange(len(idx)), idx])

    def __call__(
        self,
        synthetic: torch.Tensor,
        validation: torch.Tensor,
        training: torch.Tensor,
        synthetic_features: torch.Tensor | None = None,
        validation_features: torch.Tensor | None = None,
        training_features: torch.Tensor | None = None,
    ) -> AuditResult:
        """Audit ``synthetic`` against ``training`` with the ``validation`` baseline.

        Args:
            synthetic: (N, 1, H, W, D) synthetic volumes on the audit grid.
            validation: (K, 1, H, W, D) held-out real volumes, K >= 1.
            training: (M, 1, H, W, D) training volumes.
            synthetic_features: optional (N, F) features for the feature-space audit.
            validation_features: (K, F), required with ``synthetic_features``.
            training_features: (M, F), required with ``synthetic_features``.

        Returns:
            The :class:`AuditResult`.

        Raises:
            ValueError: on an empty validation set, mismatched shapes, or only some of the feature sets.
        """
        if len(validation) == 0:
            raise ValueError("the memorization audit needs at least one validation volume for the real-vs-real "
                             "baseline (set val_fraction > 0).")
        sim, shift = shift_tolerant_ncc(torch.cat([synthetic, validation]), training, max_shift=self.max_shift,
                                        device=self.device, progress=self.progress)
        n = len(synthetic)
        image = self._space("image", sim[:n], sim[n:], shift[:n])
        feats = (synthetic_features, validation_features, training_features)
        feature = None
        if any(f is not None for f in feats):
            if any(f is None for f in feats):
                raise ValueError("the feature-space audit needs synthetic, validation and training features.")
            centre = training_features.double().mean(0, keepdim=True)
            train_c = training_features.double() - centre
            feature = self._space("feature", cosine_similarity_matrix(synthetic_features.double() - centre, train_c),
                                  cosine_similarity_matrix(validation_features.double() - centre, train_c), None)
        settings = {"max_shift": _check_shift(synthetic.shape[2:], self.max_shift), "percentile": self.percentile,
                    "flag_spaces": list(self.flag_spaces)}
        return AuditResult(image=image, feature=feature, flag_spaces=self.flag_spaces, settings=settings)
