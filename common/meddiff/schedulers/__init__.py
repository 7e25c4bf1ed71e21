# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sampling schedulers with MONAI's interface: DPM-Solver++(2M), DDIM with eta, rectified flow; factories."""

from __future__ import annotations

from .dpm_solver import TIMESTEP_SPACINGS, DPMSolverMultistepScheduler, inference_timesteps
from .samplers import (
    OBJECTIVES,
    SAMPLING_METHODS,
    DDIMSampler,
    RFlowSampler,
    check_sampling_method,
    is_stochastic,
    make_sampling_scheduler,
    make_training_scheduler,
)

__all__ = [
    "DDIMSampler",
    "DPMSolverMultistepScheduler",
    "OBJECTIVES",
    "RFlowSampler",
    "SAMPLING_METHODS",
    "TIMESTEP_SPACINGS",
    "check_sampling_method",
    "inference_timesteps",
    "is_stochastic",
    "make_sampling_scheduler",
    "make_training_scheduler",
]
