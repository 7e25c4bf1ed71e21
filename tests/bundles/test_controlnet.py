# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Mask-conditioned generation (ControlNet) through `python -m monai.bundle run`: train, resume, sample beside masks."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundles.conftest import CT_BUNDLE, MRI_BUNDLE, run_bundle
from tests.helpers import blob_volume, torchrun

pytestmark = pytest.mark.slow  # stages 1-3 and sampling through the CLI

CONTROLNET = ["configs/train_controlnet.json"]
SAMPLE_CONTROLNET = ["configs/inference_controlnet.json"]


def _labelled_set(root, n: int = 4, ct: bool = False):
    """``n`` tiny volumes with a 3-class label map each (background, body, bright blob) and a dataset.json."""
    images, labels = root / "data" / "imagesTr", root / "data" / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    items = []
    for i in range(n):
        volume = blob_volume((16, 16, 16), seed=i)
        label = (volume > 50).astype(np.uint8) + (volume > 400).astype(np.uint8)
        if ct:
            volume = np.where(label > 0, 40.0 + 0.5 * volume, -1000.0).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, affine), images / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), labels / f"case_{i}.nii.gz")
        items.append({"image": f"imagesTr/case_{i}.nii.gz", "label": f"labelsTr/case_{i}.nii.gz"})
    (root / "data" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "body", "2": "blob"},
                                                            "training": items}))
    return images, labels


def _prepare(tmp_path_factory, bundle_dir, name: str, ct: bool = False):
    root = tmp_path_factory.mktemp(name)
    images, labels = _labelled_set(root, ct=ct)
    # the bundle without what a run in the repository may have left in models/ (datalist, checkpoints, stage weights)
    bundle = shutil.copytree(bundle_dir, root / "bundle", ignore=shutil.ignore_patterns(
        "datalist.json", "checkpoints", "autoencoder*", "diffusion_model*", "controlnet*", "nyul_landmarks.json"))
    overrides = {"bundle_root": None, "dataset_dir": str(images), "val_fraction": "0.25"}
    steps = {"max_steps": "2", "val_interval": "2", "ckpt_interval": "2"}
    run_bundle(bundle, "train_autoencoder", {**overrides, **steps})
    ema = {"ema_start_step": "10", "ema_update_every": "1", "warmup_steps": "1"}  # exported = trained weights
    run_bundle(bundle, "train_diffusion", {**overrides, **steps, **ema})
    cn = {**overrides, "controlnet_datalist_file": str(root / "data" / "dataset.json"), "num_label_classes": "3", **ema}
    return bundle, cn, root, labels


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    return _prepare(tmp_path_factory, MRI_BUNDLE, "controlnet_mri")


