# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sampling helpers of the inference workflows."""

from __future__ import annotations

from ..data.writers import affine_from_geometry, save_mosaic_png, save_nifti
from .dicom_output import SYNTHETIC_STATEMENT, DicomSeriesOutput
from .latent_sampler import LatentDiffusionSampler, file_sha256, latent_diffusion_inferer, read_latent_info

__all__ = [
    "DicomSeriesOutput",
    "LatentDiffusionSampler",
    "SYNTHETIC_STATEMENT",
    "affine_from_geometry",
    "file_sha256",
    "latent_diffusion_inferer",
    "read_latent_info",
    "save_mosaic_png",
    "save_nifti",
]
