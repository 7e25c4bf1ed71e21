# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The breast segmentation bundle's demo, on procedural PHANTOMS (not patient data).

By default (:func:`run_breast_demo`) it segments held-out demo phantoms with the weights shipped in
``bundles/breast_mri_segmentation/models/model.pt`` through the bundle's own ``inference.json`` and
``evaluate.json`` (seconds on a CPU), and reports their Dice. With ``train=True`` it first retrains
those weights exactly as they were made (:func:`train_breast_demo_model`, the command in the bundle's
docs) and segments with the new ones, then runs a tiny label-budget experiment (pre-training on
unlabelled phantoms, training from scratch and from the pre-trained weights at two label budgets
with two seeds; ``summary.csv`` and ``dice_vs_budget.png``), whose numbers only show that the
pipeline works, not what pre-training is worth.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from meddiff.data.phantoms import PHANTOM_DESCRIPTION, PHANTOM_LABELS, make_breast_phantom, write_breast_phantoms
from meddiff.experiments.label_budget import default_bundle, run_label_budget_experiment, run_stage
from meddiff.utils import atomic_write_json

__all__ = [
    "DEMO_BREAST_OVERRIDES",
    "DEMO_MODEL_PHANTOMS",
    "DEMO_MODEL_TRAIN",
    "run_breast_demo",
    "segment_breast_demo",
    "train_breast_demo_model",
    "write_demo_test_phantoms",
]

logger = logging.getLogger(__name__)

#: the labelled phantom set the shipped weights were trained on (meddiff.data.phantoms defaults otherwise:
#: 96 x 64 x 40 voxels over 360 x 220 x 180 mm); the last ``num_test`` cases are held out
DEMO_MODEL_PHANTOMS: dict[str, Any] = {"num_cases": 26, "num_test": 6, "shape": (96, 64, 40), "seed": 1}
#: train.json overrides of the shipped weights (the bundle's default network and grid; smaller training crops
#: than the default 64 x 64 x 48 to fit a shared CPU)
DEMO_MODEL_TRAIN: dict[str, Any] = {
    "max_steps": 200,
    "val_interval": 50,
    "ckpt_interval": 50,
    "log_interval": 25,
    "patch_size": [48, 48, 32],
    "learning_rate": 0.005,
    "batch_size": 2,
    "num_crops": 1,
    "num_workers": 0,
    "progress": False,
    "seed": 0,
}

#: phantom geometry and network/schedule overrides of the tiny label-budget experiment (all stages)
DEMO_PHANTOM_SHAPE = (48, 32, 24)
DEMO_BREAST_OVERRIDES: dict[str, Any] = {
    "pixdim": [7.5, 6.875, 7.5],
    "patch_size": [48, 32, 24],
    "unet_channels": [8, 16, 32],
    "unet_strides": [2, 2],
    "unet_res_units": 1,
    "batch_size": 2,
    "num_crops": 1,
    "learning_rate": 0.005,
    "sw_batch_size": 1,
    "num_workers": 0,
    "progress": False,
    "log_interval": 20,
}
DEMO_PRETRAIN = {"max_steps": 60, "val_interval": 60, "ckpt_interval": 60}
DEMO_TRAIN = {"max_steps": 40, "val_interval": 20, "ckpt_interval": 40}


def write_demo_test_phantoms(folder: str | Path) -> Path:
    """Write the held-out phantoms of :data:`DEMO_MODEL_PHANTOMS` (the cases the shipped weights never saw).

    They are the same volumes as ``imagesTs/`` of ``write_breast_phantoms(**DEMO_MODEL_PHANTOMS)``, drawn
    alone (no need to draw the training cases), with a ``dataset.json`` listing them as the ``test`` split.

    Args:
        folder: destination (``imagesTs/``, ``labelsTs/``, ``dataset.json``).

    Returns:
        The ``dataset.json`` path.
    """
    out = Path(folder)
    n, n_test, seed = (DEMO_MODEL_PHANTOMS[k] for k in ("num_cases", "num_test", "seed"))
    test = []
    for i in range(n - n_test, n):
        ph = make_breast_phantom(DEMO_MODEL_PHANTOMS["shape"], seed=seed * 100_003 + i)
        name = f"phantom_{i:03d}.nii.gz"
        for sub, data, dtype in (("imagesTs", ph.image, np.float32), ("labelsTs", ph.mask, np.uint8)):
            img = nib.Nifti1Image(np.ascontiguousarray(data.astype(dtype)), ph.affine)
            img.set_sform(ph.affine, code=1)
            img.set_qform(ph.affine, code=1)
            img.header.set_xyzt_units(xyz="mm")
            img.header["descrip"] = PHANTOM_DESCRIPTION.encode()
            (out / sub).mkdir(parents=True, exist_ok=True)
            nib.save(img, out / sub / name)
        test.append({"image": f"imagesTs/{name}", "label": f"labelsTs/{name}"})
    path = out / "dataset.json"
    atomic_write_json(path, {"name": "meddiff breast MRI phantoms (held-out demo cases)", "phantom": True,
                             "description": "PROCEDURAL PHANTOMS, not patient data.", "labels": PHANTOM_LABELS,
                             "training": [], "test": test})
    return path


