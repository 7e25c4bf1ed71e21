# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Step-based training loop shared by the VQ-GAN and diffusion stages.

Owns what both stages need and MONAI's engines do not give together: exact resume (model,
optimiser, LR schedule, step, data position, EMA, RNG and random-transform state), the last N checkpoints plus the
best one, plain weight files for downstream configs, DDP, progress and a JSON-lines log.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import meddiff
from meddiff.engines.sampler import ResumableSampler
from meddiff.engines.transform_state import set_transform_rng_state, transform_rng_state
from meddiff.utils import as_bool, atomic_torch_save, atomic_write_json, is_temporary

__all__ = ["Trainer", "TrainerSettings", "guard_cpu_bf16_convs", "rng_state", "run_outside_autocast", "set_rng_state"]

logger = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Capture torch (CPU and CUDA), NumPy and Python RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_outside_autocast(module: nn.Module, when: Callable[[torch.Tensor], bool] | None = None) -> None:
    """Hooks that run ``module`` in float32 with autocast off (inputs cast to float32), when ``when(input)`` holds.

    Args:
        module: the module to guard (its parameters stay float32).
        when: predicate on the first input; ``None``: always.
    """
    contexts: list[torch.autocast | None] = []

    def enter(mod: nn.Module, args: tuple) -> tuple | None:
        inputs = args[0]
        if when is not None and not when(inputs):
            contexts.append(None)
            return None
        context = torch.autocast(device_type=inputs.device.type, enabled=False)
        context.__enter__()
        contexts.append(context)
        return (inputs.float(), *args[1:])

    def leave(mod: nn.Module, args: tuple, output: Any) -> None:
        context = contexts.pop()
        if context is not None:
            context.__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def guard_cpu_bf16_convs(model: nn.Module) -> None:
    """Run convolutions with an input side smaller than their kernel in float32.

    Works around a torch CPU (oneDNN) bug: under bf16 autocast the weight gradient of a 3D convolution
    whose input is narrower than its kernel along some axis comes back wrong, inf or NaN (seen with
    torch 2.13 and >= 16 input channels: a 3x3x3 kernel on (2, 2, 4), a 4x4x4 kernel on (3, 3, 3)).
    The deepest denoiser level on small latents and the last layers of a patch discriminator hit it.
    The forward pass is unaffected; such layers are tiny, so float32 there costs nothing.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and max(module.kernel_size) > 1:
            kernel = tuple(module.kernel_size)
            run_outside_autocast(module, when=lambda x, k=kernel: any(s < w for s, w in zip(x.shape[2:], k)))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class TrainerSettings:
    """Run control shared by every training stage (one definition in the configs, used by both stages).

    Args:
        device: device to train on.
        max_steps: number of optimisation steps.
        ckpt_dir: output folder for checkpoints, weights and logs.
        val_interval: validate every this many steps (and at the end).
        ckpt_interval: checkpoint every this many steps (and at the end).
        keep_last: number of full checkpoints kept.
        log_interval: log every this many steps.
        resume: continue from the newest checkpoint in ``ckpt_dir`` if there is one.
        distributed: wrap networks in DistributedDataParallel (``torch.distributed`` must be initialised).
        amp: bf16 mixed precision (``torch.autocast`` with ``bfloat16``) on CPU and CUDA; bf16 keeps float32's
            exponent range, so no gradient scaler is needed. Losses are computed in float32.
        progress: show a progress bar on rank 0.
        tensorboard_dir: write scalars with TensorBoard's SummaryWriter here (needs ``tensorboard``).
    """

    device: str | torch.device = "cpu"
    max_steps: int = 1000
    ckpt_dir: str | Path = "models"
    val_interval: int = 500
    ckpt_interval: int = 500
    keep_last: int = 3
    log_interval: int = 10
    resume: bool = True
    distributed: bool = False
    amp: bool = False
    progress: bool = True
    tensorboard_dir: str | Path | None = None

    def __post_init__(self) -> None:
        for arg in ("resume", "distributed", "amp", "progress"):
            setattr(self, arg, as_bool(getattr(self, arg), arg))
        for arg in ("max_steps", "val_interval", "ckpt_interval", "keep_last", "log_interval"):
            if getattr(self, arg) < 1:
                raise ValueError(f"{arg} must be >= 1, got {getattr(self, arg)}.")
        if self.distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed initialised (run with torchrun).")


class Trainer:
    """Base class: subclasses implement :meth:`train_step`, :meth:`validate` and the state hooks.

    Files under ``settings.ckpt_dir`` (``name`` is the stage, e.g. ``autoencoder``):
    ``checkpoints/<name>_step<N>.pt`` (full state, last ``keep_last`` kept), ``<name>.pt`` (plain
    weights at the latest checkpoint), ``<name>_best.pt`` (plain weights with the lowest validation
    metric), ``<name>_log.jsonl`` (losses and metrics per logged step). All are written atomically.

    Args:
        name: stage name used in file names.
        train_loader: training data; its sampler should be a :class:`ResumableSampler` for exact resume.
        settings: run control (steps, intervals, checkpoints, DDP, device).
        val_loader: validation data, or ``None`` to skip validation.
        max_epochs: train for this many passes over ``train_loader`` instead of ``settings.max_steps``
            (``max_epochs * len(train_loader)`` steps; ``None``: use ``max_steps``). MONAI's bundle property
            ``train#trainer#max_epochs``, which MONAI Label sets.

    Raises:
        ValueError: ``max_epochs`` is < 1 or ``train_loader`` has no batches.
    """

    def __init__(
        self,
        name: str,
        train_loader: DataLoader,
        settings: TrainerSettings,
        val_loader: DataLoader | None = None,
        max_epochs: int | None = None,
    ) -> None:
        self.name = name
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.settings = settings
        self.device = torch.device(settings.device)
        self.max_steps = settings.max_steps if max_epochs is None else self._epochs_to_steps(max_epochs, train_loader)
        self.ckpt_dir = Path(settings.ckpt_dir)
        self.val_interval = settings.val_interval
        self.ckpt_interval = settings.ckpt_interval
        self.keep_last = settings.keep_last
        self.log_interval = settings.log_interval
        self.resume = settings.resume
        self.distributed = settings.distributed
        self.amp = settings.amp
        self.progress = settings.progress
        self.tensorboard_dir = settings.tensorboard_dir
        self.rank = dist.get_rank() if self.distributed else 0
        self.is_main = self.rank == 0
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_metric = math.inf
        self.history: list[dict[str, float]] = []
        self._resume_rng: Mapping[str, Any] | None = None

    @staticmethod
    def _epochs_to_steps(max_epochs: int, train_loader: DataLoader) -> int:
        """Steps in ``max_epochs`` passes over ``train_loader`` (this rank's share of the data under DDP)."""
        if int(max_epochs) < 1:
            raise ValueError(f"max_epochs must be >= 1 (or None to use max_steps), got {max_epochs}.")
        steps_per_epoch = len(train_loader)
        if steps_per_epoch < 1:
            raise ValueError("max_epochs needs a train_loader with at least one batch; it has none.")
        return int(max_epochs) * steps_per_epoch

    # -- hooks for subclasses ------------------------------------------------------------------
    def setup(self) -> None:
        """Called once before the loop (after construction, before resume)."""

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step; returns scalar logs."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Validation metrics; the first item is the one tracked for the best checkpoint (lower is better)."""
        return {}

    def state_modules(self) -> dict[str, Any]:
        """Objects with ``state_dict``/``load_state_dict`` saved in full checkpoints (networks unwrapped)."""
        raise NotImplementedError

    def export_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Plain weight files to write: file stem -> state_dict."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Additional JSON-able values saved in checkpoints and restored by :meth:`load_extra_state`."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    # -- helpers -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """Move to the device and wrap in DDP when distributed."""
        model = model.to(self.device)
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def autocast(self) -> torch.autocast:
        """bf16 autocast on this device when ``amp`` is on (a no-op context otherwise)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    @property
    def checkpoint_dir(self) -> Path:
        return self.ckpt_dir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """This stage's full checkpoints, oldest first."""
        pattern = re.compile(rf"^{re.escape(self.name)}_step(\d+)\.pt$")
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.glob(f"{self.name}_step*.pt")
                 if (m := pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def _remove_partial_checkpoints(self) -> None:
        """Delete checkpoint writes a killed run left unfinished (never loaded: resume reads whole files only)."""
        for leftover in self.checkpoint_dir.glob(f".{self.name}_step*"):
            if is_temporary(leftover):
                logger.info("removing %s, a checkpoint write that did not finish", leftover)
                leftover.unlink(missing_ok=True)

    def _sampler(self) -> ResumableSampler | None:
        sampler = getattr(self.train_loader, "sampler", None)
        return sampler if isinstance(sampler, ResumableSampler) else None

    def _batches(self) -> Iterator[Any]:
        """Endless batches; keeps epoch and position so a checkpoint can restart mid-epoch."""
        while True:
            sampler = self._sampler()
            if sampler is not None:
                batch_size = self.train_loader.batch_size or 1
                sampler.set_epoch(self.epoch, start=self.batch_in_epoch * batch_size)
            elif self.batch_in_epoch:
                logger.warning("train_loader has no ResumableSampler: the resumed epoch restarts from its beginning.")
            # Creating a loader iterator draws from torch's RNG: restore the saved state where the
            # original run stood relative to that draw (before it at an epoch start, after it mid-epoch).
            if self.batch_in_epoch == 0:
                self._restore_rng()
            iterator = iter(self.train_loader)
            self._restore_rng()
            for batch in iterator:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def _restore_rng(self) -> None:
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write a full checkpoint and the plain weights (rank 0), then prune old checkpoints."""
        if self.is_main:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "best_metric": self.best_metric,
                "modules": {k: v.state_dict() for k, v in self.state_modules().items()},
                "extra": self.extra_state(),
                "rng": rng_state(),
                "transforms_rng": transform_rng_state(self.train_loader),
                "meta": {"meddiff_version": meddiff.__version__, "torch_version": str(torch.__version__),
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
            }
            atomic_torch_save(state, self.checkpoint_dir / f"{self.name}_step{self.step:08d}.pt")
            for stem, weights in self.export_weights().items():
                atomic_torch_save(weights, self.ckpt_dir / f"{stem}.pt")
            for old in self.checkpoints()[: -self.keep_last]:
                old.unlink()
            logger.info("step %d: checkpoint written to %s", self.step, self.checkpoint_dir)
        if self.distributed:
            dist.barrier()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote except the global RNG state (see :meth:`run`)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        modules = self.state_modules()
        missing = set(modules) - set(state["modules"])
        if missing:
            raise ValueError(f"checkpoint {path} lacks {sorted(missing)}; was it written by another stage?")
        for key, obj in modules.items():
            obj.load_state_dict(state["modules"][key])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best_metric = state["best_metric"]
        if self.batch_in_epoch >= len(self.train_loader):  # saved at an epoch's end
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.load_extra_state(state["extra"])
        set_transform_rng_state(self.train_loader, state.get("transforms_rng", []))
        self._resume_rng = state["rng"]
        logger.info("resumed %s from %s at step %d", self.name, path, self.step)

    # -- loop ----------------------------------------------------------------------------------
    def _log(self, record: dict[str, float], writer: Any) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        with open(self.ckpt_dir / f"{self.name}_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(f"{self.name}/{key}", value, self.step)

    def _writer(self) -> Any:
        if self.tensorboard_dir is None or not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("tensorboard_dir is set but tensorboard is not installed: pip install tensorboard") from e
        return SummaryWriter(log_dir=str(self.tensorboard_dir))

    def run(self) -> dict[str, float]:
        """Train to ``max_steps`` (resuming if asked); returns the last validation metrics."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.setup()
        if self.is_main:
            self._remove_partial_checkpoints()
        if self.resume and (existing := self.checkpoints()):
            self.load_checkpoint(existing[-1])
        batches = self._batches()
        metrics: dict[str, float] = {}
        writer = self._writer()
        with tqdm(total=self.max_steps, initial=self.step, desc=f"train {self.name}", dynamic_ncols=True,
                  disable=not (self.progress and self.is_main), mininterval=1.0) as bar:
            tic = time.perf_counter()
            while self.step < self.max_steps:
                batch = next(batches)
                logs = self.train_step(batch)
                self.step += 1
                bar.update(1)
                done = self.step == self.max_steps
                if self.step % self.log_interval == 0 or done:
                    rate = self.log_interval / max(time.perf_counter() - tic, 1e-9)
                    tic = time.perf_counter()
                    bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
                    self._log({"step": self.step, **logs, "steps_per_s": rate}, writer)
                    logger.info("step %d/%d %s", self.step, self.max_steps,
                                " ".join(f"{k}={v:.4f}" for k, v in logs.items()))
                if self.val_loader is not None and (self.step % self.val_interval == 0 or done):
                    metrics = self.validate()
                    self._log({"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}}, writer)
                    key, value = next(iter(metrics.items()))
                    logger.info("step %d validation %s", self.step,
                                " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                    if value < self.best_metric:
                        self.best_metric = value
                        if self.is_main:
                            for stem, weights in self.export_weights().items():
                                atomic_torch_save(weights, self.ckpt_dir / f"{stem}_best.pt")
                            logger.info("step %d: new best %s=%.5f", self.step, key, value)
                if self.step % self.ckpt_interval == 0 or done:
                    self.save_checkpoint()
        if writer is not None:
            writer.close()
        if self.is_main:
            atomic_write_json(self.ckpt_dir / f"{self.name}_summary.json",
                              {"steps": self.step, "best_metric": self.best_metric, "last_metrics": metrics})
        return metrics
