# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Class + mask conditioning through `python -m monai.bundle run`: a class-conditioned stage 2, a ControlNet on it
trained with class labels (DDP: 2 gloo ranks under torchrun), then mask-conditioned sampling of one class shared over
2 ranks."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from tests.bundles.conftest import MRI_BUNDLE, run_bundle
from tests.helpers import blob_volume, torchrun

pytestmark = pytest.mark.slow  # four workflows through the CLI

CONTROLNET = ["configs/train_controlnet.json"]
SAMPLE_CONTROLNET = ["configs/inference_controlnet.json"]
MULTI_TRAIN, MULTI_SAMPLE = "configs/multi_gpu_train.json", "configs/multi_gpu_inference.json"


def _two_class_set(root):
    """Four tiny volumes with label maps; every other one has a bright 'tear' (a class_label in dataset.json and a
    labels CSV for stage 2)."""
    images, labels = root / "data" / "imagesTr", root / "data" / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    items, rows = [], ["file,class"]
    for i in range(4):
        volume = blob_volume((16, 16, 16), seed=i)
        name = "tear" if i % 2 else "intact"
        if i % 2:
            volume[6:10, 6:10, 6:10] = 2.0 * volume.max()
        label = (volume > 50).astype(np.uint8)
        nib.save(nib.Nifti1Image(volume, affine), images / f"case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), labels / f"case_{i}.nii.gz")
        items.append({"image": f"imagesTr/case_{i}.nii.gz", "label": f"labelsTr/case_{i}.nii.gz", "class_label": name})
        rows.append(f"case_{i}.nii.gz,{name}")
    (root / "data" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "knee"},
                                                            "training": items}))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return images, labels


def test_class_and_mask_conditioned_generation(tmp_path):
    images, labels = _two_class_set(tmp_path)
    bundle = shutil.copytree(MRI_BUNDLE, tmp_path / "bundle", ignore=shutil.ignore_patterns(
        "datalist.json", "checkpoints", "autoencoder*", "diffusion_model*", "controlnet*", "nyul_landmarks.json"))
    overrides = {"bundle_root": None, "dataset_dir": str(images), "val_fraction": "0.25"}
    steps = {"max_steps": "2", "val_interval": "2", "ckpt_interval": "2"}
    ema = {"ema_start_step": "10", "ema_update_every": "1", "warmup_steps": "1"}
    run_bundle(bundle, "train_autoencoder", {**overrides, **steps})
    run_bundle(bundle, "train_diffusion", {**overrides, **steps, **ema, "num_classes": "2",
                                           "labels_file": str(tmp_path / "labels.csv")})
    models = bundle / "models"
    assert json.loads((models / "diffusion_model.json").read_text())["class_names"] == ["intact", "tear"]

    # stage 3: num_classes and the class order come from the denoiser's latent info; classes from dataset.json
    cn = {**overrides, "controlnet_datalist_file": str(tmp_path / "data" / "dataset.json"), **ema}

    # an unknown class in the ControlNet datalist: one clear error listing the denoiser's classes
    bad = json.loads((tmp_path / "data" / "dataset.json").read_text())
    bad["training"][0]["class_label"] = "sprain"
    (tmp_path / "data" / "bad.json").write_text(json.dumps(bad))
    proc = run_bundle(bundle, "train_diffusion",
                      {**cn, **steps, "controlnet_datalist_file": str(tmp_path / "data" / "bad.json")},
                      extra_configs=CONTROLNET, check=False)
    assert proc.returncode != 0 and "['sprain'] the denoiser does not know" in proc.stderr
    assert "['intact', 'tear']" in proc.stderr

    run_bundle(bundle, "train_diffusion", {**cn, **steps}, extra_configs=[*CONTROLNET, MULTI_TRAIN], launcher=torchrun())
    info = json.loads((models / "controlnet.json").read_text())
    assert info["num_classes"] == 2 and info["class_names"] == ["intact", "tear"] and info["num_label_classes"] == 2
    log = [json.loads(line) for line in (models / "controlnet_log.jsonl").read_text().splitlines()]
    # one record per step (rank 0 logs)
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    assert any("val_loss" in r for r in log)

    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(labels / "case_0.nii.gz", masks / "case_0.nii.gz")
    out = tmp_path / "generated"
    # a mix of classes, one volume per batch, shared round-robin over 2 ranks: each seed keeps its class
    proc = run_bundle(bundle, "inference", {**cn, "mask_dir": str(masks), "output_dir": str(out),
                                            "class_label": "['tear','intact']", "guidance_scale": "2.0",
                                            "num_samples_per_mask": "2", "sample_batch_size": "1",
                                            "num_inference_steps": "2"},
                      extra_configs=[*SAMPLE_CONTROLNET, MULTI_SAMPLE], launcher=torchrun())
    log = proc.stdout + proc.stderr
    assert "rank 0/2: 1 mask-conditioned samples written" in log and "rank 1/2: 1 mask-conditioned samples written" in log
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["num_classes"] == 2 and manifest["class_labels"] == ["tear", "intact"]
    assert manifest["guidance_scale"] == 2.0 and manifest["class_names"] == ["intact", "tear"]
    assert [(s["seed"], s["class_label"]) for s in manifest["samples"]] == [(0, "tear"), (1, "intact")]
    dataset = json.loads((out / "dataset.json").read_text())
    assert [item["class_label"] for item in dataset["training"]] == ["tear", "intact"]
    for record in manifest["samples"]:
        image, label = nib.load(out / record["file"]), nib.load(out / record["label_file"])
        np.testing.assert_array_equal(image.affine, label.affine)
        assert np.isfinite(image.get_fdata()).all()
        descrip = image.header["descrip"].tobytes().rstrip(b"\0").decode()
        assert descrip.startswith("SYNTHETIC") and f"class={record['class_label']} g=2" in descrip
