# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Class-conditioned training and guided sampling through `python -m monai.bundle run` (MRI bundle, pseudo-3D UNet)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from tests.bundles.conftest import MRI_BUNDLE, run_bundle
from tests.helpers import blob_volume

pytestmark = pytest.mark.slow  # four workflows through the CLI: about a minute


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Six tiny volumes, every other one with a bright 'lesion', and a labels CSV naming the classes."""
    root = tmp_path_factory.mktemp("class_bundle")
    data = root / "data"
    data.mkdir()
    rows = ["file,class"]
    for i in range(6):
        volume = blob_volume((16, 16, 16), seed=i)
        if i % 2:
            volume[6:10, 6:10, 6:10] = 2.0 * volume.max()
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), data / f"case_{i}.nii.gz")
        rows.append(f"case_{i}.nii.gz,{'lesion' if i % 2 else 'healthy'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    bundle = shutil.copytree(MRI_BUNDLE, root / "bundle")
    overrides = {"bundle_root": None, "dataset_dir": str(data), "val_fraction": "0.2"}
    run_bundle(bundle, "train_autoencoder", {**overrides, "max_steps": "2", "val_interval": "2",
                                                 "ckpt_interval": "2"})
    return bundle, overrides, root


@pytest.fixture(scope="module")
def trained(workspace):
    bundle, overrides, root = workspace
    run_bundle(bundle, "train_diffusion", {**overrides, "max_steps": "4", "val_interval": "2", "ckpt_interval": "2",
                                           "ema_start_step": "2", "warmup_steps": "2", "num_classes": "2",
                                           "labels_file": str(root / "labels.csv"), "cfg_dropout": "0.2"})
    return bundle, overrides


def test_training_records_the_classes(trained):
    bundle, _ = trained
    info = json.loads((bundle / "models" / "diffusion_model.json").read_text())
    assert info["num_classes"] == 2 and info["class_names"] == ["healthy", "lesion"] and info["cfg_dropout"] == 0.2
    log = [json.loads(line) for line in (bundle / "models" / "diffusion_model_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4]


def test_guided_sampling_records_class_per_sample(trained):
    bundle, overrides = trained
    run_bundle(bundle, "inference", {**overrides, "num_samples": "3", "num_inference_steps": "2",
                                     "class_label": "['lesion','healthy']", "guidance_scale": "2.5",
                                     "guidance_interval": "[0.2,0.9]", "guidance_rescale": "0.5"})
    out = bundle / "outputs"
    manifest = json.loads((out / "samples.json").read_text())
    assert [s["class_label"] for s in manifest["samples"]] == ["lesion", "healthy", "lesion"]
    assert manifest["guidance_scale"] == 2.5 and manifest["class_names"] == ["healthy", "lesion"]
    assert manifest["guidance_interval"] == [0.2, 0.9] and manifest["guidance_rescale"] == 0.5
    for record in manifest["samples"]:
        header = nib.load(out / record["file"]).header
        descrip = header["descrip"].tobytes().rstrip(b"\0").decode()
        assert descrip.startswith("SYNTHETIC") and f"class={record['class_label']} g=2.5" in descrip
        assert np.isfinite(nib.load(out / record["file"]).get_fdata()).all()


def test_unknown_class_and_missing_label_errors(workspace, trained):
    bundle, overrides = trained
    proc = run_bundle(bundle, "inference", {**overrides, "num_samples": "1", "num_inference_steps": "2",
                                            "class_label": "tumour"}, check=False)
    assert proc.returncode != 0 and "['tumour'] unknown" in proc.stderr and "['healthy', 'lesion']" in proc.stderr
    _, _, root = workspace
    partial = root / "partial.csv"
    partial.write_text("\n".join((root / "labels.csv").read_text().splitlines()[:-2]) + "\n")
    proc = run_bundle(bundle, "train_diffusion", {**overrides, "max_steps": "1", "num_classes": "2",
                                                  "labels_file": str(partial)}, check=False)
    assert proc.returncode != 0 and "partial.csv: has no row for 'case_" in proc.stderr
