# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Diffusion targets as MONAI ``DiffusionPrepareBatch`` variants: epsilon, x0 (``sample``), v, or rectified-flow velocity."""

from __future__ import annotations

import torch
from monai.engines.utils import DiffusionPrepareBatch, VPredictionPrepareBatch
from monai.networks.schedulers import RFlowScheduler
from torch import nn

__all__ = ["RFlowPrepareBatch", "X0PredictionPrepareBatch", "diffusion_prepare_batch"]


class X0PredictionPrepareBatch(DiffusionPrepareBatch):
    """Target is the clean input (``prediction_type="sample"``, the paper's configured objective)."""

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return images


class RFlowPrepareBatch(DiffusionPrepareBatch):
    """Rectified flow (MONAI ``RFlowScheduler``): timesteps from the scheduler, target the velocity ``x0 - noise``.

    The scheduler's ``add_noise`` makes ``x_t = (1 - t/T) x0 + (t/T) noise``; the network learns the
    constant velocity of that straight path, which MONAI's ``RFlowScheduler.step`` integrates.

    Args:
        scheduler: the ``RFlowScheduler`` (its ``sample_timesteps`` draws the training times).
        num_train_timesteps: time scale ``T``.
    """

    def __init__(self, scheduler: RFlowScheduler, num_train_timesteps: int) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps)
        self.scheduler = scheduler

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        return self.scheduler.sample_timesteps(images)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return images - noise


def diffusion_prepare_batch(
    prediction_type: str, num_train_timesteps: int, scheduler: nn.Module, objective: str = "ddpm"
) -> DiffusionPrepareBatch:
    """The ``DiffusionPrepareBatch`` whose target matches the objective and a MONAI scheduler's ``prediction_type``.

    Args:
        prediction_type: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"`` (``objective="ddpm"`` only;
            a rectified flow always predicts the velocity ``x0 - noise``).
        num_train_timesteps: training timesteps (random timesteps are drawn below this).
        scheduler: the training scheduler (needed for v and rflow targets; its prediction_type must agree).
        objective: ``"ddpm"`` or ``"rflow"`` (needs a MONAI ``RFlowScheduler``).

    Raises:
        ValueError: unknown ``objective`` or ``prediction_type``, or one that disagrees with the scheduler.
    """
    if objective == "rflow":
        if not isinstance(scheduler, RFlowScheduler):
            raise ValueError(f"objective='rflow' needs an RFlowScheduler as the training scheduler, got "
                             f"{type(scheduler).__name__}.")
        return RFlowPrepareBatch(scheduler=scheduler, num_train_timesteps=num_train_timesteps)
    if objective != "ddpm":
        raise ValueError(f"objective must be 'ddpm' or 'rflow', got {objective!r}.")
    if isinstance(scheduler, RFlowScheduler):
        raise ValueError("objective='ddpm' got an RFlowScheduler as the training scheduler: set objective to 'rflow'.")
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
