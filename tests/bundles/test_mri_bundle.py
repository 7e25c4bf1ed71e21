# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The MRI generation bundle end to end through `python -m monai.bundle run`."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.bundles.conftest import MRI_BUNDLE, run_bundle, write_mixed_mri_dataset


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri_bundle")
    data = write_mixed_mri_dataset(root / "data")
    overrides = {"dataset_dir": str(data), "ckpt_dir": str(root / "models"), "output_dir": str(root / "samples"),
                 "npy_spacing": "[1.2,1.2,2.5]", "val_fraction": "0.25"}
    return root, overrides


@pytest.fixture(scope="module")
def trained(workspace):
    root, overrides = workspace
    run_bundle(MRI_BUNDLE, "train_autoencoder", {**overrides, "max_steps": "4", "val_interval": "2",
                                                 "ckpt_interval": "2", "adversarial_start_step": "2"})
    run_bundle(MRI_BUNDLE, "train_diffusion", {**overrides, "max_steps": "4", "val_interval": "2",
                                               "ckpt_interval": "2", "ema_start_step": "2", "warmup_steps": "2"})
    return root, overrides


def test_training_writes_weights_landmarks_and_datalist(trained):
    root, _ = trained
    models = root / "models"
    datalist = json.loads((models / "datalist.json").read_text())
    assert len(datalist["training"]) == 3 and len(datalist["validation"]) == 1
    landmarks = json.loads((models / "nyul_landmarks.json").read_text())
    assert landmarks["standard_landmarks"] == sorted(landmarks["standard_landmarks"])
    for name in ("autoencoder", "diffusion_model"):
        assert (models / f"{name}.pt").is_file() and (models / f"{name}_best.pt").is_file()
        log = [json.loads(line) for line in (models / f"{name}_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if "val_l1" in r or "val_loss" in r] == [2, 4]
    info = json.loads((models / "diffusion_model.json").read_text())
    assert info["latent_shape"] == [4, 4, 4, 4] and math.isfinite(info["scale_factor"])
    assert not list(models.rglob("*.tmp*"))


def test_inference_writes_nifti_with_training_geometry(trained):
    root, overrides = trained
    run_bundle(MRI_BUNDLE, "inference", {**overrides, "num_samples": "2", "num_inference_steps": "3",
                                         "sample_seed": "7"})
    out = root / "samples"
    files = sorted(out.glob("sample_*.nii.gz"))
    assert len(files) == 2
    for f in files:
        img = nib.load(f)
        data = img.get_fdata()
        assert img.shape == (16, 16, 16)
        assert np.allclose(img.header.get_zooms(), (2.0, 2.0, 2.0))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.isfinite(data).all() and data.min() >= 0.0 - 1e-4 and data.max() <= 100.0 + 1e-4
        png = Image.open(f.with_name(f.name.replace(".nii.gz", ".png")))
        assert png.size[0] > 16 and png.size[1] > 16
    manifest = json.loads((out / "samples.json").read_text())
    assert [s["seed"] for s in manifest["samples"]] == [7, 8]
    assert set(manifest["weights"]) == {"autoencoder.pt", "diffusion_model.pt"}
    assert manifest["synthetic"] is True
    # the same seed gives the same volume
    run_bundle(MRI_BUNDLE, "inference", {**overrides, "num_samples": "1", "num_inference_steps": "3",
                                         "sample_seed": "8", "output_dir": str(root / "again")})
    assert np.allclose(nib.load(root / "again" / "sample_000.nii.gz").get_fdata(), nib.load(files[1]).get_fdata())
