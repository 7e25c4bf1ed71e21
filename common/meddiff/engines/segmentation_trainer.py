# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Supervised segmentation training on the shared step-based :class:`~meddiff.engines.Trainer`, driven by MONAI ids.

The loop stays the meddiff ``Trainer`` (one checkpoint layout; exact resume of model, optimiser, LR
schedule, step, data position, RNG and augmentation state; DDP; and the step budgets of the
label-budget experiment, where every label budget gets the same number of optimisation steps whatever
its epoch length). Around it, the trainer takes what MONAI's bundle properties and MONAI Label address:

* ``max_epochs`` (``train#trainer#max_epochs``): when set, the run lasts that many passes over the
  training loader instead of the step budget;
* ``inferer`` (``train#inferer``): the forward pass of a training step;
* ``evaluator`` (``validate#evaluator``): a MONAI ``SupervisedEvaluator`` whose key metric (mean Dice)
  selects the best weights;
* ``train_handlers`` (``train#handlers``): MONAI / ignite event handlers (e.g. the ``CheckpointLoader``
  MONAI Label inserts to start from ``models/model.pt``), attached to an ignite ``Engine`` whose state
  mirrors the loop and whose events the loop fires.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monai.utils import CommonKeys
from torch import nn
from torch.utils.data import DataLoader

from meddiff.engines.trainer import Trainer, TrainerSettings, _unwrap
from meddiff.utils import atomic_path, atomic_torch_save

__all__ = ["SegmentationTrainer", "plain_prepare_batch", "plain_tensor"]

logger = logging.getLogger(__name__)


def plain_tensor(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` as a plain tensor: MONAI's ``MetaTensor`` bookkeeping slows every network op."""
    return (x.as_tensor() if isinstance(x, MetaTensor) else x).to(device)


def plain_prepare_batch(
    batchdata: Mapping[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prepare_batch`` for MONAI engines: ``(image, label)`` of a dict batch as plain tensors on ``device``.

    Args:
        batchdata: a collated batch with ``image`` and optionally ``label``.
        device: target device.
        non_blocking: unused (plain ``.to``); kept for MONAI's signature.
        kwargs: further ``prepare_batch`` arguments (unused).

    Returns:
        ``(image, label)``; ``label`` is ``None`` when the batch has none.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    label = batchdata.get(CommonKeys.LABEL)
    return plain_tensor(batchdata[CommonKeys.IMAGE], dev), None if label is None else plain_tensor(label, dev)


class SegmentationTrainer(Trainer):
    """Train a segmentation network with a (Dice + cross-entropy) loss, validated by a MONAI evaluator.

    Files under ``settings.ckpt_dir``: ``checkpoints/<name>_step<N>.pt`` (full state), ``<weights_name>.pt``
    (plain weights), ``<weights_name>_best.pt`` (highest validation Dice), ``<name>_log.jsonl``. When
    ``final_weights="best"`` the finished run copies the best weights onto ``<weights_name>.pt`` (what the
    inference and evaluation configs and MONAI Label load) and keeps the last ones as
    ``<weights_name>_last.pt``. A run with ``settings.resume`` false is a new run: the stage's old
    checkpoints and log in ``ckpt_dir`` are removed first, so they cannot be resumed or pruned in its place.

    Args:
        network: the segmentation network, output ``(N, num_classes, X, Y, Z)`` logits.
        optimizer: optimiser over the network's parameters.
        loss_function: e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``, called ``(logits, label)``.
        train_loader: batches of dicts with ``image`` ``(N, 1, X, Y, Z)`` and ``label`` ``(N, 1, X, Y, Z)``.
        settings: run control (device, step budget, checkpoints, DDP).
        max_epochs: if set, train for this many passes over ``train_loader`` (``max_epochs * len(train_loader)``
            steps) instead of ``settings.max_steps``; MONAI Label sets it through ``train#trainer#max_epochs``.
        inferer: forward pass of a training step, e.g. MONAI ``SimpleInferer`` (the default).
        evaluator: MONAI ``SupervisedEvaluator`` over whole validation volumes with a key metric in ``[0, 1]``,
            higher is better (mean Dice); ``None`` or an empty validation loader: no validation.
        train_handlers: MONAI / ignite handlers with ``attach(engine)``, attached to :attr:`engine`.
        lr_scheduler: optional LR schedule, stepped every step.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        name: stage name in checkpoint and log file names.
        weights_name: stem of the plain weight files.
        final_weights: ``"best"`` or ``"last"``: which weights ``<weights_name>.pt`` holds after the run.

    Raises:
        ValueError: bad ``max_epochs`` or ``final_weights``, or a handler without ``attach``.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        train_loader: DataLoader,
        settings: TrainerSettings,
        max_epochs: int | None = None,
        inferer: Inferer | None = None,
        evaluator: Any = None,
        train_handlers: Sequence[Any] | None = None,
        lr_scheduler: Any = None,
        grad_clip: float | None = None,
        name: str = "segmentation",
        weights_name: str = "model",
        final_weights: str = "best",
    ) -> None:
        val_loader = getattr(evaluator, "data_loader", None) if evaluator is not None else None
        if val_loader is not None and len(val_loader) == 0:
            logger.warning("the validation set is empty: training without validation (model.pt = last weights)")
            evaluator = val_loader = None
        super().__init__(name=name, train_loader=train_loader, settings=settings, val_loader=val_loader)
        if final_weights not in ("best", "last"):
            raise ValueError(f"final_weights must be 'best' or 'last', got {final_weights!r}")
        if max_epochs is not None:
            if int(max_epochs) < 1:
                raise ValueError(f"max_epochs must be >= 1 (or None for the step budget), got {max_epochs}")
            steps = int(max_epochs) * len(train_loader)
            if steps != self.max_steps:
                logger.info("max_epochs=%d: %d steps (%d batches per epoch) instead of max_steps=%d",
                            int(max_epochs), steps, len(train_loader), self.max_steps)
            total = getattr(lr_scheduler, "total_iters", steps)
            if total != steps:
                logger.warning("the LR schedule lasts %s steps but training %d (max_epochs=%d)", total, steps,
                               int(max_epochs))
            self.max_steps = steps
        self.max_epochs = None if max_epochs is None else int(max_epochs)
        self.network = network.to(self.device)
        self.model = self.wrap(self.network)
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.evaluator = evaluator
        self.lr_scheduler = lr_scheduler
        self.grad_clip = grad_clip
        self.weights_name = weights_name
        self.final_weights = final_weights
        self.engine = self._make_engine(train_handlers or [])

    # -- MONAI / ignite handlers ------------------------------------------------------------------
    def _make_engine(self, handlers: Sequence[Any]) -> Engine:
        """An ignite ``Engine`` that runs nothing itself: the loop fires its events with its state kept in step."""
        engine = Engine(lambda _engine, _batch: None)
        engine.network = self.network
        engine.optimizer = self.optimizer
        engine.loss_function = self.loss_function
        engine.inferer = self.inferer
        engine.data_loader = self.train_loader
        engine.state.epoch_length = len(self.train_loader)
        engine.state.max_epochs = -(-self.max_steps // max(len(self.train_loader), 1))
        engine.state.metrics = {}
        for handler in handlers:
            if not hasattr(handler, "attach"):
                raise ValueError(f"train handler {handler!r} has no attach(engine) method")
            handler.attach(engine)
        return engine

    def _fire(self, event: Events, iteration: int | None = None) -> None:
        """Fire ``event`` with the engine's iteration (default: the steps done) and 1-based epoch in step."""
        self.engine.state.iteration = self.step if iteration is None else iteration
        self.engine.state.epoch = self.epoch if event == Events.STARTED else self.epoch + 1
        self.engine.fire_event(event)

    def setup(self) -> None:
        """Start a new run unless resuming, then fire ``STARTED`` (before a resume restores the checkpoint)."""
        if not self.resume and self.is_main:
            old = self.checkpoints()
            for path in old:
                path.unlink()
            log = self.ckpt_dir / f"{self.name}_log.jsonl"
            if old or log.is_file():
                logger.info("resume is off: removed %d old %s checkpoint(s) and the log in %s", len(old), self.name,
                            self.ckpt_dir)
            log.unlink(missing_ok=True)
        if self.distributed:
            torch.distributed.barrier()
        self._fire(Events.STARTED)

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        step = self.step + 1  # the loop counts the step after this returns; handlers see its number now
        if self.batch_in_epoch == 1:
            self._fire(Events.EPOCH_STARTED, step - 1)
        self._fire(Events.ITERATION_STARTED, step)
        self.model.train()
        x = plain_tensor(batch["image"], self.device)
        y = plain_tensor(batch["label"], self.device)
        with self.autocast():
            loss = self.loss_function(self.inferer(x, self.model).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.engine.state.output = [{CommonKeys.LOSS: loss.detach()}]  # the shape of MONAI's decollated output
        self._fire(Events.ITERATION_COMPLETED, step)
        if self.batch_in_epoch == len(self.train_loader):
            self._fire(Events.EPOCH_COMPLETED, step)
        return {"loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Run the evaluator; ``dice_error = 1 - dice`` (its key metric) is tracked for "best"."""
        self.evaluator.run(global_epoch=self.epoch + 1)
        state = self.evaluator.state
        dice = float(state.metrics[state.key_metric_name])
        return {"dice_error": 1.0 - dice, "dice": dice}

    def state_modules(self) -> dict[str, Any]:
        modules: dict[str, Any] = {"network": self.network, "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            modules["lr_scheduler"] = self.lr_scheduler
        return modules

    def export_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.weights_name: _unwrap(self.network).state_dict()}

    def run(self) -> dict[str, float]:
        """Train (see :meth:`Trainer.run`), put the final weights in place (see the class docstring), fire ``COMPLETED``."""
        metrics = super().run()
        if self.is_main and self.final_weights == "best":
            best = self.ckpt_dir / f"{self.weights_name}_best.pt"
            final = self.ckpt_dir / f"{self.weights_name}.pt"
            last = self.ckpt_dir / f"{self.weights_name}_last.pt"
            if best.is_file() and self.val_loader is not None:
                # the network in memory holds the last weights (trained here, or restored from the last checkpoint)
                atomic_torch_save(_unwrap(self.network).state_dict(), last)
                with atomic_path(final, suffix="") as tmp:
                    shutil.copyfile(best, tmp)
                logger.info("%s holds the best validation weights (Dice %.4f); the last ones are in %s", final,
                            1.0 - self.best_metric, last)
        self._fire(Events.COMPLETED)
        return metrics