def train_breast_demo_model(output_dir: str | Path = "demo_output/breast/model", launcher: str = "subprocess",
                            bundle: str | Path | None = None) -> Path:
    """Retrain the shipped breast weights: the demo phantoms, then ``train.json`` with :data:`DEMO_MODEL_TRAIN`.

    Args:
        output_dir: folder for ``phantoms/`` and ``models/`` (``model.pt`` = best validation Dice).
        launcher: ``"subprocess"`` (``python -m monai.bundle run``, the documented command) or ``"inprocess"``.
        bundle: the breast bundle (default: the repository's).

    Returns:
        The trained ``model.pt``.
    """
    out = Path(output_dir).resolve()
    bundle_dir = Path(bundle).resolve() if bundle is not None else default_bundle()
    phantoms = out / "phantoms"
    if not (phantoms / "dataset.json").is_file():
        write_breast_phantoms(phantoms, **DEMO_MODEL_PHANTOMS)
    tic = time.perf_counter()
    run_stage(bundle_dir, "train", {**DEMO_MODEL_TRAIN, "dataset_dir": str(phantoms), "ckpt_dir": str(out / "models")},
              launcher=launcher, log_file=out / "train.log" if launcher == "subprocess" else None)
    logger.info("trained the breast demo model in %.0f s: %s", time.perf_counter() - tic, out / "models" / "model.pt")
    return out / "models" / "model.pt"


def segment_breast_demo(output_dir: str | Path = "demo_output/breast", model_file: str | Path | None = None,
                        bundle: str | Path | None = None) -> dict[str, Any]:
    """Segment the held-out demo phantoms with ``model_file`` (default: the shipped weights) and score them.

    Runs the bundle's ``inference.json`` (masks in ``<output_dir>/masks/``) and ``evaluate.json`` (Dice,
    HD95, ASD in ``<output_dir>/eval/``) in this process.

    Args:
        output_dir: demo folder.
        model_file: weights of the bundle's default network.
        bundle: the breast bundle (default: the repository's).

    Returns:
        The evaluation summary (``metrics.dice_breast.mean`` etc.).

    Raises:
        FileNotFoundError: no weights file.
    """
    out = Path(output_dir).resolve()
    bundle_dir = Path(bundle).resolve() if bundle is not None else default_bundle()
    model = Path(model_file).resolve() if model_file is not None else bundle_dir / "models" / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"breast weights {model} not found (retrain them: make demo-train)")
    datalist = write_demo_test_phantoms(out / "phantoms")
    common = {"device": "cpu", "model_file": str(model), "num_workers": 0, "progress": False}
    run_stage(bundle_dir, "inference", {**common, "dataset_dir": str(out / "phantoms" / "imagesTs"),
                                        "output_dir": str(out / "masks")}, launcher="inprocess")
    run_stage(bundle_dir, "evaluate", {**common, "dataset_dir": str(out / "phantoms"), "datalist_file": str(datalist),
                                       "output_dir": str(out / "eval")}, launcher="inprocess")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    logger.info("breast demo: whole-breast Dice %.3f (mean of %d held-out PHANTOMS) with %s; masks in %s",
                summary["metrics"]["dice_breast"]["mean"], summary["num_cases"], model, out / "masks")
    return summary


def run_breast_demo(output_dir: str | Path = "demo_output/breast", train: bool = False, launcher: str = "inprocess",
                    num_threads: int | None = 1) -> str:
    """Segment held-out phantoms with the shipped weights; with ``train`` retrain them and run the experiment first.

    Args:
        output_dir: demo folder: ``phantoms/``, ``masks/``, ``eval/``; with ``train`` also ``model/`` (the
            retrained weights) and ``experiment/`` (the tiny label-budget experiment).
        train: retrain the weights (minutes) and run the label-budget experiment, then segment with the
            retrained weights.
        launcher: ``"inprocess"`` or ``"subprocess"`` for the training stages.
        num_threads: torch CPU threads during the demo (``None``: unchanged).

    Returns:
        The demo folder.
    """
    out = Path(output_dir).resolve()
    tic = time.perf_counter()
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        model = None
        if train:
            model = train_breast_demo_model(out / "model", launcher=launcher)
            _run_experiment(out, launcher)
        segment_breast_demo(out, model_file=model)
    finally:
        torch.set_num_threads(threads)
    logger.info("breast demo finished in %.0f s (PHANTOM data): %s", time.perf_counter() - tic, out)
    return str(out)


def _run_experiment(out: Path, launcher: str) -> None:
    labelled = out / "phantoms_labelled"
    unlabelled = out / "phantoms_unlabelled"
    if not (labelled / "dataset.json").is_file():
        write_breast_phantoms(labelled, num_cases=14, num_test=4, shape=DEMO_PHANTOM_SHAPE, seed=1)
    if not (unlabelled / "phantoms.json").is_file():
        write_breast_phantoms(unlabelled, num_cases=8, labels=False, shape=DEMO_PHANTOM_SHAPE, seed=2)
    result = run_label_budget_experiment(
        labelled / "dataset.json", out / "experiment", unlabelled_dir=unlabelled, budgets=(2, 6), seeds=(0, 1),
        num_val=2, overrides=DEMO_BREAST_OVERRIDES, pretrain_overrides=DEMO_PRETRAIN, train_overrides=DEMO_TRAIN,
        launcher=launcher)
    logger.info("label-budget experiment: %s and %s (PHANTOM data)", result["summary_csv"], result["plot"])
