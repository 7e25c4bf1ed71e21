# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The MRI generation bundle end to end through `python -m monai.bundle run`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from meddiff.data import write_dicom_series
from tests.bundles.conftest import MRI_BUNDLE, run_bundle, write_mixed_mri_dataset
from tests.helpers import blob_volume


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of the bundle run as a user would: from its folder, given only data and size overrides."""
    root = tmp_path_factory.mktemp("mri_bundle")
    data = write_mixed_mri_dataset(root / "data")
    bundle = shutil.copytree(MRI_BUNDLE, root / "bundle")
    overrides = {"bundle_root": None, "dataset_dir": str(data), "npy_spacing": "[1.2,1.2,2.5]",
                 "val_fraction": "0.25"}
    return bundle, overrides


@pytest.fixture(scope="module")
def trained(workspace):
    bundle, overrides = workspace
    run_bundle(bundle, "train_autoencoder", {**overrides, "max_steps": "4", "val_interval": "2",
                                                 "ckpt_interval": "2", "adversarial_start_step": "2"})
    run_bundle(bundle, "train_diffusion", {**overrides, "max_steps": "4", "val_interval": "2",
                                           "ckpt_interval": "2", "ema_start_step": "2", "warmup_steps": "2"})
    return bundle, overrides


def test_training_writes_weights_landmarks_and_datalist(trained):
    bundle, _ = trained
    models = bundle / "models"
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
    bundle, overrides = trained
    run_bundle(bundle, "inference", {**overrides, "num_samples": "2", "num_inference_steps": "3",
                                     "sample_seed": "7"})
    out = bundle / "outputs"
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
    lo, hi = manifest["latent_clip_range"]
    assert lo < hi  # x0 estimates clipped to the training latents' range
    # the same seed gives the same volume
    run_bundle(bundle, "inference", {**overrides, "num_samples": "1", "num_inference_steps": "3",
                                     "sample_seed": "8", "output_dir": str(bundle / "again")})
    assert np.allclose(nib.load(bundle / "again" / "sample_000.nii.gz").get_fdata(), nib.load(files[1]).get_fdata())


def test_inference_at_another_spatial_size(trained):
    """Trained on 16^3 (latent 4^3): sampled at 24 x 16 x 20 through the CLI (any size 4x compression and the
    denoiser's one in-plane halving divide); a size it cannot make fails with the nearest valid sizes."""
    bundle, overrides = trained
    out = bundle / "outputs_24x16x20"
    run_bundle(bundle, "inference", {**overrides, "num_samples": "1", "num_inference_steps": "2",
                                     "spatial_size": "[24,16,20]", "output_dir": str(out)})
    img = nib.load(out / "sample_000.nii.gz")
    assert img.shape == (24, 16, 20) and np.allclose(img.header.get_zooms(), (2.0, 2.0, 2.0))
    assert np.isfinite(img.get_fdata()).all()
    assert json.loads((out / "samples.json").read_text())["latent_shape"] == [4, 6, 4, 5]
    bad = run_bundle(bundle, "inference", {**overrides, "num_samples": "1", "spatial_size": "[20,16,18]",
                                           "output_dir": str(bundle / "bad_size")}, check=False)
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]  # the cause, after MONAI's config traceback
    assert last.startswith("ValueError: spatial_size [20, 16, 18] cannot be sampled"), last
    assert "axis 0: 20 -> nearest valid 16 or 24; axis 2: 18 -> nearest valid 16 or 20" in bad.stderr + bad.stdout
    assert not (bundle / "bad_size").exists() or not list((bundle / "bad_size").glob("*.nii.gz"))


def test_inference_refuses_other_num_train_timesteps(trained):
    """The weights were trained with num_train_timesteps 300 (recorded in diffusion_model.json): 1000 is refused."""
    bundle, overrides = trained
    info = json.loads((bundle / "models" / "diffusion_model.json").read_text())
    assert info["num_train_timesteps"] == 300
    proc = run_bundle(bundle, "inference", {**overrides, "num_samples": "1", "num_train_timesteps": "1000",
                                            "output_dir": str(bundle / "bad_t")}, check=False)
    assert proc.returncode != 0
    assert ("num_train_timesteps=1000 but the weights were trained with num_train_timesteps=300"
            in proc.stderr + proc.stdout)


# Runs `-m monai.bundle` with meddiff's install location removed from sys.path, as on a machine
# (or MONAI Label server) that only has the exported bundle.
_WITHOUT_MEDDIFF = (
    "import importlib.util, runpy, sys;"
    "sys.path[:] = [p for p in sys.path if not p.rstrip('/').endswith('/common')];"
    "assert importlib.util.find_spec('meddiff') is None, 'meddiff still importable';"
    "sys.argv = ['monai.bundle'] + sys.argv[3:];"
    "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)"
)


def test_exported_bundle_runs_without_meddiff_installed(trained, tmp_path):
    bundle, overrides = trained
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "meddiff.cli.main", "export", str(bundle), str(exported)], check=True,
                   capture_output=True)
    assert (exported / "meddiff" / "networks" / "pseudo3d_unet.py").is_file()
    assert (exported / "models" / "diffusion_model.pt").is_file() and not (exported / "models" / "checkpoints").exists()
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    run_bundle(exported, "inference", {**overrides, "bundle_root": str(exported), "num_samples": "1",
                                       "num_inference_steps": "2"},
               launcher=[sys.executable, "-c", _WITHOUT_MEDDIFF], cwd=foreign)
    assert nib.load(exported / "outputs" / "sample_000.nii.gz").shape == (16, 16, 16)


def _nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def _bad_nan(d):
    v = blob_volume()
    v[3, 4, 5] = np.nan
    _nifti(d / "bad.nii.gz", v)
    return "bad.nii.gz", "NaN"


def _bad_truncated(d):
    _nifti(d / "bad.nii.gz", blob_volume())
    raw = (d / "bad.nii.gz").read_bytes()
    (d / "bad.nii.gz").write_bytes(raw[: len(raw) // 2])
    return "bad.nii.gz", "cannot be read"


def _bad_2d(d):
    _nifti(d / "bad.nii.gz", blob_volume()[:, :, 0])
    return "bad.nii.gz", "not a 3D volume"


def _bad_two_series(d):
    folder = d / "sub-09" / "mixed"
    write_dicom_series(blob_volume((12, 12, 4)), np.eye(4), d / "tmp_a", modality="MR")
    write_dicom_series(blob_volume((12, 12, 4), seed=5), np.eye(4), d / "tmp_b", modality="MR")
    folder.mkdir(parents=True)
    for src in ("tmp_a", "tmp_b"):
        for f in (d / src).iterdir():
            f.rename(folder / f"{src}_{f.name}")
        (d / src).rmdir()
    return "mixed", "contains 2 DICOM series"


def _bad_empty(d):
    return str(d.name), "contains no volumes"


@pytest.mark.parametrize("make_bad", [_bad_nan, _bad_truncated, _bad_2d, _bad_two_series, _bad_empty])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, make_bad):
    data = tmp_path / "data"
    data.mkdir()
    if make_bad is not _bad_empty:
        _nifti(data / "good.nii.gz", blob_volume(seed=3))
    name, problem = make_bad(data)
    models = tmp_path / "models"
    proc = run_bundle(MRI_BUNDLE, "train_autoencoder", {"dataset_dir": str(data), "ckpt_dir": str(models),
                                                        "max_steps": "2"}, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "DataError" in output and name in output and problem in output, output[-3000:]
    assert not [p for p in models.rglob("*") if p.is_file()], "a failed run left files behind"
