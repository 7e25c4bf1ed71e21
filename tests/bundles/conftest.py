# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Helpers to run the bundles through the real ``python -m monai.bundle run`` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid

from meddiff.data import write_dicom_series
from meddiff.data.demo import write_decoy_series
from tests.helpers import TINY_OVERRIDES, blob_volume

REPO = Path(__file__).resolve().parents[2]
MRI_BUNDLE = REPO / "bundles" / "mri_generative_diffusion"
CT_BUNDLE = REPO / "bundles" / "ct_generative_diffusion"
STAGE_CONFIGS = {
    "train_autoencoder": ["common", "train_autoencoder"],
    "train_diffusion": ["common", "train_autoencoder", "train_diffusion"],
    "inference": ["common", "train_autoencoder", "inference"],
}


def bundle_command(bundle: Path, stage: str, overrides: dict[str, str], extra_configs: list[str] = (),
                   launcher: list[str] | None = None, absolute: bool = False) -> list[str]:
    prefix = f"{bundle}/configs" if absolute else "configs"
    configs = [f"{prefix}/{name}.json" for name in STAGE_CONFIGS[stage]] + list(extra_configs)
    cmd = (launcher or [sys.executable]) + ["-m", "monai.bundle", "run", "--config_file",
                                            "[" + ",".join(f"'{c}'" for c in configs) + "]"]
    if "bundle_root" not in overrides:  # an explicit None: rely on the default "." (cwd = bundle folder)
        cmd += ["--bundle_root", str(bundle)]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for key, value in {**TINY_OVERRIDES, **overrides}.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_bundle(bundle: Path, stage: str, overrides: dict[str, str], extra_configs: list[str] = (),
               check: bool = True, launcher: list[str] | None = None, timeout: int = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one workflow (from the bundle folder unless ``cwd`` is given); on unexpected failure show its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = bundle_command(bundle, stage, overrides, extra_configs, launcher, absolute=cwd is not None)
    proc = subprocess.run(cmd, cwd=cwd or bundle, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{stage} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_mixed_mri_dataset(root: Path) -> Path:
    """Four tiny MRI volumes in every supported input form: NIfTI (RAS and LPS), a DICOM series, an .npy stack."""
    root.mkdir(parents=True, exist_ok=True)
    ras = np.diag([1.8, 1.6, 2.4, 1.0])
    ras[:3, 3] = [-20.0, -15.0, 10.0]
    nib.save(nib.Nifti1Image(blob_volume(seed=1), ras), root / "sub-01_T1w.nii.gz")
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(blob_volume((16, 16, 16), seed=2), lps), root / "sub-02_T1w.nii")
    dicom_affine = np.diag([1.5, 1.5, 3.0, 1.0])
    write_dicom_series(blob_volume((22, 22, 10), seed=3), dicom_affine, root / "sub-03" / "series-1", modality="MR",
                       series_description="T1 axial")
    np.save(root / "case-04.npy", np.moveaxis(blob_volume((18, 18, 12), seed=4), -1, 0))  # slices x H x W
    return root


def ct_phantom(shape: tuple[int, int, int] = (20, 20, 18), seed: int = 0) -> np.ndarray:
    """A tiny chest-like CT in HU (float32): air, a soft-tissue body, two lungs, a bone, CT noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(x / 0.85) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    for side in (-1, 1):
        hu[((x - side * 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 0.9) ** 2 < 1] = -850.0
    hu[(x**2 + (y + 0.55) ** 2) < 0.02] = 700.0 + 100 * rng.random()
    return (hu + rng.normal(0.0, 8.0, shape)).astype(np.float32)


def write_ct_patient(root: Path, patient_id: str, volume: np.ndarray, affine: np.ndarray,
                     decoys: tuple[str, ...] = ("CR", "SR"), series: str = "ct-axial") -> Path:
    """Write ``root/<patient_id>/study-1/<series>/`` (CT, int16 + intercept -1024) and one-file decoy series.

    Returns:
        The CT series folder.
    """
    study = root / patient_id / "study-1"
    study_uid = generate_uid()
    folder = write_dicom_series(volume, affine, study / series, modality="CT", patient_id=patient_id,
                                patient_name=f"TEST^{patient_id}", rescale_intercept=-1024.0,
                                series_description="CHEST CT", extra={"StudyInstanceUID": study_uid})[0].parent
    for kind in decoys:
        write_decoy_series(study / f"{kind.lower()}-decoy", kind, patient_id, study_uid)
    return folder
