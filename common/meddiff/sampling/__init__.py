# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sampling helpers of the inference workflows."""

from __future__ import annotations

from ..data.writers import affine_from_geometry, save_mosaic_png, save_nifti
from .controlnet_sampler import ControlNetSampler, find_masks, read_controlnet_info
from .dicom_output import SYNTHETIC_STATEMENT, DicomSeriesOutput
from .dicom_seg_output import DicomSegOutput
from .guidance import classifier_free_guidance, resolve_class_labels
from .latent_sampler import (
    LatentDiffusionSampler,
    file_sha256,
    latent_diffusion_inferer,
    read_latent_info,
    trained_setting,
)

__all__ = [
    "ControlNetSampler",
    "DicomSegOutput",
    "DicomSeriesOutput",
    "LatentDiffusionSampler",
    "SYNTHETIC_STATEMENT",
    "affine_from_geometry",
    "classifier_free_guidance",
    "file_sha256",
    "find_masks",
    "latent_diffusion_inferer",
    "read_controlnet_info",
    "read_latent_info",
    "resolve_class_labels",
    "save_mosaic_png",
    "save_nifti",
    "trained_setting",
]
