# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Generated-data arms of the label-budget experiment: the generation bundle run inside the experiment folder.

* :func:`train_generator`: the MRI generation bundle's VQ-GAN and latent diffusion model, trained on the
  unlabelled pool (stages 1 and 2, ``generator/models``);
* :func:`sample_volumes`: unconditioned samples of it, for self-supervised pre-training (``generator/samples``);
* :func:`controlnet_pairs`: a ControlNet on that frozen model, trained on one run's labelled budget only, then
  image + mask pairs sampled from the budget's masks (augmented), for supervised pre-training.

Every stage runs through the generation bundle's own configs (``python -m monai.bundle run`` or in this
process) and is skipped when its outputs exist, so the experiment resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meddiff.cli.stages import trained_weights
from meddiff.utils import atomic_write_json

__all__ = [
    "GENERATOR_STAGES",
    "controlnet_pairs",
    "default_generator_bundle",
    "sample_volumes",
    "split_generator_overrides",
    "train_generator",
]

logger = logging.getLogger(__name__)

_BASE = ["configs/common.json", "configs/train_autoencoder.json"]
#: generation-bundle stage -> config files merged in this order
GENERATOR_STAGES: dict[str, list[str]] = {
    "train_autoencoder": _BASE,
    "train_diffusion": [*_BASE, "configs/train_diffusion.json"],
    "train_controlnet": [*_BASE, "configs/train_diffusion.json", "configs/train_controlnet.json"],
    "sample": [*_BASE, "configs/inference.json"],
    "sample_controlnet": [*_BASE, "configs/inference.json", "configs/inference_controlnet.json"],
}


def default_generator_bundle() -> Path:
    """The repository's ``bundles/mri_generative_diffusion`` (for an editable install of meddiff)."""
    return Path(__file__).resolve().parents[3] / "bundles" / "mri_generative_diffusion"


def split_generator_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split generator overrides into those of every stage and per-stage ones.

    Args:
        overrides: config ids and values for every stage; a key named like a stage of :data:`GENERATOR_STAGES`
            holds a dict of overrides of that stage only, e.g. ``{"pixdim": [...], "train_diffusion":
            {"max_steps": 3000}}``.

    Returns:
        ``(common, per_stage)``.

    Raises:
        ValueError: a stage entry is not a dict.
    """
    common, per_stage = {}, {}
    for key, value in overrides.items():
        if key in GENERATOR_STAGES:
            if not isinstance(value, Mapping):
                raise ValueError(f"generator_overrides[{key!r}] must be a dict of that stage's overrides, "
                                 f"got {value!r}")
            per_stage[key] = dict(value)
        else:
            common[key] = value
    return common, per_stage


def _run(bundle: Path, stage: str, overrides: Mapping[str, Any], generator_overrides: Mapping[str, Any],
         launcher: str, log_file: Path) -> float:
    from meddiff.experiments.label_budget import run_stage

    common, per_stage = split_generator_overrides(generator_overrides)
    tic = time.perf_counter()
    run_stage(bundle, stage, {"progress": False, **common, **per_stage.get(stage, {}), **overrides},
              launcher=launcher, log_file=log_file, configs=GENERATOR_STAGES[stage])
    return time.perf_counter() - tic


def _stage_weights(models: Path) -> dict[str, str]:
    """Overrides that point a stage at the generator's stage-1 and stage-2 files in ``models``."""
    return {**trained_weights(models), "nyul_file": str(models / "nyul_landmarks.json")}


def train_generator(out: str | os.PathLike, bundle: str | os.PathLike, unlabelled_dir: str | os.PathLike,
                    generator_overrides: Mapping[str, Any], launcher: str = "subprocess") -> Path:
    """Train (or resume) the generation bundle's VQ-GAN and latent diffusion model on the unlabelled pool.

    Args:
        out: the generator folder (``models/``, logs, ``done.json``).
        bundle: the MRI generation bundle.
        unlabelled_dir: folder of unlabelled volumes (the pool).
        generator_overrides: overrides of the generation bundle (see :func:`split_generator_overrides`).
        launcher: ``"subprocess"`` or ``"inprocess"``.

    Returns:
        The ``models`` folder holding ``autoencoder.pt``, ``diffusion_model.pt`` and their info files.
    """
    out, bundle = Path(out), Path(bundle).resolve()
    models = out / "models"
    done = out / "done.json"
    if done.is_file() and (models / "diffusion_model.pt").is_file():
        logger.info("generator already trained: %s", models)
        return models
    base = {"ckpt_dir": str(models), "dataset_dir": str(Path(unlabelled_dir).resolve()), "resume": True}
    seconds = {}
    logger.info("generator stage 1 (VQ-GAN) on %s", unlabelled_dir)
    seconds["train_autoencoder"] = _run(bundle, "train_autoencoder", base, generator_overrides, launcher,
                                        out / "train_autoencoder.log")
    logger.info("generator stage 2 (latent diffusion model)")
    seconds["train_diffusion"] = _run(bundle, "train_diffusion", base, generator_overrides, launcher,
                                      out / "train_diffusion.log")
    atomic_write_json(done, {"models": str(models), "unlabelled_dir": base["dataset_dir"], "seconds": seconds})
    return models


