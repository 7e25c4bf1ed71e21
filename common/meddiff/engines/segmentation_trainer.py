# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Supervised segmentation training on the shared step-based :class:`~meddiff.engines.Trainer`.

Subclassing the meddiff ``Trainer`` (rather than MONAI's ``SupervisedTrainer`` with handlers) keeps one
checkpoint layout, exact resume (model, optimiser, LR schedule, step, data position, RNG and
augmentation state) and the step-based schedule that the label-budget experiment needs: every label
budget gets the same number of optimisation steps, whatever its epoch length.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor, decollate_batch
from monai.inferers import Inferer, SimpleInferer
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete
from torch import nn
from torch.utils.data import DataLoader

from meddiff.engines.trainer import Trainer, TrainerSettings, _unwrap
from meddiff.utils import atomic_path, atomic_torch_save

__all__ = ["SegmentationTrainer", "plain_tensor"]

logger = logging.getLogger(__name__)


def plain_tensor(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` as a plain tensor: MONAI's ``MetaTensor`` bookkeeping slows every network op."""
    return (x.as_tensor() if isinstance(x, MetaTensor) else x).to(device)


class SegmentationTrainer(Trainer):
    """Train a segmentation network with a (Dice + cross-entropy) loss and sliding-window validation.

    Files under ``settings.ckpt_dir``: ``checkpoints/<name>_step<N>.pt`` (full state), ``<weights_name>.pt``
    (plain weights), ``<weights_name>_best.pt`` (highest validation Dice), ``<name>_log.jsonl``. When
    ``final_weights="best"`` the finished run copies the best weights onto ``<weights_name>.pt`` (what the
    inference and evaluation configs and MONAI Label load) and keeps the last ones as
    ``<weights_name>_last.pt``.

    Args:
        network: the segmentation network, output ``(N, num_classes, X, Y, Z)`` logits.
        optimizer: optimiser over the network's parameters.
        loss_function: e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``, called ``(logits, label)``.
        train_loader: batches of dicts with ``image`` ``(N, 1, X, Y, Z)`` and ``label`` ``(N, 1, X, Y, Z)``.
        settings: run control (device, steps, checkpoints, DDP).
        val_loader: whole preprocessed volumes (batch size 1) with ``image`` and ``label``, or ``None``.
        inferer: validation inferer, e.g. MONAI ``SlidingWindowInferer`` (default: whole volume).
        num_classes: number of classes including background.
        lr_scheduler: optional LR schedule, stepped every step.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        name: stage name in checkpoint and log file names.
        weights_name: stem of the plain weight files.
        final_weights: ``"best"`` or ``"last"``: which weights ``<weights_name>.pt`` holds after the run.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        train_loader: DataLoader,
        settings: TrainerSettings,
        val_loader: DataLoader | None = None,
        inferer: Inferer | None = None,
        num_classes: int = 2,
        lr_scheduler: Any = None,
        grad_clip: float | None = None,
        name: str = "segmentation",
        weights_name: str = "model",
        final_weights: str = "best",
    ) -> None:
        super().__init__(name=name, train_loader=train_loader, settings=settings, val_loader=val_loader)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        if final_weights not in ("best", "last"):
            raise ValueError(f"final_weights must be 'best' or 'last', got {final_weights!r}")
        self.network = network.to(self.device)
        self.model = self.wrap(self.network)
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.num_classes = num_classes
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.weights_name = weights_name
        self.final_weights = final_weights

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        x = plain_tensor(batch["image"], self.device)
        y = plain_tensor(batch["label"], self.device)
        with self.autocast():
            loss = self.loss_function(self.model(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return {"loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean foreground Dice over the validation volumes; ``dice_error = 1 - dice`` is tracked for "best"."""
        self.network.eval()
        metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
        to_pred = AsDiscrete(argmax=True, to_onehot=self.num_classes)
        to_label = AsDiscrete(to_onehot=self.num_classes)
        for batch in self.val_loader:
            x = plain_tensor(batch["image"], self.device)
            with self.autocast():
                logits = self.inferer(x, self.network)
            preds = [to_pred(p) for p in decollate_batch(logits.float())]
            labels = [to_label(lab) for lab in decollate_batch(plain_tensor(batch["label"], self.device))]
            metric(y_pred=preds, y=labels)
        dice = float(metric.aggregate().item())
        return {"dice_error": 1.0 - dice, "dice": dice}

    def state_modules(self) -> dict[str, Any]:
        modules: dict[str, Any] = {"network": self.network, "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            modules["lr_scheduler"] = self.lr_scheduler
        return modules

    def export_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.weights_name: _unwrap(self.network).state_dict()}

    def run(self) -> dict[str, float]:
        """Train (see :meth:`Trainer.run`), then put the final weights in place (see the class docstring)."""
        metrics = super().run()
        if self.is_main and self.final_weights == "best":
            best = self.ckpt_dir / f"{self.weights_name}_best.pt"
            final = self.ckpt_dir / f"{self.weights_name}.pt"
            last = self.ckpt_dir / f"{self.weights_name}_last.pt"
            if best.is_file():
                # the network in memory holds the last weights (trained here, or restored from the last checkpoint)
                atomic_torch_save(_unwrap(self.network).state_dict(), last)
                with atomic_path(final) as tmp:
                    shutil.copyfile(best, tmp)
                logger.info("%s holds the best validation weights (Dice %.4f); the last ones are in %s", final,
                            1.0 - self.best_metric, last)
        return metrics