def test_train_controlnet_resume_and_sample_beside_masks(mri):
    bundle, cn, root, labels = mri
    models = bundle / "models"
    run_bundle(bundle, "train_diffusion", {**cn, "max_steps": "2", "val_interval": "2", "ckpt_interval": "2"},
               extra_configs=CONTROLNET)
    log = [json.loads(line) for line in (models / "controlnet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert (models / "checkpoints" / "controlnet_step00000002.pt").is_file()
    info = json.loads((models / "controlnet.json").read_text())
    assert info["num_label_classes"] == 3 and info["controlnet"] == "Pseudo3DControlNet"
    # resume: continues from step 2 to 4 (the stage-2 weights are untouched)
    denoiser_bytes = (models / "diffusion_model.pt").read_bytes()
    proc = run_bundle(bundle, "train_diffusion", {**cn, "max_steps": "4", "val_interval": "2", "ckpt_interval": "2"},
                      extra_configs=CONTROLNET)
    assert "resumed controlnet" in proc.stderr + proc.stdout
    log = [json.loads(line) for line in (models / "controlnet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert (models / "diffusion_model.pt").read_bytes() == denoiser_bytes
    trained = torch.load(models / "controlnet.pt", weights_only=True)
    assert trained["controlnet_mid_block.weight"].abs().max() > 0  # the zero convs have left zero
    # exact resume: the same 4 steps without the interruption give the same weights
    straight = shutil.copytree(bundle, root / "straight", ignore=shutil.ignore_patterns("controlnet*", "checkpoints"))
    run_bundle(straight, "train_diffusion", {**cn, "max_steps": "4", "val_interval": "2", "ckpt_interval": "2"},
               extra_configs=CONTROLNET)
    for key, value in torch.load(straight / "models" / "controlnet.pt", weights_only=True).items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=0, msg=key)

    masks = root / "masks"
    masks.mkdir()
    for name in ("case_0.nii.gz", "case_1.nii.gz"):
        shutil.copy(labels / name, masks / name)
    out = root / "generated"
    run_bundle(bundle, "inference", {**cn, "mask_dir": str(masks), "output_dir": str(out),
                                     "num_samples_per_mask": "2", "num_inference_steps": "2",
                                     "conditioning_scale": "0.8", "mask_augmentation": "affine"},
               extra_configs=SAMPLE_CONTROLNET)
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["conditioning_scale"] == 0.8 and manifest["mask_augmentation"] == "affine"
    assert set(manifest["weights"]) == {"autoencoder.pt", "diffusion_model.pt", "controlnet.pt"}
    assert [s["seed"] for s in manifest["samples"]] == [0, 1, 2, 3]
    for record in manifest["samples"]:
        image, label = nib.load(out / record["file"]), nib.load(out / record["label_file"])
        np.testing.assert_array_equal(image.affine, label.affine)
        assert image.shape == label.shape == (16, 16, 16)
        assert np.isfinite(image.get_fdata()).all()
        assert set(np.unique(label.get_fdata()).tolist()) <= {0.0, 1.0, 2.0}
        descrip = image.header["descrip"].tobytes().rstrip(b"\0").decode()
        assert descrip.startswith("SYNTHETIC") and "cs=0.8" in descrip and record["mask_sha256"][:8] in descrip
    source = nib.load(masks / "case_0.nii.gz")
    np.testing.assert_allclose(nib.load(out / "case_0_000_image.nii.gz").affine, source.affine, atol=1e-4)
    # two seeds of one mask: different augmented masks (new pairs, not copies)
    a, b = (nib.load(out / f"case_0_00{k}_label.nii.gz").get_fdata() for k in (0, 1))
    assert not np.array_equal(a, b)
    pairs = json.loads((out / "dataset.json").read_text())
    assert pairs["numTraining"] == 4 and pairs["training"][0] == {"image": "case_0_000_image.nii.gz",
                                                                   "label": "case_0_000_label.nii.gz"}


def test_ct_bundle_controlnet(tmp_path_factory):
    bundle, cn, root, labels = _prepare(tmp_path_factory, CT_BUNDLE, "controlnet_ct", ct=True)
    run_bundle(bundle, "train_diffusion", {**cn, "max_steps": "1", "val_interval": "1", "ckpt_interval": "1"},
               extra_configs=CONTROLNET)
    masks = root / "masks"
    masks.mkdir()
    shutil.copy(labels / "case_2.nii.gz", masks / "case_2.nii.gz")
    out = root / "generated"
    run_bundle(bundle, "inference", {**cn, "mask_dir": str(masks), "output_dir": str(out),
                                     "num_inference_steps": "2"}, extra_configs=SAMPLE_CONTROLNET)
    manifest = json.loads((out / "samples.json").read_text())
    record = manifest["samples"][0]
    assert manifest["sampling_method"] == "rflow" and record["mask_augmentation"] == "off"
    image, label = nib.load(out / record["file"]), nib.load(out / record["label_file"])
    np.testing.assert_array_equal(image.affine, label.affine)
    np.testing.assert_array_equal(label.get_fdata(), nib.load(masks / "case_2.nii.gz").get_fdata())
    assert image.get_data_dtype() == np.int16  # HU, as the unconditioned CT sampler writes
    assert {"case_2_000_image_lung.png", "case_2_000_image_soft_tissue.png"} <= set(record["sha256"])



def test_controlnet_under_torchrun_with_bf16(mri, tmp_path):
    """Two gloo processes (DDP over the ControlNet, the denoiser frozen) with bf16 autocast."""
    bundle, cn, _, _ = mri
    copy = shutil.copytree(bundle, tmp_path / "ddp", ignore=shutil.ignore_patterns("controlnet*", "checkpoints"))
    run_bundle(copy, "train_diffusion", {**cn, "max_steps": "2", "val_interval": "2", "ckpt_interval": "2",
                                         "amp": "true"},
               extra_configs=[*CONTROLNET, "configs/multi_gpu_train.json"], launcher=torchrun())
    log = [json.loads(line) for line in (copy / "models" / "controlnet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # one record per step: rank 0 logs
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    trained = torch.load(copy / "models" / "controlnet.pt", weights_only=True)
    assert trained["controlnet_mid_block.weight"].abs().max() > 0
