# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Self-supervised pre-training of a segmentation network on unlabelled (e.g. synthetic) volumes.

Two pretexts, each an ``nn.Module`` computing a loss from the network and a batch:

* :class:`RestorationPretext` (default, Models Genesis): the network, built with one output channel,
  restores the clean crop from a corrupted one (see :mod:`meddiff.transforms.restoration`); encoder
  and decoder learn together.
* :class:`ContrastivePretext` (SimCLR-style): the network, built with ``feature_channels`` outputs,
  embeds two augmented views of each crop (see :mod:`meddiff.transforms.views`); a pooled projection
  of both views must match each other against the rest of the batch (NT-Xent loss).

The :class:`PretextTrainer` writes the network's plain weights (``pretrained.pt``), which the
segmentation training loads with :func:`meddiff.networks.transfer.transfer_weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import set_rnd
from torch import nn
from torch.utils.data import DataLoader

from meddiff.engines.segmentation_trainer import plain_tensor
from meddiff.engines.trainer import Trainer, TrainerSettings, _unwrap

__all__ = ["PRETEXTS", "ContrastivePretext", "PretextTrainer", "RestorationPretext", "make_pretext", "nt_xent_loss"]

logger = logging.getLogger(__name__)


class RestorationPretext(nn.Module):
    """Restore ``batch["target"]`` from ``batch["image"]``: ``MSE(network(image), target)``.

    Args:
        loss: ``"mse"`` (Models Genesis) or ``"l1"``.
    """

    def __init__(self, loss: str = "mse") -> None:
        super().__init__()
        losses = {"mse": F.mse_loss, "l1": F.l1_loss}
        if loss not in losses:
            raise ValueError(f"loss must be one of {sorted(losses)}, got {loss!r}")
        self.loss = losses[loss]

    def forward(self, network: nn.Module, batch: Mapping[str, torch.Tensor],
                device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and logs of one batch (corrupted ``image`` and clean ``target``, ``(N, 1, X, Y, Z)``)."""
        x = plain_tensor(batch["image"], device)
        target = plain_tensor(batch["target"], device)
        out = network(x).float()
        if out.shape != target.shape:
            raise ValueError(f"restoration needs a network with {target.shape[1]} output channel(s); it returned "
                             f"{tuple(out.shape)} for targets {tuple(target.shape)} (set out_channels in pretrain.json)")
        loss = self.loss(out, target)
        return loss, {"restoration": loss.item()}


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Normalised-temperature cross-entropy (SimCLR) of two batches of embeddings.

    Args:
        z1: ``(N, D)`` embeddings of the first views.
        z2: ``(N, D)`` embeddings of the second views (row ``i`` is the positive of ``z1[i]``).
        temperature: softmax temperature.

    Returns:
        The scalar loss (mean over the ``2N`` anchors).

    Raises:
        ValueError: fewer than two pairs (no negatives) or mismatched shapes.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError("contrastive pre-training needs at least 2 crops in every batch: set num_crops >= 2 (the "
                         "last batch of an epoch may hold a single volume)")
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


class ContrastivePretext(nn.Module):
    """Contrast two views (``batch["image"]``, ``batch[view_key]``) of each crop with an MLP projection head.

    The network's ``feature_channels`` output maps are averaged over space, projected by a two-layer
    MLP and compared with :func:`nt_xent_loss`. The head is trained with the network and discarded.

    Args:
        feature_channels: output channels of the network during pre-training.
        projection_dim: size of the projected embedding.
        hidden_dim: hidden width of the projection MLP.
        temperature: NT-Xent temperature.
        view_key: batch key of the second view.
    """

    def __init__(self, feature_channels: int, projection_dim: int = 64, hidden_dim: int = 128,
                 temperature: float = 0.1, view_key: str = "image_2") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.feature_channels = feature_channels
        self.head = nn.Sequential(nn.Linear(feature_channels, hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(hidden_dim, projection_dim))
        self.temperature = temperature
        self.view_key = view_key

    def forward(self, network: nn.Module, batch: Mapping[str, torch.Tensor],
                device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and logs of one batch of view pairs ``(N, 1, X, Y, Z)``."""
        v1 = plain_tensor(batch["image"], device)
        v2 = plain_tensor(batch[self.view_key], device)
        features = network(torch.cat([v1, v2])).float()
        if features.shape[1] != self.feature_channels:
            raise ValueError(f"the network returned {features.shape[1]} channels but the contrastive head expects "
                             f"{self.feature_channels} (set out_channels to contrastive_channels in pretrain.json)")
        z = self.head(features.mean(dim=tuple(range(2, features.ndim))))
        z1, z2 = z.chunk(2)
        loss = nt_xent_loss(z1, z2, self.temperature)
        with torch.no_grad():
            agree = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(1).mean()
        return loss, {"contrastive": loss.item(), "positive_cosine": agree.item()}


#: pretext name -> class, picked by ``make_pretext`` (the ``pretext`` key of pretrain.json)
PRETEXTS: dict[str, type[nn.Module]] = {"restoration": RestorationPretext, "contrastive": ContrastivePretext}


def make_pretext(
    pretext: str = "restoration",
    feature_channels: int = 32,
    projection_dim: int = 64,
    hidden_dim: int = 128,
    temperature: float = 0.1,
    restoration_loss: str = "mse",
) -> nn.Module:
    """Build the pretext named ``pretext`` with its own settings (the others are ignored).

    Args:
        pretext: ``"restoration"`` or ``"contrastive"``.
        feature_channels: contrastive: the network's output channels.
        projection_dim: contrastive: projected embedding size.
        hidden_dim: contrastive: projection MLP width.
        temperature: contrastive: NT-Xent temperature.
        restoration_loss: restoration: ``"mse"`` or ``"l1"``.

    Returns:
        The pretext module.

    Raises:
        ValueError: unknown ``pretext``.
    """
    if pretext not in PRETEXTS:
        raise ValueError(f"pretext must be one of {sorted(PRETEXTS)}, got {pretext!r}")
    if pretext == "restoration":
        return RestorationPretext(loss=restoration_loss)
    return ContrastivePretext(feature_channels=feature_channels, projection_dim=projection_dim, hidden_dim=hidden_dim,
                              temperature=temperature)


class PretextTrainer(Trainer):
    """Pre-train ``network`` on a pretext task; the best/last plain weights feed the segmentation training.

    Validation computes the pretext loss with the validation pipeline's random transforms (crops,
    corruptions, views) re-seeded to ``val_seed`` each time, so the numbers are comparable across steps.

    Args:
        network: the segmentation network built with the pretext's output channels.
        pretext: :class:`RestorationPretext` or :class:`ContrastivePretext` (its parameters, e.g. the
            projection head, must be in ``optimizer``).
        optimizer: optimiser over the network's (and the pretext's) parameters.
        train_loader: batches prepared for the pretext (see the classes above).
        settings: run control (device, steps, checkpoints, DDP).
        val_loader: validation batches in the same form, or ``None``.
        lr_scheduler: optional LR schedule, stepped every step.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        val_seed: seed of the validation pipeline's random transforms.
        name: stage name in checkpoint and log file names.
        weights_name: stem of the plain weight files (``pretrained.pt``, ``pretrained_best.pt``).
    """

    def __init__(
        self,
        network: nn.Module,
        pretext: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        settings: TrainerSettings,
        val_loader: DataLoader | None = None,
        lr_scheduler: Any = None,
        grad_clip: float | None = None,
        val_seed: int = 12345,
        name: str = "pretrain",
        weights_name: str = "pretrained",
    ) -> None:
        super().__init__(name=name, train_loader=train_loader, settings=settings, val_loader=val_loader)
        self.network = network.to(self.device)
        self.pretext = pretext.to(self.device)
        # network and pretext (e.g. a projection head) in one module, so DDP synchronises both
        self.combined = _PretextModel(self.network, self.pretext, self.device)
        self.model = self.wrap(self.combined)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.val_seed = val_seed
        self.weights_name = weights_name

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        with self.autocast():
            loss, logs = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.combined.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return {"loss": loss.item(), **logs, "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean pretext loss over the validation batches (fixed random corruptions / views)."""
        self.combined.eval()
        dataset = self.val_loader.dataset
        set_rnd(getattr(dataset, "transform", dataset), self.val_seed)
        losses = []
        for batch in self.val_loader:
            with self.autocast():
                loss, _ = self.combined(batch)
            losses.append(loss.item())
        return {"loss": sum(losses) / max(len(losses), 1)}

    def state_modules(self) -> dict[str, Any]:
        modules: dict[str, Any] = {"network": self.network, "pretext": self.pretext, "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            modules["lr_scheduler"] = self.lr_scheduler
        return modules

    def export_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.weights_name: _unwrap(self.network).state_dict()}


class _PretextModel(nn.Module):
    """The network and its pretext as one module whose forward returns ``(loss, logs)`` for a batch."""

    def __init__(self, network: nn.Module, pretext: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.network = network
        self.pretext = pretext
        self.device = device

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.pretext(self.network, batch, self.device)
