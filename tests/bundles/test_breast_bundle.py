# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The breast segmentation bundle through `python -m monai.bundle run` on tiny phantoms, and as MONAI Label loads it."""

from __future__ import annotations

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.transforms import Compose, SaveImaged

from meddiff.data.phantoms import make_breast_phantom
from meddiff.experiments.label_budget import ExperimentError, run_stage
from tests.breast_helpers import BREAST_BUNDLE, BREAST_TINY, run_breast, write_breast_datasets
from tests.helpers import torchrun


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
        parser.read_config(str(BREAST_BUNDLE / "configs" / "train.json"))
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


def test_monai_label_bundle_app_chain(tmp_path):
    """Do what monailabel/tasks/infer/bundle.py does with the shipped weights: read configs/inference.json ALONE,
    set bundle_root, take network_def / preprocessing / inferer / postprocessing, drop SaveImaged, run on a NIfTI
    phantom with an oblique, off-centre affine."""
    app_bundle = tmp_path / "breast_mri_segmentation"
    shutil.copytree(BREAST_BUNDLE / "configs", app_bundle / "configs")
    shutil.copytree(BREAST_BUNDLE / "models", app_bundle / "models")
    ph = make_breast_phantom((96, 64, 40), seed=9, oblique_degrees=12)
    affine = ph.affine.copy()
    affine[:3, 3] += [12.5, -30.0, 41.0]
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "case_oblique.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, affine), path)

    inference = json.loads((app_bundle / "configs" / "inference.json").read_text())
    assert "meddiff" not in json.dumps(inference), "MONAI Label may not have meddiff: inference.json is pure MONAI"
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "dataset_dir", "bundle_root", "device",
                "network"):
        assert key in inference, key
    parser = ConfigParser()
    parser.read_config(str(app_bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(app_bundle)})
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
    assert tuple(pred.shape) == (1, 96, 64, 40)
    assert np.allclose(np.asarray(pred.affine), affine, atol=1e-4)
    assert set(torch.unique(pred).tolist()) <= {0.0, 1.0}
    mask = pred[0].numpy() > 0.5
    dice = 2 * np.logical_and(mask, ph.mask > 0).sum() / (mask.sum() + (ph.mask > 0).sum())
    assert dice > 0.85, dice  # the shipped (phantom-trained) weights segment an unseen, oblique phantom (0.916)


# ------------------------------------------------------------------ MONAI Label's bundle train task


def _label_train(bundle, items, val_items, max_epochs, handlers=(), **extra):
    """Train as monailabel/tasks/train/bundle.py (0.8.5) does: configs/train.json ALONE, its override ids
    (its device is a name such as "cpu" or "cuda:0", from monailabel.utils.others.generic.name_to_device)."""
    overrides = {"bundle_root": str(bundle), "train#trainer#max_epochs": max_epochs, "train#dataset#data": items,
                 "device": "cpu", "train#handlers": list(handlers), "validate#dataset#data": val_items}
    bundle_run(run_id="run", init_id=None, final_id=None, meta_file=str(bundle / "configs" / "metadata.json"),
               config_file=str(bundle / "configs" / "train.json"), **{**BREAST_TINY, **extra}, **overrides)
    models = bundle / "models"
    return models, [json.loads(line) for line in (models / "segmentation_log.jsonl").read_text().splitlines()]


def test_monai_label_train_task_overrides_take_effect(workspace, tmp_path):
    """max_epochs, its own datalists (absolute paths), device, and its CheckpointLoader in train#handlers."""
    _, labelled, _ = workspace
    bundle = tmp_path / "breast_mri_segmentation"
    shutil.copytree(BREAST_BUNDLE / "configs", bundle / "configs")
    pairs = json.loads((labelled / "dataset.json").read_text())["training"]
    items = [{"image": str(labelled / p["image"]), "label": str(labelled / p["label"])} for p in pairs]

    # 3 cases, batch 2: 2 steps per epoch, so 2 epochs are 4 steps, over which the LR decays to 0; a MONAI
    # CheckpointSaver in train#handlers saves at every epoch end the step loop signals
    saver = {"_target_": "CheckpointSaver", "save_dir": str(tmp_path / "saved"), "save_dict": {"model": "@network"},
             "save_interval": 1, "epoch_level": True, "n_saved": None}
    models, log = _label_train(bundle, items[:3], [], max_epochs=2, handlers=[saver])
    assert sorted(p.name for p in (tmp_path / "saved").glob("*.pt")) == ["model_epoch=1.pt", "model_epoch=2.pt"]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["lr"] > 0.0 and steps[-1]["lr"] == 0.0
    assert not [r for r in log if "val_dice" in r], "an empty validation list means no validation"
    assert (models / "checkpoints" / "segmentation_step00000004.pt").is_file()

    # the pre-trained model MONAI Label loads with a CheckpointLoader (strict=False); lr 0 keeps it unchanged
    source = {k: v + 0.01 for k, v in torch.load(models / "model.pt", weights_only=True).items()}
    torch.save(source, bundle / "models" / "start.pt")
    loader = {"_target_": "CheckpointLoader", "load_path": str(models / "start.pt"), "load_dict": {"model": "$@network"},
              "strict": False}
    models, log = _label_train(bundle, items[:3], items[3:4], max_epochs=1, handlers=[loader], learning_rate=0.0)
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # a new run: the old log is gone
    assert [r["step"] for r in log if "val_dice" in r] == [2]  # the SupervisedEvaluator's mean Dice
    assert sorted(p.name for p in (models / "checkpoints").iterdir()) == ["segmentation_step00000002.pt"]
    last = torch.load(models / "model_last.pt", weights_only=True)
    assert all(torch.equal(last[k], source[k]) for k in source), "the CheckpointLoader's weights were not used"


def test_resume_continues_exactly(workspace, tmp_path):
    _, labelled, _ = workspace
    settings = {**BREAST_TINY, "dataset_dir": str(labelled), "max_steps": 4, "val_interval": 2, "ckpt_interval": 2,
                "device": "cpu"}
    run_stage(BREAST_BUNDLE, "train", {**settings, "ckpt_dir": str(tmp_path / "straight")}, launcher="inprocess")
    run_stage(BREAST_BUNDLE, "train", {**settings, "ckpt_dir": str(tmp_path / "resumed")}, launcher="inprocess")
    (tmp_path / "resumed" / "checkpoints" / "segmentation_step00000004.pt").unlink()  # as if killed after step 2
    run_stage(BREAST_BUNDLE, "train", {**settings, "ckpt_dir": str(tmp_path / "resumed"), "resume": True},
              launcher="inprocess")
    log = [json.loads(line) for line in (tmp_path / "resumed" / "segmentation_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 3, 4]  # continued after the step-2 checkpoint
    a = torch.load(tmp_path / "straight" / "model_last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_last.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"


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
    configs = ["configs/train.json", "configs/multi_gpu_train.json", str(overlay)]
    run_breast("multi_gpu_train", {"dataset_dir": str(labelled), "ckpt_dir": str(tmp_path / "models"),
                                   "max_steps": 2, "val_interval": 2, "ckpt_interval": 2, "batch_size": 1},
               configs=configs, launcher=torchrun())
    w0 = torch.load(tmp_path / "models" / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "models" / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "weights differ between ranks"
    log = [json.loads(line) for line in (tmp_path / "models" / "segmentation_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # only rank 0 writes
