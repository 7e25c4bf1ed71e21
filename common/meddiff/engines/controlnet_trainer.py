# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Stage 3: a ControlNet on the frozen latent diffusion model, conditioned on label maps."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import ControlNetDiffusionInferer
from torch import nn
from torch.utils.data import DataLoader

from meddiff.data.class_labels import CLASS_KEY
from meddiff.engines.diffusion_trainer import DiffusionTrainer
from meddiff.engines.trainer import TrainerSettings, _unwrap, guard_cpu_bf16_convs
from meddiff.transforms.label_maps import one_hot_labels
from meddiff.utils import atomic_write_json

__all__ = ["ControlNetTrainer"]

logger = logging.getLogger(__name__)


class _LatentsAndLabels(torch.utils.data.Dataset):
    def __init__(self, latents: list[torch.Tensor], labels: list[torch.Tensor],
                 classes: list[int] | None = None) -> None:
        self.latents = latents
        self.labels = labels
        self.classes = classes

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": self.latents[i], "label": self.labels[i]}
        if self.classes is not None:
            item[CLASS_KEY] = torch.tensor(self.classes[i], dtype=torch.long)
        return item


class ControlNetTrainer(DiffusionTrainer):
    """Train a ControlNet on a frozen, trained latent denoiser; the condition is the one-hot label map.

    Reuses :class:`~meddiff.engines.DiffusionTrainer` (and so the base trainer's exact resume, EMA, DDP, bf16,
    progress and logs) with the ControlNet as the trained network: the denoiser is frozen and only the
    ControlNet's parameters are optimised. Every item of the labelled datalist (``image`` + ``label``, MONAI's
    ``dataset.json`` convention) is encoded once by the frozen autoencoder (scaled by the denoiser's
    ``scale_factor``) and its label map kept as integers at image resolution; each step noises the latent, runs
    MONAI's ``ControlNetDiffusionInferer`` (ControlNet residuals into the denoiser) and fits the denoiser's
    training target. Written beside the weights: ``<name>.pt`` (EMA ControlNet) and ``<name>.json``
    (``num_label_classes``, ``scale_factor``, ``latent_shape``, objective, ``num_classes``/``class_names``).

    Class + mask conditioning: with a class-conditioned denoiser (``num_classes > 0``, ``num_class_embeds =
    num_classes + 1``; the ControlNet copies its class embedding) every item carries a ``class_label`` (a class
    name, ``meddiff.data.with_class_labels``), mapped to the denoiser's class indices by ``class_names`` (the
    order recorded in its latent info). Each step draws one set of class labels per batch (a label replaced by
    the null class ``num_classes`` with probability ``cfg_dropout``, as stage 2 does) and gives the same labels to
    the ControlNet and the denoiser; validation uses every item's own class.

    Args:
        autoencoder: trained stage-1 model (frozen).
        diffusion_model: trained stage-2 denoiser (frozen here; it must take ``down_block_additional_residuals``
            and ``mid_block_additional_residual``).
        controlnet: the ControlNet (``meddiff.networks.controlnet_from_denoiser`` copies the encoder weights).
        optimizer: optimiser over the ControlNet's parameters.
        inferer: MONAI ``ControlNetDiffusionInferer`` over the stage-2 training scheduler.
        prepare_batch: a ``DiffusionPrepareBatch`` (``meddiff.engines.diffusion_prepare_batch``).
        train_loader: batches of dicts with ``image`` (N, 1, H, W, D) and ``label`` (N, 1, H, W, D).
        settings: run control (device, steps, checkpoints, DDP, bf16).
        num_label_classes: classes of the label maps, background included (values ``0..num_label_classes-1``).
        scale_factor: the denoiser's latent scale factor (``latent_info_file``).
        val_loader: validation batches or ``None``.
        lr_scheduler: optional LR schedule stepped every step.
        loss: ``"l1"`` or ``"l2"``.
        ema_decay: EMA decay of the saved weights.
        ema_update_every: EMA update interval.
        ema_start_step: EMA follows the weights before this step.
        grad_clip: max gradient norm (``None``: no clipping).
        name: stage name in file names.
        max_epochs: passes over the training set instead of ``settings.max_steps``.
        latent_shape: expected latent shape (``meddiff.engines.check_shape_chain``).
        num_classes: classes of the class-conditioned denoiser (``num_classes`` of its latent info; 0:
            unconditional).
        class_names: the denoiser's class names in index order (``class_names`` of its latent info); required
            when ``num_classes > 0``.
        cfg_dropout: probability that a training label is replaced by the null class (classifier-free guidance).

    Raises:
        ValueError: bad ``num_label_classes``, a denoiser or ControlNet whose class embedding does not fit
            ``num_classes``, ``class_names`` missing or not ``num_classes`` long, a spacing-conditioned denoiser;
            at setup, label maps with values outside ``0..num_label_classes-1`` (naming the file), items without
            a ``label``, or (class-conditioned) items without a ``class_label`` or with a class the denoiser does
            not know (the message lists the known ones).
    """

    state_key = "controlnet"

    def __init__(
        self,
        autoencoder: nn.Module,
        diffusion_model: nn.Module,
        controlnet: nn.Module,
        optimizer: torch.optim.Optimizer,
        inferer: ControlNetDiffusionInferer,
        prepare_batch: DiffusionPrepareBatch,
        train_loader: DataLoader,
        settings: TrainerSettings,
        num_label_classes: int,
        scale_factor: float,
        val_loader: DataLoader | None = None,
        lr_scheduler: Any = None,
        loss: str = "l1",
        ema_decay: float = 0.995,
        ema_update_every: int = 10,
        ema_start_step: int = 2000,
        grad_clip: float | None = 1.0,
        name: str = "controlnet",
        max_epochs: int | None = None,
        latent_shape: Sequence[int] | None = None,
        num_classes: int = 0,
        class_names: Sequence[str] | None = None,
        cfg_dropout: float = 0.1,
    ) -> None:
        if int(num_label_classes) < 2:
            raise ValueError(f"num_label_classes must be >= 2 (background and at least one class), got "
                             f"{num_label_classes}.")
        num_classes = int(num_classes)
        embeds = num_classes + 1 if num_classes > 0 else None
        for key, net in (("diffusion_def", diffusion_model), ("controlnet_def", controlnet)):
            if (getattr(net, "num_class_embeds", None) or None) != embeds:
                raise ValueError(f"num_classes={num_classes} (the denoiser's latent_info_file) needs a {key} with "
                                 f"num_class_embeds={embeds}, got {getattr(net, 'num_class_embeds', None)}: build "
                                 "diffusion_def and controlnet_def with num_class_embeds from num_classes.")
        if num_classes > 0 and (class_names is None or len(class_names) != num_classes):
            raise ValueError(f"num_classes={num_classes} needs the denoiser's {num_classes} class_names in index order "
                             f"(class_names of its latent_info_file), got {class_names!r}.")
        if getattr(diffusion_model, "condition_on_spacing", False):
            raise ValueError("the ControlNet stage supports denoisers without spacing conditioning only "
                             "(condition_on_spacing=false).")
        if not isinstance(inferer, ControlNetDiffusionInferer):
            raise ValueError(f"inferer must be a MONAI ControlNetDiffusionInferer, got {type(inferer).__name__}.")
        super().__init__(autoencoder=autoencoder, diffusion_model=controlnet, optimizer=optimizer, inferer=inferer,
                         prepare_batch=prepare_batch, train_loader=train_loader, settings=settings,
                         val_loader=val_loader, lr_scheduler=lr_scheduler, loss=loss, scale_factor=float(scale_factor),
                         ema_decay=ema_decay, ema_update_every=ema_update_every, ema_start_step=ema_start_step,
                         grad_clip=grad_clip, name=name, max_epochs=max_epochs, latent_shape=latent_shape,
                         num_classes=num_classes, cfg_dropout=cfg_dropout, class_names=class_names)
        self.num_label_classes = int(num_label_classes)
        self.controlnet = self.diffusion_model
        self.denoiser = diffusion_model.to(self.device).eval().requires_grad_(False)
        if self.amp and self.device.type == "cpu":
            guard_cpu_bf16_convs(self.denoiser)
        self._val_labels_maps: list[torch.Tensor] = []

    def _encode_pairs(self, loader: DataLoader, source: str = "training"
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int] | None]:
        """Latents, uint8 label maps (checked against ``num_label_classes``) and, class-conditioned, the class
        indices of every item."""
        latents, labels = [], []
        names: list[str] | None = [] if self.num_classes else None
        with torch.no_grad():
            for batch in loader:
                if "label" not in batch:
                    raise ValueError("the ControlNet stage needs a 'label' for every item (dataset.json with "
                                     "image + label).")
                if names is not None:
                    if CLASS_KEY not in batch:
                        raise ValueError(f"the denoiser is class-conditioned (num_classes={self.num_classes}, classes "
                                         f"{self.class_names}) but the {source} items of controlnet_datalist_file "
                                         f"have no '{CLASS_KEY}': add one to every item or give a labels_file CSV.")
                    names.extend(str(c) for c in batch[CLASS_KEY])
                z = self.autoencoder.encode_stage_2_inputs(batch["image"].to(self.device))
                latents.extend((z * self.scale_factor).cpu().unbind(0))
                files = getattr(batch["label"], "meta", {}).get("filename_or_obj")
                for k, label in enumerate(batch["label"].unbind(0)):
                    named = isinstance(files, (list, tuple)) and k < len(files)
                    one_hot_labels(label[None], self.num_label_classes,
                                   str(files[k]) if named else f"label map of item {len(labels)}")
                    labels.append(label.round().to(torch.uint8))
        return latents, labels, None if names is None else self._class_indices(names, source)

    def _class_indices(self, names: list[str], source: str) -> list[int]:
        """The denoiser's class indices (``class_names`` order) of class names.

        Raises:
            ValueError: a class the denoiser was not trained on (the message lists the known ones).
        """
        index = {name: i for i, name in enumerate(self.class_names or [])}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(f"the {source} set of controlnet_datalist_file has classes {unknown} the denoiser does "
                             f"not know: its classes are {self.class_names} (latent_info_file; class_label / "
                             "labels_file).")
        return [index[name] for name in names]

    def setup(self) -> None:
        """Encode and cache the training (and validation) latents with their label maps."""
        latents, labels, classes = self._encode_pairs(self._sequential_loader())
        if not latents:
            raise ValueError("the training set is empty: no labelled volumes to train on.")
        self._set_latent_shape(latents)
        stacked = torch.stack(latents)
        self.latent_range = [float(stacked.min()), float(stacked.max())]
        logger.info("cached %d latent + label map pairs, latents %s, %d label classes", len(latents),
                    self.latent_shape, self.num_label_classes)
        if classes is not None:
            logger.info("class-conditioned: %s, %s volumes per class; cfg_dropout %.2f", self.class_names,
                        [classes.count(i) for i in range(self.num_classes)], self.cfg_dropout)
        self._use_cached(_LatentsAndLabels(latents, labels, classes))
        if self.val_loader is not None:
            self._val_latents, self._val_labels_maps, self._val_labels = self._encode_pairs(self.val_loader,
                                                                                            "validation")

    def _predict(self, model: nn.Module, batch: dict[str, torch.Tensor], inputs: torch.Tensor, dropout: float,
                 **kwargs: Any) -> torch.Tensor:
        """The frozen denoiser's prediction with ``model`` (the ControlNet) given the batch's one-hot label maps;
        class-conditioned, ONE draw of class labels (``dropout``: share replaced by the null class, see
        ``DiffusionTrainer._class_labels``) goes to both the ControlNet and the denoiser."""
        cond = one_hot_labels(batch["label"].to(self.device), self.num_label_classes)
        controlnet, denoiser = model, self.denoiser
        labels = self._class_labels(batch, dropout)
        if labels is not None:
            controlnet = functools.partial(model, class_labels=labels)
            denoiser = functools.partial(self.denoiser, class_labels=labels)
        return self.inferer(inputs=inputs, diffusion_model=denoiser, controlnet=controlnet, cn_cond=cond, **kwargs)

    def _val_conditions(self, i: int) -> dict[str, torch.Tensor]:
        return {**super()._val_conditions(i), "label": self._val_labels_maps[i][None]}

    def extra_state(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor, "latent_shape": self.latent_shape,
                "num_label_classes": self.num_label_classes, **self.class_info()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if int(state.get("num_label_classes", self.num_label_classes)) != self.num_label_classes:
            raise ValueError(f"the checkpoint was trained with num_label_classes={state['num_label_classes']} but "
                             f"this run has num_label_classes={self.num_label_classes}.")

    def save_checkpoint(self) -> None:
        super(DiffusionTrainer, self).save_checkpoint()
        if self.is_main:
            atomic_write_json(
                Path(self.ckpt_dir) / f"{self.name}.json",
                {"num_label_classes": self.num_label_classes, "scale_factor": self.scale_factor,
                 "latent_shape": self.latent_shape, "objective": self.objective,
                 "prediction_type": str(getattr(self.inferer.scheduler, "prediction_type", None)),
                 "num_train_timesteps": self.prepare_batch.num_train_timesteps, "step": self.step,
                 "weights": "EMA", "controlnet": type(_unwrap(self.controlnet)).__name__, **self.class_info()},
            )
