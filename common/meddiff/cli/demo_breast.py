# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The breast segmentation bundle's demo: a tiny label-budget experiment on procedural PHANTOMS.

Writes labelled phantoms (the "real" labelled set), unlabelled phantoms (standing in for the
synthetic volumes of the generation bundle), pre-trains once, trains from scratch and from the
pre-trained weights at two label budgets with two seeds, evaluates on a fixed test set, and writes
``summary.csv`` and ``dice_vs_budget.png``. Sizes are cut so it runs in about two minutes on 2 CPU
cores; the numbers only show that the pipeline works, not what pre-training is worth.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from meddiff.data.phantoms import write_breast_phantoms
from meddiff.experiments.label_budget import run_label_budget_experiment

__all__ = ["DEMO_BREAST_OVERRIDES", "run_breast_demo"]

logger = logging.getLogger(__name__)

#: phantom geometry and network/schedule overrides of the demo (all stages)
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


def run_breast_demo(output_dir: str | Path = "demo_output/breast", launcher: str = "inprocess",
                    num_threads: int | None = 1) -> str:
    """Generate phantoms and run the tiny label-budget experiment; return the experiment folder.

    Args:
        output_dir: folder for the phantoms (``phantoms_labelled/``, ``phantoms_unlabelled/``) and the
            experiment (``experiment/``).
        launcher: ``"inprocess"`` (fast) or ``"subprocess"`` (one ``python -m monai.bundle run`` per stage).
        num_threads: torch CPU threads during the demo (tiny networks run best on one; ``None``: unchanged).

    Returns:
        The experiment folder holding ``summary.csv`` and ``dice_vs_budget.png``.
    """
    out = Path(output_dir).resolve()
    tic = time.perf_counter()
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(out, launcher, tic)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, launcher: str, tic: float) -> str:
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
    logger.info("breast demo finished in %.0f s: %s and %s (PHANTOM data)", time.perf_counter() - tic,
                result["summary_csv"], result["plot"])
    return str(out / "experiment")
