# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Stage 1: the 3D VQ-GAN (MONAI ``VQVAE`` + 3D and slice-wise 2D patch discriminators)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SimpleInferer
from torch import nn
from torch.utils.data import DataLoader

from meddiff.engines.trainer import Trainer, TrainerSettings, _unwrap, guard_cpu_bf16_convs, run_outside_autocast
from meddiff.losses import feature_matching_loss, hinge_d_loss, hinge_g_loss
from meddiff.networks.slice_discriminator import SliceDiscriminator

__all__ = ["VQGANTrainer"]


class VQGANTrainer(Trainer):
    """Trains the autoencoder with L1 + quantisation loss, then adds the adversarial terms.

    Generator loss: ``l1_weight * |x - x_rec| + quantization_weight * commitment
    + perceptual_weight * perceptual + Σ_D adv_weight_D * hinge_G(D(x_rec)) + feature_matching_weight * FM``
    where the adversarial and feature-matching terms start at ``adversarial_start_step``. Each
    discriminator (3D on volumes, 2D on one random slice per volume) is trained with the hinge loss.

    Args:
        autoencoder: MONAI ``VQVAE`` (forward returns ``(reconstruction, quantization_loss)``).
        optimizer_g: optimiser over the autoencoder's parameters.
        train_loader: batches of dicts with ``image`` (N, 1, H, W, D) scaled to [-1, 1].
        settings: run control (device, steps, checkpoints, DDP), shared by both stages.
        val_loader: validation batches (same form as ``train_loader``) or ``None``.
        discriminator_3d: MONAI 3D ``PatchDiscriminator`` or ``None``.
        discriminator_2d: :class:`SliceDiscriminator` or ``None``.
        optimizer_d: optimiser over both discriminators' parameters (required if either is given).
        lr_scheduler_g: optional LR schedule of ``optimizer_g``, stepped every step.
        l1_weight: weight of the L1 reconstruction loss.
        quantization_weight: weight of the VQ commitment loss.
        adversarial_start_step: first step with adversarial and feature-matching terms.
        adversarial_weight_3d: weight of the 3D discriminator's generator loss.
        adversarial_weight_2d: weight of the 2D discriminator's generator loss.
        feature_matching_weight: weight of discriminator feature matching.
        perceptual_loss: optional loss module ``(input, target) -> scalar`` (see ``LocalPerceptualLoss``).
        perceptual_weight: its weight.
        name: stage name in file names.
        inferer: MONAI inferer running the autoencoder in training steps, called as ``inferer(x, network)``
            and returning ``(reconstruction, quantization_loss)``; ``None``: ``SimpleInferer()``.
            The bundle property ``train#inferer``.
        max_epochs: passes over ``train_loader`` to train for instead of ``settings.max_steps`` (``None``:
            use ``max_steps``); the bundle property ``train#trainer#max_epochs``.
        latent_shape: latent shape from ``meddiff.engines.check_shape_chain`` (the bundles resolve it first,
            so a size that stage 2's denoiser cannot take fails before stage 1 trains); logged, and
            checked against the encoder's output at the first validation.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        optimizer_g: torch.optim.Optimizer,
        train_loader: DataLoader,
        settings: TrainerSettings,
        val_loader: DataLoader | None = None,
        discriminator_3d: nn.Module | None = None,
        discriminator_2d: SliceDiscriminator | None = None,
        optimizer_d: torch.optim.Optimizer | None = None,
        lr_scheduler_g: Any = None,
        l1_weight: float = 4.0,
        quantization_weight: float = 1.0,
        adversarial_start_step: int = 10000,
        adversarial_weight_3d: float = 1.0,
        adversarial_weight_2d: float = 1.0,
        feature_matching_weight: float = 4.0,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 0.0,
        name: str = "autoencoder",
        inferer: Inferer | None = None,
        max_epochs: int | None = None,
        latent_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(name=name, train_loader=train_loader, settings=settings, val_loader=val_loader,
                         max_epochs=max_epochs)
        self.inferer = inferer if inferer is not None else SimpleInferer()
        discriminators = {"3d": discriminator_3d, "2d": discriminator_2d}
        if any(d is not None for d in discriminators.values()) and optimizer_d is None:
            raise ValueError("optimizer_d is required when a discriminator is given.")
        if perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError("perceptual_weight > 0 needs perceptual_loss (a local-weights perceptual network).")
        self.autoencoder = autoencoder.to(self.device)
        self.model = self.wrap(autoencoder)
        self.discriminators = {k: (d.to(self.device), self.wrap(d)) for k, d in discriminators.items() if d is not None}
        self.optimizer_g = optimizer_g
        self.optimizer_d = optimizer_d
        self.lr_scheduler_g = lr_scheduler_g
        self.l1_weight = l1_weight
        self.quantization_weight = quantization_weight
        self.adversarial_start_step = adversarial_start_step
        self.adversarial_weights = {"3d": adversarial_weight_3d, "2d": adversarial_weight_2d}
        self.feature_matching_weight = feature_matching_weight
        self.perceptual_loss = perceptual_loss.to(self.device) if perceptual_loss is not None else None
        self.perceptual_weight = perceptual_weight
        self.latent_shape = None if latent_shape is None else [int(s) for s in latent_shape]
        if self.amp:
            if isinstance(getattr(autoencoder, "quantizer", None), nn.Module):
                # MONAI's quantizer turns autocast off on CUDA only: keep the nearest-code search and the
                # EMA codebook update in float32 on CPU too.
                run_outside_autocast(autoencoder.quantizer)
            if self.device.type == "cpu":
                for module in (autoencoder, discriminator_3d, discriminator_2d):
                    if module is not None:
                        guard_cpu_bf16_convs(module)

    def _judge(self, key: str, volumes: torch.Tensor, slices: torch.Tensor | None) -> list[torch.Tensor]:
        wrapped = self.discriminators[key][1]
        return wrapped(volumes) if key == "3d" else wrapped(volumes, slices)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        x = batch["image"].to(self.device)
        adversarial = bool(self.discriminators) and self.step >= self.adversarial_start_step
        for _, d in self.discriminators.values():
            d.train()
        self.model.train()
        slices = SliceDiscriminator.draw_slices(x) if "2d" in self.discriminators else None
        logs: dict[str, float] = {}

        with self.autocast():
            recon, q_loss = self.inferer(x, self.model)
            l1 = F.l1_loss(recon.float(), x)
            loss_g = self.l1_weight * l1 + self.quantization_weight * q_loss
            logs.update(l1=l1.item(), quantization=q_loss.item())
            if self.perceptual_loss is not None and self.perceptual_weight > 0:
                p = self.perceptual_loss(recon.float(), x)
                loss_g = loss_g + self.perceptual_weight * p
                logs["perceptual"] = p.item()
            if adversarial:
                for key in self.discriminators:
                    # one discriminator call on real and fake together keeps DDP to one forward per backward
                    feats = self._judge(key, torch.cat([x, recon]), None if slices is None else slices.repeat(2))
                    real_feats, fake_feats = zip(*(f.chunk(2) for f in feats))
                    g_adv = hinge_g_loss(fake_feats[-1].float())
                    fm = feature_matching_loss(list(real_feats[:-1]), list(fake_feats[:-1]))
                    loss_g = loss_g + self.adversarial_weights[key] * g_adv + self.feature_matching_weight * fm
                    logs.update({f"g_adv_{key}": g_adv.item(), f"feature_matching_{key}": fm.item()})
        self.optimizer_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.optimizer_g.step()
        if self.lr_scheduler_g is not None:
            self.lr_scheduler_g.step()
        logs["loss_g"] = loss_g.item()

        if adversarial:
            self.optimizer_d.zero_grad(set_to_none=True)
            fake = recon.detach()
            with self.autocast():
                loss_d = x.new_zeros(())
                for key in self.discriminators:
                    logits = self._judge(key, torch.cat([x, fake]), None if slices is None else slices.repeat(2))[-1]
                    real_logits, fake_logits = logits.float().chunk(2)
                    d_loss = hinge_d_loss(real_logits, fake_logits)
                    loss_d = loss_d + self.adversarial_weights[key] * d_loss
                    logs[f"d_{key}"] = d_loss.item()
            loss_d.backward()
            self.optimizer_d.step()
        return logs

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean L1 and PSNR (images in [-1, 1], data range 2) of reconstructions on the validation set."""
        self.model.eval()
        l1s, psnrs = [], []
        for batch in self.val_loader:
            x = batch["image"].to(self.device)
            if self.latent_shape is not None and not l1s:
                got = list(self.autoencoder.encode_stage_2_inputs(x).shape[1:])
                if got != self.latent_shape:
                    raise ValueError(f"the autoencoder's latents have shape {got}, but the shape chain (spatial_size, "
                                     f"autoencoder_channels, embedding_dim) gives {self.latent_shape}.")
            recon, _ = self.autoencoder(x)
            recon = recon.clamp(-1, 1)
            l1s.append(F.l1_loss(recon, x).item())
            mse = F.mse_loss(recon, x).item()
            psnrs.append(10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-10))).item())
        return {"l1": sum(l1s) / len(l1s), "psnr": sum(psnrs) / len(psnrs)}

    def state_modules(self) -> dict[str, Any]:
        modules: dict[str, Any] = {"autoencoder": self.autoencoder, "optimizer_g": self.optimizer_g}
        for key, (d, _) in self.discriminators.items():
            modules[f"discriminator_{key}"] = d
        if self.optimizer_d is not None:
            modules["optimizer_d"] = self.optimizer_d
        if self.lr_scheduler_g is not None:
            modules["lr_scheduler_g"] = self.lr_scheduler_g
        return modules

    def export_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.name: _unwrap(self.autoencoder).state_dict()}
