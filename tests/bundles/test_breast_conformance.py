# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The breast bundle as MONAI's bundle tools and the model zoo check it, with the weights shipped in models/."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

from meddiff.cli.demo_breast import DEMO_MODEL_PHANTOMS, segment_breast_demo
from tests.breast_helpers import BREAST_BUNDLE, BREAST_TINY, REPO, write_breast_datasets

SCHEMA = REPO / "tests" / "schemas" / "meta_schema_20240725.json"  # vendored copy of the zoo schema
CONFIGS = BREAST_BUNDLE / "configs"
MODEL = BREAST_BUNDLE / "models" / "model.pt"
#: the shipped weights scored whole-breast Dice 0.882 on average (0.724 at worst) on the 6 held-out demo
#: phantoms when they were trained (docs/README.md); the test allows a margin for platform differences
SHIPPED_DICE_MEAN_MIN = 0.85
SHIPPED_DICE_CASE_MIN = 0.65


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("breast_conformance")
    return write_breast_datasets(root, num_labelled=4, num_test=1, num_unlabelled=1)[0]


def _workflow(files, workflow_type, **overrides):
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / f) for f in files], meta_file=str(CONFIGS / "metadata.json"),
                              logging_file=str(CONFIGS / "logging.conf"), workflow_type=workflow_type,
                              **{"bundle_root": str(BREAST_BUNDLE), "device": "cpu", **overrides})
    workflow.initialize()
    return workflow


def test_train_config_has_monai_train_properties(labelled, tmp_path):
    workflow = _workflow(["train.json"], "train", **BREAST_TINY, dataset_dir=str(labelled),
                         ckpt_dir=str(tmp_path / "m"))
    assert workflow.check_properties() == []
    assert workflow.max_epochs is None  # the step budget rules unless train#trainer#max_epochs is set
    assert workflow.train_inferer is not None and workflow.evaluator is not None
    assert type(workflow.evaluator).__name__ == "SupervisedEvaluator"


@pytest.mark.parametrize("files", [["inference.json"], ["inference.json", "evaluate.json"]])
def test_inference_and_evaluation_configs_have_monai_infer_properties(labelled, files, tmp_path):
    workflow = _workflow(files, "infer", dataset_dir=str(labelled), model_file=str(MODEL),
                         output_dir=str(tmp_path / "out"))
    assert workflow.check_properties() == []
    assert workflow.version == json.loads((CONFIGS / "metadata.json").read_text())["version"]


def test_metadata_follows_the_zoo_schema_and_names_its_packages_and_apps():
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert "pytorch-ignite" in meta["required_packages_version"]  # inference.json's SupervisedEvaluator
    assert "monai-label" in meta["supported_apps"]
    assert meta["version"] in meta["changelog"]


def test_training_and_inference_configs_share_one_network_and_preprocessing():
    """MONAI Label reads train.json and inference.json alone, so each repeats the shared definitions."""
    train = json.loads((CONFIGS / "train.json").read_text())
    infer = json.loads((CONFIGS / "inference.json").read_text())
    shared = ["label_names", "num_classes", "spatial_dims", "in_channels", "out_channels", "unet_channels",
              "unet_strides", "unet_res_units", "unet_norm", "dropout", "network_def", "axcodes", "pixdim",
              "patch_size", "intensity_percentiles", "orientation", "resample", "scale_intensity", "to_float",
              "preprocessing", "sw_batch_size", "sw_overlap", "inferer", "bundle_root", "ckpt_dir", "device"]
    for key in shared:
        assert train[key] == infer[key], key


def test_shipped_weights_are_small_and_declared():
    assert MODEL.is_file() and MODEL.stat().st_size < 20 * 1024**2
    digest, path = (BREAST_BUNDLE / "weights.sha256").read_text().split()  # one file, `sha256sum -c` format
    assert path == "models/model.pt" and digest == hashlib.sha256(MODEL.read_bytes()).hexdigest()


def test_shipped_weights_load_and_pass_verify_net_in_out():
    verify_net_in_out(net_id="network", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate.json")], device="cpu",
                      bundle_root=str(BREAST_BUNDLE), model_file=str(MODEL))


def test_torchscript_export_matches_the_eager_model(tmp_path):
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(MODEL), meta_file=str(CONFIGS / "metadata.json"),
                config_file=str(CONFIGS / "inference.json"), bundle_root=str(BREAST_BUNDLE), device="cpu")
    scripted = torch.jit.load(str(ts), map_location="cpu").eval()
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(BREAST_BUNDLE), "device": "cpu"})
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(MODEL, map_location="cpu", weights_only=True))
    eager.eval()
    x = torch.rand(1, 1, *parser["patch_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = eager(x), scripted(x)
    assert a.shape == (1, 2, *parser["patch_size"])
    assert torch.allclose(a, b, atol=1e-5)
    assert float(a.abs().max()) > 0.0


def test_shipped_weights_segment_the_demo_phantoms(tmp_path):
    """The demo's default path: the shipped weights on held-out demo phantoms through inference/evaluate.json."""
    summary = segment_breast_demo(tmp_path)
    assert summary["num_cases"] == DEMO_MODEL_PHANTOMS["num_test"]
    dice = [c["dice_breast"] for c in summary["cases"]]
    assert min(dice) > SHIPPED_DICE_CASE_MIN and float(np.mean(dice)) > SHIPPED_DICE_MEAN_MIN, dice
    masks = sorted((tmp_path / "masks").glob("*_seg.nii.gz"))
    assert len(masks) == DEMO_MODEL_PHANTOMS["num_test"]
