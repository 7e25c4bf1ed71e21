# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The breast segmentation bundle through `python -m monai.bundle run` on tiny phantoms, and as MONAI Label loads it."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.transforms import Compose, SaveImaged

from meddiff.data.phantoms import make_breast_phantom
from meddiff.experiments.label_budget import ExperimentError, run_stage
from tests.breast_helpers import BREAST_BUNDLE, BREAST_TINY, REPO, run_breast, write_breast_datasets

SCHEMA = REPO / "tests" / "schemas" / "meta_schema_20240725.json"  # vendored copy of the zoo schema


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("breast_bundle")
    labelled, unlabelled = write_breast_datasets(root)
    return root, labelled, unlabelled


@pytest.fixture(scope="module")
def pretrained(workspace):
    root, _, unlabelled = workspace
    run_breast("pretrain", {"dataset_dir": str(unlabelled), "ckpt_dir": str(root / "pretrain"), "max_steps": 4,
                            "val_interval": 2, "ckpt_interval": 2, "val_fraction": 0.25})
    return root / "pretrain" / "pretrained.pt"


@pytest.fixture(scope="module")
def trained(workspace, pretrained):
    root, labelled, _ = workspace
    proc = run_breast("train", {"dataset_dir": str(labelled), "ckpt_dir": str(root / "models"), "max_steps": 6,
                                "val_interval": 3, "ckpt_interval": 3, "pretrained_weights": str(pretrained)})
    return root / "models", proc.stdout + proc.stderr


