# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Stage 2: the DDPM in the frozen VQ-GAN's latent space."""

from __future__ import annotations

import functools
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

from meddiff.data.class_labels import CLASS_KEY
from meddiff.engines.ema import EMA
from meddiff.engines.sampler import ResumableSampler
from meddiff.engines.trainer import Trainer, TrainerSettings, _unwrap, guard_cpu_bf16_convs
from meddiff.transforms.spacing import SPACING_KEY
from meddiff.utils import as_bool, atomic_write_json

__all__ = ["DiffusionTrainer", "LOSSES"]

logger = logging.getLogger(__name__)

LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


class _Latents(torch.utils.data.Dataset):
    def __init__(self, latents: list[torch.Tensor], labels: list[int] | None = None,
                 spacings: list[torch.Tensor] | None = None) -> None:
        self.latents = latents
        self.labels = labels
        self.spacings = spacings

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": self.latents[i]}
        if self.labels is not None:
            item[CLASS_KEY] = torch.tensor(self.labels[i], dtype=torch.long)
        if self.spacings is not None:
            item[SPACING_KEY] = self.spacings[i]
        return item


class DiffusionTrainer(Trainer):
    """Latent DDPM training: encode with the frozen autoencoder, scale, noise, predict, L1.

    The autoencoder is deterministic and frozen and the pipeline has no random augmentation, so
    latents (quantised embeddings) are encoded once and cached. ``scale_factor`` defaults to
    ``1 / std`` of the training latents. Written beside the weights: ``<name>.json`` with the
    scale factor, latent shape, range of the scaled training latents, training ``objective``
    (``"ddpm"``, or ``"rflow"`` when the inferer's scheduler is MONAI's ``RFlowScheduler``) and
    ``prediction_type``, ``num_train_timesteps`` and ``noise_schedule`` (``ddpm`` with a scheduler from
    ``meddiff.schedulers.make_training_scheduler``; ``null`` for ``rflow``, which has none) that inference
    needs (the sampler refuses a sampling method, prediction type, ``num_train_timesteps`` or
    ``noise_schedule`` that does not fit).

    Class conditioning (``num_classes > 0``): every batch item carries a ``class_label`` (a class name,
    see ``meddiff.data.with_class_labels``); names map to indices ``0..num_classes-1`` in sorted order
    (or ``class_names``' order) and index ``num_classes`` is the "null" class of the unconditional branch,
    which replaces a training label with probability ``cfg_dropout`` (classifier-free guidance). The
    denoiser needs ``num_class_embeds = num_classes + 1``. ``num_classes`` and ``class_names`` go into
    ``<name>.json`` for sampling.

    Spacing conditioning (``condition_on_spacing``, as MAISI): every batch item carries its voxel ``spacing``
    (mm per axis after preprocessing, written by ``meddiff.transforms.ItemSpacingd``), which the denoiser
    (``Pseudo3DUNet(condition_on_spacing=True)``) adds to its timestep embedding. ``condition_on_spacing`` and
    the training ``spacing_range`` (``[[min x, y, z], [max x, y, z]]``) go into ``<name>.json``.

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
        num_classes: number of classes of a class-conditioned model (0: unconditional).
        cfg_dropout: probability that a training label is replaced by the null class (index ``num_classes``).
        class_names: class names in index order (``None``: the sorted names found in the training set).
        condition_on_spacing: condition the denoiser on each volume's voxel spacing (the denoiser must have been
            built with it: ``diffusion_def`` ``@pseudo3d_unet_def``; MONAI's ``DiffusionModelUNet`` has no spacing
            input).

    Raises:
        ValueError: a bad ``loss``, ``num_classes``/``cfg_dropout``, or a denoiser whose class embedding
            does not fit ``num_classes`` or whose spacing input does not fit ``condition_on_spacing``; at setup,
            training classes that do not fit ``num_classes`` or items without a spacing.
    """

    state_key = "diffusion_model"  # checkpoint key of the trained network

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
        num_classes: int = 0,
        cfg_dropout: float = 0.1,
        class_names: Sequence[str] | None = None,
        condition_on_spacing: bool = False,
    ) -> None:
        super().__init__(name=name, train_loader=train_loader, settings=settings, val_loader=val_loader,
                         max_epochs=max_epochs)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}.")
        self.num_classes = int(num_classes)
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}.")
        if not 0.0 <= float(cfg_dropout) < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}.")
        self.cfg_dropout = float(cfg_dropout)
        embeds = getattr(diffusion_model, "num_class_embeds", None)
        if (embeds or 0) != (self.num_classes + 1 if self.num_classes else 0):
            raise ValueError(f"num_classes={self.num_classes} needs a denoiser with num_class_embeds="
                             f"{self.num_classes + 1 if self.num_classes else None} (classes + the null class), "
                             f"got {embeds}: set diffusion_def's num_class_embeds from num_classes.")
        self.condition_on_spacing = as_bool(condition_on_spacing, "condition_on_spacing")
        has_spacing = bool(getattr(diffusion_model, "condition_on_spacing", False))
        if self.condition_on_spacing and not has_spacing:
            raise ValueError(f"condition_on_spacing=true needs a denoiser with a spacing input, but diffusion_def is "
                             f"{type(diffusion_model).__name__} without one: use diffusion_def @pseudo3d_unet_def "
                             "(meddiff.networks.Pseudo3DUNet; MONAI's DiffusionModelUNet has no spacing input).")
        if has_spacing and not self.condition_on_spacing:
            raise ValueError("the denoiser (diffusion_def) was built with condition_on_spacing=True but the trainer "
                             "has condition_on_spacing=false: set the top-level condition_on_spacing for both.")
        self.spacing_range: list[list[float]] = []
        self._val_spacings: list[torch.Tensor] | None = None
        self.class_names = None if class_names is None else [str(c) for c in class_names]
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
        self._val_labels: list[int] | None = None

    @torch.no_grad()
    def _encode_all(self, loader: DataLoader, labels: list[str] | None = None,
                    spacings: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Latents of every batch; with ``labels``/``spacings`` given, also append each item's class name/spacing."""
        latents = []
        for batch in loader:
            z = self.autoencoder.encode_stage_2_inputs(batch["image"].to(self.device))
            latents.extend(z.cpu().unbind(0))
            if spacings is not None:
                if SPACING_KEY not in batch:
                    raise ValueError(f"condition_on_spacing=true but the data items have no '{SPACING_KEY}': the "
                                     "preprocessing must resample with meddiff.transforms.ItemSpacingd "
                                     "(condition_on_spacing=@condition_on_spacing), as common.json's does.")
                spacings.extend(torch.as_tensor(batch[SPACING_KEY], dtype=torch.float32).reshape(-1, 3).unbind(0))
            if labels is not None:
                if CLASS_KEY not in batch:
                    raise ValueError(f"num_classes={self.num_classes} but the data items have no '{CLASS_KEY}': "
                                     "give labels_file or class_label in the datalist_file.")
                labels.extend(str(c) for c in batch[CLASS_KEY])
        return latents

    def _class_indices(self, names: list[str], source: str) -> list[int]:
        """Class indices of class names; fixes ``class_names`` from the training set when not given."""
        if self.class_names is None:
            self.class_names = sorted(set(names))
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"num_classes={self.num_classes} but the training set has {len(self.class_names)} "
                             f"classes {self.class_names}: set num_classes to {len(self.class_names)}.")
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(f"the {source} set has classes {unknown} not among the training classes "
                             f"{self.class_names} (class_label / labels_file).")
        return [index[name] for name in names]

    def _conditioned(self, model: nn.Module, batch: dict[str, torch.Tensor], dropout: float) -> Any:
        """The denoiser with the batch's class labels (``dropout``: share replaced by the null class) and, with
        ``condition_on_spacing``, spacings bound."""
        if self.condition_on_spacing:
            model = functools.partial(model, spacing=batch[SPACING_KEY].to(self.device).float())
        labels = self._class_labels(batch, dropout)
        return model if labels is None else functools.partial(model, class_labels=labels)

    def _class_labels(self, batch: dict[str, torch.Tensor], dropout: float) -> torch.Tensor | None:
        """The batch's class indices, a share ``dropout`` replaced by the null class; ``None`` when unconditional."""
        if not self.num_classes:
            return None
        labels = batch[CLASS_KEY].to(self.device).reshape(-1)
        if dropout > 0:
            drop = torch.rand(labels.shape, device=self.device) < dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return labels

    def setup(self) -> None:
        """Encode and cache the training and validation latents; fix the scale factor."""
        sequential = self._sequential_loader()
        names: list[str] | None = [] if self.num_classes else None
        spacings: list[torch.Tensor] | None = [] if self.condition_on_spacing else None
        latents = self._encode_all(sequential, names, spacings)
        if not latents:
            raise ValueError("the training set is empty: no latents to train on.")
        self._set_latent_shape(latents)
        if self.scale_factor is None:
            self.scale_factor = float(1.0 / torch.stack(latents).std().clamp_min(1e-6))
        logger.info("cached %d training latents of shape %s; scale factor %.4f", len(latents), self.latent_shape,
                    self.scale_factor)
        latents = [z * self.scale_factor for z in latents]
        stacked = torch.stack(latents)
        self.latent_range = [float(stacked.min()), float(stacked.max())]
        labels = None if names is None else self._class_indices(names, "training")
        if labels is not None:
            logger.info("class-conditioned: %s, %s volumes per class; cfg_dropout %.2f", self.class_names,
                        [labels.count(i) for i in range(self.num_classes)], self.cfg_dropout)
        if spacings is not None:
            stacked_spacing = torch.stack(spacings)
            self.spacing_range = [stacked_spacing.min(0).values.tolist(), stacked_spacing.max(0).values.tolist()]
            distinct = len({tuple(round(v, 4) for v in s.tolist()) for s in spacings})
            logger.info("spacing-conditioned: %d distinct spacings, range %s mm", distinct, self.spacing_range)
            if distinct < 2:
                logger.warning("condition_on_spacing=true but every training volume has the spacing %s mm: the model "
                               "cannot learn what spacing changes (give items a datalist 'spacing', or pixdim "
                               "entries <= 0 to keep each volume's own spacing).", self.spacing_range[0])
        self._use_cached(_Latents(latents, labels, spacings))
        if self.val_loader is not None:
            val_names: list[str] | None = [] if self.num_classes else None
            self._val_spacings = [] if self.condition_on_spacing else None
            self._val_latents = [z * self.scale_factor
                                 for z in self._encode_all(self.val_loader, val_names, self._val_spacings)]
            self._val_labels = None if val_names is None else self._class_indices(val_names, "validation")

    def _sequential_loader(self) -> DataLoader:
        """The training set in order, unshuffled, in ``train_loader``'s batches (for encoding it once)."""
        loader = self.train_loader
        return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn)

    def _set_latent_shape(self, latents: list[torch.Tensor]) -> None:
        """Record the latent shape of the (non-empty) cached latents; it must fit the shape chain."""
        self.latent_shape = list(latents[0].shape)
        if self.expected_latent_shape is not None and self.latent_shape != self.expected_latent_shape:
            raise ValueError(f"the autoencoder produced latents of shape {self.latent_shape}, but the shape chain "
                             f"(spatial_size, autoencoder_channels, embedding_dim) gives {self.expected_latent_shape}.")

    def _use_cached(self, dataset: torch.utils.data.Dataset) -> None:
        """Replace ``train_loader`` by one over the cached ``dataset``, keeping its batch size, shuffle and seed
        (a ``ResumableSampler``, for exact resume)."""
        loader = self.train_loader
        sampler = ResumableSampler(dataset, shuffle=getattr(loader.sampler, "shuffle", True),
                                   seed=getattr(loader.sampler, "seed", 0))
        self.train_loader = DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        images, target, _, kwargs = self.prepare_batch(batch, self.device)
        with self.autocast():
            prediction = self._predict(self.model, batch, images, self.cfg_dropout, **kwargs)
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
        for i, z in enumerate(self._val_latents):
            z = z[None].to(self.device)
            noise = torch.randn(z.shape, generator=g).to(self.device)
            t = torch.randint(0, n_steps, (1,), generator=g).to(self.device)
            target = self.prepare_batch.get_target(z, noise, t)
            prediction = self._predict(self.ema.module, self._val_conditions(i), z, 0.0, noise=noise, timesteps=t)
            losses.append(self.loss_fn(prediction, target).item())
        return {"loss": sum(losses) / len(losses)}

    def _predict(self, model: nn.Module, batch: dict[str, torch.Tensor], inputs: torch.Tensor, dropout: float,
                 **kwargs: Any) -> torch.Tensor:
        """The inferer's prediction for ``inputs`` with ``model`` conditioned on the batch (see ``_conditioned``);
        ``kwargs`` (``noise``, ``timesteps``) go to the inferer. Subclasses with other conditions override it."""
        return self.inferer(inputs=inputs, diffusion_model=self._conditioned(model, batch, dropout), **kwargs)

    def _val_conditions(self, i: int) -> dict[str, torch.Tensor]:
        """The conditions of validation item ``i`` as a batch of one (class label, spacing)."""
        conditions: dict[str, torch.Tensor] = {}
        if self._val_labels is not None:
            conditions[CLASS_KEY] = torch.tensor([self._val_labels[i]])
        if self._val_spacings is not None:
            conditions[SPACING_KEY] = self._val_spacings[i][None]
        return conditions

    def state_modules(self) -> dict[str, Any]:
        modules: dict[str, Any] = {self.state_key: self.diffusion_model, "ema": self.ema.module,
                                   "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            modules["lr_scheduler"] = self.lr_scheduler
        return modules

    def extra_state(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor, "latent_shape": self.latent_shape, **self.class_info()}

    def class_info(self) -> dict[str, Any]:
        """Class conditioning written beside the weights: ``num_classes`` (0: unconditional), ``class_names``
        in index order (index ``num_classes`` is the null class) and ``cfg_dropout``."""
        if not self.num_classes:
            return {"num_classes": 0}
        return {"num_classes": self.num_classes, "class_names": list(self.class_names or []),
                "cfg_dropout": self.cfg_dropout}

    def spacing_info(self) -> dict[str, Any]:
        """Spacing conditioning written beside the weights: ``condition_on_spacing`` and, when on, the training
        ``spacing_range`` ``[[min x, y, z], [max x, y, z]]`` in mm."""
        if not self.condition_on_spacing:
            return {"condition_on_spacing": False}
        return {"condition_on_spacing": True, "spacing_range": self.spacing_range}

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
        if state.get("num_classes", 0) != self.num_classes or \
                state.get("class_names", self.class_names) != self.class_info().get("class_names", self.class_names):
            raise ValueError(
                f"the checkpoint was trained with num_classes={state.get('num_classes', 0)} "
                f"{state.get('class_names', '')} but this run has num_classes={self.num_classes} "
                f"{self.class_names or ''}: the classes changed since the checkpoint.")

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
                 "num_train_timesteps": self.prepare_batch.num_train_timesteps,
                 "noise_schedule": getattr(self.inferer.scheduler, "noise_schedule", None), "step": self.step,
                 "weights": "EMA", **self.class_info(), **self.spacing_info()},
            )
