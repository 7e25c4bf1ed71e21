# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Diffusion targets as MONAI ``DiffusionPrepareBatch`` variants: epsilon, x0 (``sample``) or v."""

from __future__ import annotations

import torch
from monai.engines.utils import DiffusionPrepareBatch, VPredictionPrepareBatch
from torch import nn

__all__ = ["X0PredictionPrepareBatch", "diffusion_prepare_batch"]


class X0PredictionPrepareBatch(DiffusionPrepareBatch):
    """Target is the clean input (``prediction_type="sample"``, the paper's configured objective)."""

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return images


def diffusion_prepare_batch(prediction_type: str, num_train_timesteps: int, scheduler: nn.Module) -> DiffusionPrepareBatch:
    """The ``DiffusionPrepareBatch`` whose target matches a MONAI scheduler's ``prediction_type``.

    Args:
        prediction_type: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"``.
        num_train_timesteps: training timesteps (random timesteps are drawn below this).
        scheduler: the training scheduler (needed for v targets; its prediction_type must agree).

    Raises:
        ValueError: unknown ``prediction_type`` or one that disagrees with the scheduler.
    """
    if getattr(scheduler, "prediction_type", prediction_type) != prediction_type:
        raise ValueError(
            f"prediction_type={prediction_type!r} disagrees with the scheduler's {scheduler.prediction_type!r}."
        )
    if prediction_type == "epsilon":
        return DiffusionPrepareBatch(num_train_timesteps=num_train_timesteps)
    if prediction_type == "sample":
        return X0PredictionPrepareBatch(num_train_timesteps=num_train_timesteps)
    if prediction_type == "v_prediction":
        return VPredictionPrepareBatch(scheduler=scheduler, num_train_timesteps=num_train_timesteps)
    raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}.")