def test_metadata_follows_the_zoo_schema():
    verify_metadata(meta_file=str(BREAST_BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_metadata_declares_the_classes():
    meta = json.loads((BREAST_BUNDLE / "configs" / "metadata.json").read_text())
    out = meta["network_data_format"]["outputs"]["pred"]
    assert out["channel_def"] == {"0": "background", "1": "breast"} and out["num_channels"] == 2
    assert meta["version"] in meta["changelog"]
    config = json.loads((BREAST_BUNDLE / "configs" / "inference.json").read_text())
    assert {v: str(k) for v, k in config["label_names"].items()} == {v: k for k, v in out["channel_def"].items()}


def test_pretrain_writes_weights_and_a_falling_restoration_loss(pretrained):
    assert pretrained.is_file() and pretrained.with_name("pretrained_best.pt").is_file()
    log = [json.loads(line) for line in pretrained.with_name("pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "restoration" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4]
    weights = torch.load(pretrained, weights_only=True)
    assert weights["model.2.1.conv.unit0.conv.weight"].shape[0] == 1, "restoration output has one channel"


def test_pretrained_weights_really_load_into_the_segmentation_network(workspace, pretrained):
    """Build the training config's network with and without the file: every fitting tensor must change."""
    root, labelled, _ = workspace

    def network(weights):
        parser = ConfigParser()
        parser.read_config([str(BREAST_BUNDLE / "configs" / c) for c in ("inference.json", "common.json",
                                                                           "train.json")])
        parser.update({**BREAST_TINY, "bundle_root": str(BREAST_BUNDLE), "dataset_dir": str(labelled),
                       "ckpt_dir": str(root / "load_check"), "pretrained_weights": weights, "device": "cpu"})
        torch.manual_seed(0)
        return parser.get_parsed_content("network")

    before = network(None).state_dict()
    after = network(str(pretrained)).state_dict()
    source = torch.load(pretrained, weights_only=True)
    loaded = [k for k in after if k in source and source[k].shape == after[k].shape]
    assert len(loaded) >= 0.8 * len(after)
    for k in loaded:
        assert torch.equal(after[k], source[k]), f"{k} was not loaded"
        if after[k].is_floating_point() and after[k].numel() > 1:
            assert not torch.equal(after[k], before[k]), f"{k} is unchanged by loading"
    head = [k for k in after if k not in loaded]
    assert head and all(torch.equal(after[k], before[k]) for k in head), "output block keeps its fresh init"
    report = json.loads((root / "load_check" / "pretrained_weights.json").read_text())
    assert sorted(report["loaded"]) == sorted(loaded) and report["loaded_parameter_fraction"] > 0.9


def test_train_from_pretrained_weights(trained):
    models, output = trained
    assert "loaded 22/26 tensors" in output
    for name in ("model.pt", "model_best.pt", "model_last.pt", "segmentation_log.jsonl"):
        assert (models / name).is_file(), name
    best = torch.load(models / "model_best.pt", weights_only=True)
    final = torch.load(models / "model.pt", weights_only=True)
    assert all(torch.equal(best[k], final[k]) for k in best), "model.pt holds the best validation weights"
    log = [json.loads(line) for line in (models / "segmentation_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_dice" in r] == [3, 6]
    assert all(0.0 <= r["val_dice"] <= 1.0 for r in log if "val_dice" in r)
    assert json.loads((models / "pretrained_weights.json").read_text())["pretrained_weights"]
    assert not list(models.rglob("*.tmp*"))


def test_evaluate_writes_per_case_csv_and_summary(workspace, trained):
    root, labelled, _ = workspace
    models, _ = trained
    run_breast("evaluate", {"dataset_dir": str(labelled), "model_file": str(models / "model.pt"),
                            "output_dir": str(root / "eval")})
    with open(root / "eval" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["phantom_006", "phantom_007"]
    for r in rows:
        assert 0.0 <= float(r["dice_breast"]) <= 1.0
        for key in ("hd95_breast", "asd_breast"):
            assert math.isnan(float(r[key])) or float(r[key]) >= 0.0
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and set(summary["metrics"]) == {"dice_breast", "hd95_breast", "asd_breast"}
    assert summary["label_names"] == {"background": 0, "breast": 1}


def _oblique_input(folder):
    """A phantom on an anisotropic, rotated (oblique) grid with an off-centre origin."""
    ph = make_breast_phantom((40, 28, 14), fov_mm=(380, 230, 190), seed=9, oblique_degrees=12)
    affine = ph.affine.copy()
    affine[:3, 3] += [12.5, -30.0, 41.0]
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ph.image, affine), folder / "case_oblique.nii.gz")
    return folder / "case_oblique.nii.gz", affine


def test_inference_writes_masks_on_the_input_grid(workspace, trained):
    root, _, _ = workspace
    models, _ = trained
    path, affine = _oblique_input(root / "to_segment")
    run_breast("inference", {"dataset_dir": str(path.parent), "model_file": str(models / "model.pt"),
                             "output_dir": str(root / "masks")}, configs=["configs/inference.json"])
    mask = nib.load(root / "masks" / "case_oblique_seg.nii.gz")
    assert mask.shape == (40, 28, 14)
    assert np.allclose(mask.affine, affine, atol=1e-4)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_monai_label_bundle_app_chain(workspace, trained, tmp_path):
    """Do what monailabel/tasks/infer/bundle.py does: read configs/inference.json ALONE, set bundle_root,
    take network_def / preprocessing / inferer / postprocessing, drop SaveImaged, run on a NIfTI file."""
    _, _, _ = workspace
    models, _ = trained
    app_bundle = tmp_path / "breast_mri_segmentation"
    shutil.copytree(BREAST_BUNDLE / "configs", app_bundle / "configs")
    (app_bundle / "models").mkdir()
    shutil.copyfile(models / "model.pt", app_bundle / "models" / "model.pt")
    path, affine = _oblique_input(tmp_path / "images")

    inference = json.loads((app_bundle / "configs" / "inference.json").read_text())
    assert "meddiff" not in json.dumps(inference), "MONAI Label may not have meddiff: inference.json is pure MONAI"
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "dataset_dir", "bundle_root", "device",
                "network"):
        assert key in inference, key
    parser = ConfigParser()
    parser.read_config(str(app_bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(app_bundle)})
    parser.config.update({k: v for k, v in BREAST_TINY.items() if k in inference})  # the tiny trained network
    parser.config.update({"device": "cpu"})
    metadata = json.loads((app_bundle / "configs" / "metadata.json").read_text())
    key_image, _ = next(iter(metadata["network_data_format"]["inputs"].items()))
    key_pred, pred_format = next(iter(metadata["network_data_format"]["outputs"].items()))
    labels = {v.lower(): int(k) for k, v in pred_format["channel_def"].items() if v.lower() != "background"}
    assert (key_image, key_pred, labels) == ("image", "pred", {"breast": 1})

    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(app_bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    pre = list(pre.transforms) if isinstance(pre, Compose) else pre
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    post = [t for t in (list(post.transforms) if isinstance(post, Compose) else post) if not isinstance(t, SaveImaged)]

    data = {key_image: str(path)}
    for t in pre:
        data = t(data)
    with torch.no_grad():
        data[key_pred] = inferer(data[key_image][None], network)[0]
    assert data[key_pred].shape[0] == len(pred_format["channel_def"])
    for t in post:
        data = t(data)
    pred = data[key_pred]
    assert tuple(pred.shape) == (1, 40, 28, 14)
    assert np.allclose(np.asarray(pred.affine), affine, atol=1e-4)
    assert set(torch.unique(pred).tolist()) <= {0.0, 1.0}


def test_contrastive_pretext_runs_in_process(workspace):
    root, _, unlabelled = workspace
    run_stage(BREAST_BUNDLE, "pretrain", {**BREAST_TINY, "pretext": "contrastive", "contrastive_channels": 8, "num_crops": 2,
                                          "dataset_dir": str(unlabelled), "ckpt_dir": str(root / "contrastive"),
                                          "max_steps": 2, "val_interval": 2, "ckpt_interval": 2,
                                          "val_fraction": 0.25, "device": "cpu"},
              launcher="inprocess")
    log = [json.loads(line) for line in (root / "contrastive" / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "contrastive" in r] == [1, 2]
    weights = torch.load(root / "contrastive" / "pretrained.pt", weights_only=True)
    assert weights["model.2.1.conv.unit0.conv.weight"].shape[0] == 8


# ------------------------------------------------------------------------------------------ bad input


def _bad_dataset(root, corrupt):
    """A labelled set of two phantoms whose first label is corrupted by ``corrupt(image, label) -> label``."""
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(2):
        ph = make_breast_phantom((32, 32, 16), seed=20 + i)
        img = nib.Nifti1Image(ph.image, ph.affine)
        lab = nib.Nifti1Image(ph.mask, ph.affine)
        if i == 0:
            lab = corrupt(img, lab)
        nib.save(img, root / f"img{i}.nii.gz")
        nib.save(lab, root / f"lab{i}.nii.gz")
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": items, "validation": items[1:]}))
    return root


BAD_LABELS = {
    "shape": (lambda img, lab: nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, :-2], lab.affine), "label shape"),
    "geometry": (lambda img, lab: nib.Nifti1Image(np.asarray(lab.dataobj), lab.affine @ np.diag([1, 1, 1.5, 1])),
                 "geometry (affine) differs"),
    "values": (lambda img, lab: nib.Nifti1Image(np.asarray(lab.dataobj) * 3, lab.affine),
               "label values [3] are outside the declared classes"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LABELS))
def test_bad_labels_fail_clearly(tmp_path, kind):
    corrupt, message = BAD_LABELS[kind]
    data = _bad_dataset(tmp_path / "data", corrupt)
    with pytest.raises(ExperimentError) as err:
        run_stage(BREAST_BUNDLE, "train", {**BREAST_TINY, "dataset_dir": str(data), "ckpt_dir": str(tmp_path / "m"),
                                           "max_steps": 1, "device": "cpu"}, launcher="inprocess")
    assert "DataError" in str(err.value) and "lab0.nii.gz" in str(err.value) and message in str(err.value)


def test_label_mapping_merges_extra_classes(tmp_path):
    """Labels with extra tissue classes (e.g. FGT = 2) train once mapped onto the breast."""
    data = _bad_dataset(tmp_path / "data", BAD_LABELS["values"][0])
    run_stage(BREAST_BUNDLE, "train", {**BREAST_TINY, "dataset_dir": str(data), "ckpt_dir": str(tmp_path / "m"),
                                       "max_steps": 1, "label_mapping": {"3": 1}, "device": "cpu"},
              launcher="inprocess")
    assert (tmp_path / "m" / "model.pt").is_file()


def test_missing_pretrained_file_fails_clearly(workspace, tmp_path):
    _, labelled, _ = workspace
    missing = tmp_path / "nowhere" / "pretrained.pt"
    with pytest.raises(ExperimentError, match="pre-trained weights file .*nowhere/pretrained.pt not found"):
        run_stage(BREAST_BUNDLE, "train", {**BREAST_TINY, "dataset_dir": str(labelled), "ckpt_dir": str(tmp_path / "m"),
                                           "max_steps": 1, "pretrained_weights": str(missing), "device": "cpu"},
                  launcher="inprocess")


def test_pretrained_file_of_another_network_fails_clearly(workspace, pretrained, tmp_path):
    _, labelled, _ = workspace
    with pytest.raises(ExperimentError, match="parameters .* fit UNet"):
        run_stage(BREAST_BUNDLE, "train", {**BREAST_TINY, "unet_channels": [16, 32, 64], "dataset_dir": str(labelled),
                                           "ckpt_dir": str(tmp_path / "m"), "max_steps": 1, "device": "cpu",
                                           "pretrained_weights": str(pretrained)}, launcher="inprocess")


@pytest.mark.parametrize(("value", "saves"), [(True, True), ("true", True), (False, False), ("false", False)])
def test_save_predictions_switch_reads_command_line_strings(value, saves):
    parser = ConfigParser()
    parser.read_config(str(BREAST_BUNDLE / "configs" / "inference.json"))
    parser.update({"save_predictions": value, "device": "cpu"})
    post = parser.get_parsed_content("postprocessing")
    assert any(isinstance(t, SaveImaged) for t in post.transforms) is saves


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_multi_gpu_config_trains_with_two_ranks_on_cpu(workspace, tmp_path):
    _, labelled, _ = workspace
    overlay = tmp_path / "dump.json"
    overlay.write_text(json.dumps({
        "+finalize": ["$torch.save(@network_def.state_dict(), @ckpt_dir + '/rank' + os.environ['RANK'] + '.pt')"]}))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={29700 + os.getpid() % 1000}"]
    configs = ["configs/inference.json", "configs/common.json", "configs/train.json", "configs/multi_gpu_train.json",
               str(overlay)]
    run_breast("multi_gpu_train", {"dataset_dir": str(labelled), "ckpt_dir": str(tmp_path / "models"),
                                   "max_steps": 2, "val_interval": 2, "ckpt_interval": 2, "batch_size": 1},
               configs=configs, launcher=torchrun)
    w0 = torch.load(tmp_path / "models" / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "models" / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "weights differ between ranks"
    log = [json.loads(line) for line in (tmp_path / "models" / "segmentation_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # only rank 0 writes

