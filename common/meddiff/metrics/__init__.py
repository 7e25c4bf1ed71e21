# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Metrics of a trained generation bundle: reconstruction, diversity, distribution distance, memorization."""

from __future__ import annotations

from .distribution import (
    FeatureExtractor,
    fid_score,
    load_feature_network,
    mmd_score,
    not_computed,
    pooled_intensities,
)
from .diversity import DEFAULT_MSSSIM_WEIGHTS, fit_msssim, pairwise_msssim, random_pairs
from .memorization import (
    AuditResult,
    MemorizationAudit,
    SpaceAudit,
    audit_downsample_factor,
    cosine_similarity_matrix,
    flag_threshold,
    shift_tolerant_ncc,
    to_audit_grid,
)
from .reconstruction import fit_window, reconstruction_metrics, summarize

__all__ = [
    "DEFAULT_MSSSIM_WEIGHTS",
    "AuditResult",
    "FeatureExtractor",
    "MemorizationAudit",
    "SpaceAudit",
    "audit_downsample_factor",
    "cosine_similarity_matrix",
    "fid_score",
    "fit_msssim",
    "fit_window",
    "flag_threshold",
    "load_feature_network",
    "mmd_score",
    "not_computed",
    "pairwise_msssim",
    "pooled_intensities",
    "random_pairs",
    "reconstruction_metrics",
    "shift_tolerant_ncc",
    "summarize",
    "to_audit_grid",
]