def sample_volumes(out: str | os.PathLike, bundle: str | os.PathLike, models: str | os.PathLike, num_samples: int,
                   generator_overrides: Mapping[str, Any], launcher: str = "subprocess") -> Path:
    """Sample ``num_samples`` unconditioned volumes (seeds 0..num_samples-1), unless already written.

    Args:
        out: output folder (NIfTI volumes, PNG mosaics, ``samples.json``).
        bundle: the MRI generation bundle.
        models: the generator's ``models`` folder (:func:`train_generator`).
        num_samples: number of volumes.
        generator_overrides: overrides of the generation bundle.
        launcher: ``"subprocess"`` or ``"inprocess"``.

    Returns:
        ``out``.
    """
    out, models = Path(out), Path(models)
    manifest = out / "samples.json"
    if manifest.is_file() and len(json.loads(manifest.read_text()).get("samples", [])) >= num_samples:
        logger.info("generated volumes already written: %s", out)
        return out
    logger.info("sampling %d volumes of the generator", num_samples)
    seconds = _run(Path(bundle).resolve(), "sample", {"ckpt_dir": str(models), **_stage_weights(models),
                                                      "output_dir": str(out), "num_samples": int(num_samples),
                                                      "sample_seed": 0},
                   generator_overrides, launcher, out.parent / "sample.log")
    logger.info("sampled %d volumes in %.0f s", num_samples, seconds)
    return out


def controlnet_pairs(
    run_dir: str | os.PathLike, bundle: str | os.PathLike, models: str | os.PathLike,
    budget_cases: Sequence[Mapping[str, str]], num_pairs: int, seed: int, generator_overrides: Mapping[str, Any],
    mask_augmentation: str = "affine", num_label_classes: int = 2, launcher: str = "subprocess",
) -> dict[str, Any]:
    """Train a ControlNet on the budget's labelled cases only and sample image + mask pairs from their masks.

    Nothing outside ``budget_cases`` is read: the ControlNet's datalist, validation included, is the budget,
    and the masks it is sampled from are the budget's masks (augmented, seeded, so pairs are new).

    Args:
        run_dir: folder of this (budget, seed) generation (``controlnet/``, ``masks/``, ``pairs/``).
        bundle: the MRI generation bundle.
        models: the generator's ``models`` folder (frozen stage-1 and stage-2 weights).
        budget_cases: the labelled budget, items ``{"image", "label"}`` with absolute paths.
        num_pairs: pairs to sample at least (``ceil(num_pairs / len(budget_cases))`` per mask).
        seed: seeds the ControlNet training and the sampling.
        generator_overrides: overrides of the generation bundle.
        mask_augmentation: ``"off"``, ``"affine"`` or ``"elastic"``.
        num_label_classes: label values of the masks (background included).
        launcher: ``"subprocess"`` or ``"inprocess"``.

    Returns:
        ``{"pairs_dir", "datalist", "num_pairs", "train_seconds", "sample_seconds"}``; ``datalist`` is the
        pairs' ``dataset.json`` (MONAI's convention, paths relative to ``pairs_dir``).
    """
    run_dir, bundle, models = Path(run_dir), Path(bundle).resolve(), Path(models)
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    cases = [{"image": str(c["image"]), "label": str(c["label"])} for c in budget_cases]
    atomic_write_json(run_dir / "controlnet_datalist.json", {"training": cases, "validation": cases[:1]})
    weights = _stage_weights(models)
    cn_dir = run_dir / "controlnet"
    stage = {"ckpt_dir": str(cn_dir), **weights, "seed": int(seed), "num_label_classes": int(num_label_classes),
             "controlnet_datalist_file": str(run_dir / "controlnet_datalist.json"), "resume": True}
    logger.info("ControlNet on %d budget cases (seed %d)", len(cases), seed)
    train_s = _run(bundle, "train_controlnet", stage, generator_overrides, launcher, run_dir / "train_controlnet.log")
    masks = run_dir / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    for case in cases:  # copies: the sampler names each pair after its mask
        if not (masks / Path(case["label"]).name).is_file():
            shutil.copy2(case["label"], masks / Path(case["label"]).name)
    per_mask = math.ceil(num_pairs / len(cases))
    pairs = run_dir / "pairs"
    sample = {"ckpt_dir": str(cn_dir), **weights, "controlnet_weights": str(cn_dir / "controlnet.pt"),
              "controlnet_info_file": str(cn_dir / "controlnet.json"), "mask_dir": str(masks),
              "num_samples_per_mask": per_mask, "mask_augmentation": mask_augmentation,
              "sample_seed": int(seed) * 100_000, "output_dir": str(pairs)}
    sample_s = _run(bundle, "sample_controlnet", sample, generator_overrides, launcher,
                    run_dir / "sample_controlnet.log")
    result = {"pairs_dir": str(pairs), "datalist": str(pairs / "dataset.json"),
              "num_pairs": per_mask * len(cases), "train_seconds": train_s, "sample_seconds": sample_s}
    atomic_write_json(done, result)
    return result
