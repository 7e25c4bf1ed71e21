# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""evaluate.json's mask-conditioned mode through `python -m monai.bundle run`: Dice per label from the breast bundle.

The 'generated' images are held-out breast phantoms with their true masks as conditioning label maps (the layout
mask-conditioned sampling writes); the realism part runs with an untrained tiny autoencoder on the same grid.
"""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser

from meddiff.cli.demo_breast import DEMO_MODEL_PHANTOMS
from tests.bundles.conftest import MRI_BUNDLE, REPO, run_bundle, write_mixed_mri_dataset
from tests.evaluation.test_fidelity import write_conditioned_phantoms
from tests.helpers import TINY_VALUES

EVALUATE = ["configs/evaluate.json"]
BREAST_BUNDLE = REPO / "bundles" / "breast_mri_segmentation"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_fidelity")
    data = write_mixed_mri_dataset(root / "data")
    shape = list(DEMO_MODEL_PHANTOMS["shape"])
    overrides = {"dataset_dir": str(data), "ckpt_dir": str(root / "models"), "synthetic_dir": str(root / "samples"),
                 "npy_spacing": "[1.2,1.2,2.5]", "val_fraction": "0.25", "eval_dir": str(root / "eval"),
                 "spatial_size": json.dumps(shape), "pixdim": "[3.75,3.4375,4.5]", "eval_num_pairs": "1"}
    parser = ConfigParser()
    parser.read_config([str(MRI_BUNDLE / "configs" / f) for f in ("common.json", "train_autoencoder.json")])
    parser.update(TINY_VALUES)
    torch.manual_seed(0)
    (root / "models").mkdir()
    torch.save(parser.get_parsed_content("autoencoder_def").state_dict(), root / "models" / "autoencoder.pt")
    write_conditioned_phantoms(root / "samples")
    return root, overrides


def test_evaluate_reports_dice_per_label_with_the_breast_bundle(setup):
    root, overrides = setup
    run_bundle(MRI_BUNDLE, "train_autoencoder", {**overrides, "segmentation_bundle": str(BREAST_BUNDLE),
                                                 "segmentation_label_map": "{1: 1}"}, extra_configs=EVALUATE)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["data"]["synthetic_files"] == ["case020_0_image.nii.gz", "case022_0_image.nii.gz"]
    assert metrics["settings"]["synthetic_pattern"] == "*_image.nii.gz"  # the conditioned layout's default
    fid = metrics["conditioning_fidelity"]
    assert fid["segmentation_bundle"] == str(BREAST_BUNDLE) and fid["model_file"].endswith("models/model.pt")
    assert fid["label_map"] == {"1": [1]} and fid["label_map_source"] == "segmentation_label_map"
    assert fid["num_cases"] == 2
    assert [c["label"] for c in fid["cases"]] == ["case020_0_label.nii.gz", "case022_0_label.nii.gz"]
    assert all(c["dice"]["1"] > 0.8 for c in fid["cases"]), fid["cases"]
    breast = fid["per_label"]["1"]
    assert breast["name"] == "breast" and breast["n"] == 2 and breast["mean"] > 0.8 and breast["median"] > 0.8
    assert metrics["reconstruction"]["summary"]["psnr"]["n"] == 1  # the realism metrics sit next to it
    text = (root / "eval" / "report.html").read_text()
    assert "<h2>Conditioning fidelity</h2>" in text and "case022_0_label.nii.gz" in text


def test_missing_label_map_fails_before_any_metric(setup, tmp_path):
    root, overrides = setup
    samples = tmp_path / "samples"
    write_conditioned_phantoms(samples, cases=(20,))
    (samples / "case020_0_label.nii.gz").unlink()
    proc = run_bundle(MRI_BUNDLE, "train_autoencoder",
                      {**overrides, "synthetic_dir": str(samples), "eval_dir": str(tmp_path / "eval"),
                       "segmentation_bundle": str(BREAST_BUNDLE)}, extra_configs=EVALUATE, check=False)
    assert proc.returncode != 0
    assert f"{samples / 'case020_0_label.nii.gz'}: conditioning label map of case020_0_image.nii.gz not found" in (
        proc.stdout + proc.stderr)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_segmentation_bundle_without_weights_is_named(setup, tmp_path):
    root, overrides = setup
    proc = run_bundle(MRI_BUNDLE, "train_autoencoder",
                      {**overrides, "eval_dir": str(tmp_path / "eval"), "segmentation_bundle": str(BREAST_BUNDLE),
                       "segmentation_model_file": str(tmp_path / "missing.pt")}, extra_configs=EVALUATE, check=False)
    assert proc.returncode != 0
    assert f"weights file {tmp_path / 'missing.pt'} not found" in proc.stdout + proc.stderr
