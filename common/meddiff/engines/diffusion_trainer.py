# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Stage 2: the DDPM in the frozen VQ-GAN's latent space."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import RFlowScheduler
from torch import nn
from torch.utils.data import DataLoader

from meddiff.engines.ema import EMA
from meddiff.engines.sampler import ResumableSampler
from meddiff.engines.trainer import Trainer, TrainerSettings, _unwrap, guard_cpu_bf16_convs
from meddiff.utils import atomic_write_json

__all__ = ["DiffusionTrainer", "LOSSES"]

logger = logging.getLogger(__name__)

LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


class _Latents(torch.utils.data.Dataset):
    def __init__(self, latents: list[torch.Tensor]) -> None:
        self.latents = latents

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.latents[i]}


class DiffusionTrainer(Trainer):
    """Latent DDPM training: encode with the frozen autoencoder, scale, noise, predict, L1.

    The autoencoder is deterministic and frozen and the pipeline has no random augmentation, so
    latents (quantised embeddings) are encoded once and cached. ``scale_factor`` defaults to
    ``1 / std`` of the training latents. Written beside the weights: ``<name>.json`` with the
    scale factor, latent shape, range of the scaled training latents, training ``objective``
    (``"ddpm"``, or ``"rflow"`` when the inferer's scheduler is MONAI's ``RFlowScheduler``) and
    ``prediction_type`` that inference needs (the sampler refuses a sampling method that does not
    fit the objective).

    Args:
        autoencoder: trained stage-1 model with ``encode_stage_2_inputs`` (frozen here).
        diffusion_model: the denoiser, called as ``model(x=, timesteps=, context=)``.
        optimizer: optimiser over the denoiser's parameters.
        inferer: MONAI ``DiffusionInferer`` holding the training scheduler.
        prepare_batch: a ``DiffusionPrepareBatch`` (see ``diffusion_prepare_batch``).
        train_loader: batches of dicts with ``image`` (N, 1, H, W, D).
        settings: run control (device, steps, checkpoints, DDP), shared by both stages.
        val_loader: validation batches (same form as ``train_loader``) or ``None``.
        lr_scheduler: optional LR schedule stepped every step.
        loss: ``"l1"`` (paper) or ``"l2"``.
        scale_factor: latent scale, or ``None`` to use ``1 / std`` of the training latents.
        ema_decay: EMA decay of the saved and sampled weights.
        ema_update_every: EMA update interval.
        ema_start_step: EMA follows the weights before this step.
        grad_clip: max gradient norm (``None``: no clipping).
        name: stage name in file names.
        max_epochs: passes over the training set to train for instead of ``settings.max_steps`` (``None``:
            use ``max_steps``); the bundle property ``train#trainer#max_epochs``.
        latent_shape: expected latent shape from ``meddiff.engines.check_shape_chain`` (resolved first by the
            bundle, so a bad shape chain fails before any encoding); the cached latents must have it.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        diffusion_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        inferer: DiffusionInferer,
        prepare_batch: DiffusionPrepareBatch,
        train_loader: DataLoader,
        settings: TrainerSettings,
        val_loader: DataLoader | None = None,
        lr_scheduler: Any = None,
        loss: str = "l1",
        scale_factor: float | None = None,
        ema_decay: float = 0.995,
        ema_update_every: int = 10,
        ema_start_step: int = 2000,
        grad_clip: float | None = 1.0,
        name: str = "diffusion_model",
        max_epochs: int | None = None,
        latent_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(name=name, train_loader=train_loader, settings=settings, val_loader=val_loader,
                         max_epochs=max_epochs)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}.")
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.diffusion_model = diffusion_model.to(self.device)
        if self.amp and self.device.type == "cpu":
            guard_cpu_bf16_convs(self.diffusion_model)
        self.model = self.wrap(diffusion_model)
        self.ema = EMA(self.diffusion_model, decay=ema_decay, update_every=ema_update_every, start_step=ema_start_step)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.inferer = inferer
        self.prepare_batch = prepare_batch
        self.loss_fn = LOSSES[loss]
        self.scale_factor = scale_factor
        self.grad_clip = grad_clip
        self.expected_latent_shape = None if latent_shape is None else [int(s) for s in latent_shape]
        self.latent_shape: list[int] = []
        self.latent_range: list[float] = []
        self._val_latents: list[torch.Tensor] = []

    @torch.no_grad()
    def _encode_all(self, loader: DataLoader) -> list[torch.Tensor]:
        latents = []
        for batch in loader:
            z = self.autoencoder.encode_stage_2_inputs(batch["image"].to(self.device))
            latents.extend(z.cpu().unbind(0))
        return latents

    def setup(self) -> None:
        """Encode and cache the training and validation latents; fix the scale factor."""
        loader = self.train_loader
        sequential = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                                num_workers=loader.num_workers, collate_fn=loader.collate_fn)
        latents = self._encode_all(sequential)
        if not latents:
            raise ValueError("the training set is empty: no latents to train on.")
        self.latent_shape = list(latents[0].shape)
        if self.expected_latent_shape is not None and self.latent_shape != self.expected_latent_shape:
            raise ValueError(f"the autoencoder produced latents of shape {self.latent_shape}, but the shape chain "
                             f"(spatial_size, autoencoder_channels, embedding_dim) gives {self.expected_latent_shape}.")
        if self.scale_factor is None:
            self.scale_factor = float(1.0 / torch.stack(latents).std().clamp_min(1e-6))
        logger.info("cached %d training latents of shape %s; scale factor %.4f", len(latents), self.latent_shape,
                    self.scale_factor)
        latents = [z * self.scale_factor for z in latents]
        stacked = torch.stack(latents)
        self.latent_range = [float(stacked.min()), float(stacked.max())]
        dataset = _Latents(latents)
        old_sampler = loader.sampler
        sampler = ResumableSampler(dataset, shuffle=getattr(old_sampler, "shuffle", True),
                                   seed=getattr(old_sampler, "seed", 0))
        self.train_loader = DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler)
        if self.val_loader is not None:
            self._val_latents = [z * self.scale_factor for z in self._encode_all(self.val_loader)]

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        images, target, _, kwargs = self.prepare_batch(batch, self.device)
        with self.autocast():
            prediction = self.inferer(inputs=images, diffusion_model=self.model, **kwargs)
            loss = self.loss_fn(prediction.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.diffusion_model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.ema.update(self.diffusion_model, self.step + 1)
        return {"loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss of the EMA weights on the validation latents, with noise and timesteps fixed by a seed."""
        if not self._val_latents:
            return {}
        g = torch.Generator().manual_seed(1234)
        n_steps = self.prepare_batch.num_train_timesteps
        losses = []
        for z in self._val_latents:
            z = z[None].to(self.device)
            noise = torch.randn(z.shape, generator=g).to(self.device)
            t = torch.randint(0, n_steps, (1,), generator=g).to(self.device)
            target = self.prepare_batch.get_target(z, noise, t)
            prediction = self.inferer(inputs=z, diffusion_model=self.ema.module, noise=noise, timesteps=t)
            losses.append(self.loss_fn(prediction, target).item())
        return {"loss": sum(losses) / len(losses)}

    def state_modules(self) -> dict[str, Any]:
        modules: dict[str, Any] = {"diffusion_model": self.diffusion_model, "ema": self.ema.module,
                                   "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            modules["lr_scheduler"] = self.lr_scheduler
        return modules

    def extra_state(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor, "latent_shape": self.latent_shape}

    @property
    def objective(self) -> str:
        """``"rflow"`` when training a rectified flow (MONAI ``RFlowScheduler``), else ``"ddpm"``."""
        return "rflow" if isinstance(self.inferer.scheduler, RFlowScheduler) else "ddpm"

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if abs(state["scale_factor"] - self.scale_factor) > 1e-6 * abs(self.scale_factor):
            raise ValueError(
                f"the checkpoint's latent scale factor {state['scale_factor']:.6f} differs from this run's "
                f"{self.scale_factor:.6f}: the autoencoder or the data changed since the checkpoint."
            )

    def export_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.name: _unwrap(self.ema.module).state_dict()}

    def save_checkpoint(self) -> None:
        super().save_checkpoint()
        if self.is_main:
            atomic_write_json(
                Path(self.ckpt_dir) / f"{self.name}.json",
                {"scale_factor": self.scale_factor, "latent_shape": self.latent_shape,
                 "latent_min": self.latent_range[0], "latent_max": self.latent_range[1],
                 "objective": self.objective,
                 "prediction_type": str(getattr(self.inferer.scheduler, "prediction_type", None)),
                 "num_train_timesteps": self.prepare_batch.num_train_timesteps, "step": self.step,
                 "weights": "EMA"},
            )
