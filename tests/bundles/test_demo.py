# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""`make demo`'s generation part: the shipped demo weights sampled through the real bundle CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
from PIL import Image

from meddiff.cli.demo import CONTROLNET_MASK_SEED, run_mri_demo
from meddiff.cli.demo_ct import run_ct_demo
from meddiff.data.demo import make_brain_label_demo
from tests.bundles.conftest import MRI_BUNDLE


def test_mri_demo_samples_the_shipped_weights(tmp_path):
    samples = tmp_path / "samples"
    assert run_mri_demo(str(tmp_path)) == str(samples)
    manifest = json.loads((samples / "samples.json").read_text())
    assert manifest["sampling_method"] == "rflow" and manifest["num_inference_steps"] == 10
    assert manifest["synthetic"] and set(manifest["weights"]) == {"model_autoencoder.pt", "model.pt"}
    volumes = sorted(samples.glob("sample_*.nii.gz"))
    assert len(volumes) == 2 and len(list(samples.glob("sample_*.png"))) == 2
    for path, record in zip(volumes, manifest["samples"]):
        image = nib.load(path)
        assert image.header["descrip"].item().decode() == f"SYNTHETIC meddiff rflow10 seed={record['seed']}"
        assert image.shape == (64, 64, 64)
        np.testing.assert_allclose(image.header.get_zooms(), (3.0, 3.0, 3.0))
        data = image.get_fdata()
        assert np.isfinite(data).all() and data.std() > 1.0  # a volume with content, not a constant
    # the mask-conditioned pair from the shipped ControlNet: image + label on one grid, and the overlay mosaic
    pair = tmp_path / "controlnet"
    image, label = nib.load(pair / "brain_00_000_image.nii.gz"), nib.load(pair / "brain_00_000_label.nii.gz")
    np.testing.assert_array_equal(image.affine, label.affine)
    assert image.shape == label.shape and image.header["descrip"].item().decode().startswith("SYNTHETIC")
    assert set(np.unique(label.get_fdata()).tolist()) == {0.0, 1.0, 2.0}
    overlay = np.asarray(Image.open(pair / "brain_00_000_overlay.png"))
    assert overlay.ndim == 3 and overlay.shape[-1] == 3 and (overlay[..., 0] != overlay[..., 1]).any()  # coloured
    manifest = json.loads((pair / "samples.json").read_text())
    assert set(manifest["weights"]) == {"model_autoencoder.pt", "model.pt", "model_controlnet.pt"}


def test_ct_demo_samples_the_shipped_weights_in_hounsfield_units(tmp_path):
    samples = tmp_path / "samples"
    run_ct_demo(str(tmp_path))
    volumes = sorted(samples.glob("sample_*.nii.gz"))
    assert len(volumes) == 2
    seeds = [r["seed"] for r in json.loads((samples / "samples.json").read_text())["samples"]]
    for path, seed in zip(volumes, seeds):
        image = nib.load(path)
        assert image.header["descrip"].item().decode().startswith("SYNTHETIC meddiff ")
        assert image.header["descrip"].item().decode().endswith(f" seed={seed}")
        assert image.get_data_dtype() == np.int16 and image.shape == (64, 64, 64)
        hu = np.asarray(image.dataobj)
        assert hu.min() >= -1024 and hu.max() <= 1024
        assert 0.02 < (hu > -500).mean() < 0.6  # a head surrounded by air, not all air or all tissue
        assert len(list((samples / f"{path.name.removesuffix('.nii.gz')}_dicom").glob("*.dcm"))) == 64


def _sample_shipped_baseline(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """docs/README.md's command for the shipped DDPM baseline (x0 target, the paper's 300 ancestral steps)."""
    configs = "['configs/common.json','configs/train_autoencoder.json','configs/inference.json','configs/demo_brain.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", ".",
           "--num_samples", "1", "--sampling_method", "ddpm", "--diffusion_weights", "models/model_ddpm.pt",
           "--latent_info_file", "models/model_ddpm.json", "--output_dir", str(tmp_path), "--progress", "false", *extra]
    return subprocess.run(cmd, cwd=MRI_BUNDLE, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_shipped_ddpm_baseline_samples_with_its_recorded_target(tmp_path):
    wrong = _sample_shipped_baseline(tmp_path / "wrong", "--prediction_type", "epsilon")
    assert wrong.returncode != 0 and "set prediction_type to 'sample'" in wrong.stderr
    done = _sample_shipped_baseline(tmp_path / "ok")  # the default target is the shipped baseline's
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "ok" / "samples.json").read_text())
    assert manifest["sampling_method"] == "ddpm" and manifest["num_inference_steps"] == 300
    assert "model_ddpm.pt" in manifest["weights"]
    data = nib.load(next((tmp_path / "ok").glob("sample_*.nii.gz"))).get_fdata()
    assert data.shape == (64, 64, 64) and np.isfinite(data).all() and data.std() > 1.0


def _sample_shipped_controlnet(mask_dir, out, scale: float) -> None:
    """docs/README.md's command for the shipped demo ControlNet (one image per mask)."""
    configs = ("['configs/common.json','configs/train_autoencoder.json','configs/inference.json',"
               "'configs/inference_controlnet.json','configs/demo_brain.json']")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", ".",
           "--mask_dir", str(mask_dir), "--conditioning_scale", str(scale), "--output_dir", str(out),
           "--progress", "false"]
    done = subprocess.run(cmd, cwd=MRI_BUNDLE, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_shipped_controlnet_follows_the_mask(tmp_path):
    """Not a no-op: scale 0 vs 1 differ, and the bright class of the image matches its own mask, not another one."""
    make_brain_label_demo(tmp_path / "data", num_volumes=1, seed=CONTROLNET_MASK_SEED)
    masks = tmp_path / "masks"
    masks.mkdir()
    source = nib.load(tmp_path / "data" / "labelsTr" / "brain_00.nii.gz")
    label = np.asarray(source.dataobj)
    nib.save(nib.Nifti1Image(label, source.affine), masks / "a.nii.gz")
    _sample_shipped_controlnet(masks, tmp_path / "on", 1.0)
    _sample_shipped_controlnet(masks, tmp_path / "off", 0.0)
    on = nib.load(tmp_path / "on" / "a_000_image.nii.gz").get_fdata()
    off = nib.load(tmp_path / "off" / "a_000_image.nii.gz").get_fdata()
    used = nib.load(tmp_path / "on" / "a_000_label.nii.gz").get_fdata()  # the mask on the 64^3 grid, as used
    assert set(np.unique(used).tolist()) == {0.0, 1.0, 2.0}
    assert np.abs(on - off).mean() > 0.05 * np.abs(off).mean()
    # a mismatched mask: the same brain moved by 6 voxels (18 mm) along the first axis
    other = np.zeros_like(used)
    other[6:] = used[:-6]

    def bright(image: np.ndarray, mask: np.ndarray) -> float:
        """Dice of label 2 with the image's brightest voxels inside ``mask``'s label 1-2 (the labels' own rule)."""
        return _dice(image > np.quantile(image[mask > 0], 0.65), mask == 2)

    # measured with the shipped weights: 0.73 with the mask, 0.54 at scale 0, 0.47 against the shifted mask
    assert bright(on, used) > bright(off, used) + 0.1
    assert bright(on, used) > bright(on, other) + 0.1
