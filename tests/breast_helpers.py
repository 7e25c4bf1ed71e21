# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Tiny phantom data and settings for the breast segmentation bundle's tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meddiff.data.phantoms import write_breast_phantoms
from meddiff.experiments.label_budget import stage_command

REPO = Path(__file__).resolve().parents[1]
BREAST_BUNDLE = REPO / "bundles" / "breast_mri_segmentation"
PHANTOM_SHAPE = (32, 32, 16)  # with the default field of view: 11.25 x 6.875 x 11.25 mm voxels

# Overrides that shrink every breast workflow to seconds on a CPU (whole 32x32x16 volumes as patches).
BREAST_TINY: dict[str, Any] = {
    "pixdim": [11.25, 6.875, 11.25],
    "patch_size": [32, 32, 16],
    "unet_channels": [8, 16, 32],
    "unet_strides": [2, 2],
    "unet_res_units": 1,
    "batch_size": 2,
    "num_crops": 1,
    "learning_rate": 0.005,
    "sw_batch_size": 1,
    "num_workers": 0,
    "progress": False,
    "log_interval": 1,
}


def write_breast_datasets(root: Path, num_labelled: int = 8, num_test: int = 2,
                          num_unlabelled: int = 4) -> tuple[Path, Path]:
    """A labelled phantom set (``dataset.json`` with a test split) and an unlabelled one."""
    labelled, unlabelled = root / "labelled", root / "unlabelled"
    write_breast_phantoms(labelled, num_cases=num_labelled, num_test=num_test, shape=PHANTOM_SHAPE, seed=1)
    write_breast_phantoms(unlabelled, num_cases=num_unlabelled, labels=False, shape=PHANTOM_SHAPE, seed=2)
    return labelled, unlabelled


def run_breast(stage: str, overrides: dict[str, Any], configs: list[str] | None = None,
               launcher: list[str] | None = None, check: bool = True,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a breast workflow through the real ``python -m monai.bundle run`` from the bundle folder.

    ``stage`` is ``pretrain``, ``train`` or ``evaluate`` (with ``configs=None``), or any name when ``configs``
    lists the config files; ``launcher`` replaces ``[python]`` (e.g. torchrun).
    """
    settings = {**BREAST_TINY, **overrides}
    if configs is None:
        cmd = stage_command(BREAST_BUNDLE, stage, settings)
    else:
        cmd = stage_command(BREAST_BUNDLE, "train", settings)
        cmd[cmd.index("--config_file") + 1] = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    if launcher is not None:
        cmd = launcher + cmd[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=BREAST_BUNDLE, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{stage} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
