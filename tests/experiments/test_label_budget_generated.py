# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The label-budget experiment's generated-data arms through ``meddiff breast-experiment``, on tiny phantoms.

The generation bundle is trained on the unlabelled pool, sampled for self-supervised pre-training, and a
ControlNet per budget and seed is trained on the budget's labels only and sampled from its masks.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from meddiff.experiments.label_budget import run_label_budget_experiment
from tests.breast_helpers import BREAST_TINY, write_breast_datasets
from tests.helpers import TINY_VALUES

ARMS = ("scratch", "pretrained", "generated_ssl", "controlnet_pairs")
STEPS = {"max_steps": 2, "val_interval": 2, "ckpt_interval": 2}
EMA = {"ema_start_step": 10, "warmup_steps": 1}  # the exported weights are the trained ones


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _generator_overrides() -> dict:
    # on the phantoms' own grid (32 x 32 x 16 voxels of 11.25 x 6.875 x 11.25 mm), so pairs land on their masks' grid
    return {**TINY_VALUES, "pixdim": [11.25, 6.875, 11.25], "spatial_size": [32, 32, 16], **STEPS, "num_workers": 0, "val_fraction": 0.25, "train_diffusion": EMA, "train_controlnet": EMA,
            "sample": {"num_inference_steps": 2}, "sample_controlnet": {"num_inference_steps": 2}}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_budget_generated")
    labelled, unlabelled = write_breast_datasets(root, num_labelled=8, num_test=2, num_unlabelled=4)
    (root / "generator.json").write_text(json.dumps(_generator_overrides()))
    (root / "overrides.json").write_text(json.dumps({**BREAST_TINY, "device": "cpu"}))
    cmd = [sys.executable, "-m", "meddiff.cli.main", "breast-experiment",
           "--labelled_datalist", str(labelled / "dataset.json"), "--unlabelled_dir", str(unlabelled),
           "--output_dir", str(root / "experiment"), "--budgets", "1,2", "--seeds", "0,1", "--num_val", "2",
           "--launcher", "inprocess", "--arms", ",".join(ARMS), "--overrides", str(root / "overrides.json"),
           "--pretrain_overrides", "{'max_steps': 4, 'val_interval': 4, 'ckpt_interval': 4, 'val_fraction': 0.25}",
           "--train_overrides", "{'max_steps': 6, 'val_interval': 6, 'ckpt_interval': 6}",
           "--generator_overrides", str(root / "generator.json"), "--num_generated", "3", "--num_pairs", "3",
           "--mask_augmentation", "elastic"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root, labelled, unlabelled


def test_every_arm_runs_and_is_paired_with_scratch(experiment):
    root, _, _ = experiment
    out = root / "experiment"
    runs = _csv(out / "results.csv")
    assert {(r["budget"], r["seed"], r["init"]) for r in runs} == {
        (b, s, i) for b in ("1", "2") for s in ("0", "1") for i in ARMS}
    summary = _csv(out / "summary.csv")
    assert [r["budget"] for r in summary] == ["1", "2"]
    for row in summary:
        for arm in ARMS:
            assert 0.0 <= float(row[f"{arm}_mean"]) <= 1.0
        for arm in ARMS[1:]:
            assert int(row[f"{arm}_n_paired_cases"]) == 4 and 0.0 <= float(row[f"{arm}_wilcoxon_p"]) <= 1.0
        assert 0.0 <= float(row["controlnet_pairs_fidelity_dice"]) <= 1.0
        assert 0.0 <= float(row["fidelity_reference_dice"]) <= 1.0  # the same segmenter on the real test cases
        # judged by the experiment's own segmenter (scratch, largest budget) beside its Dice on the real test cases
        assert 0.0 <= float(row["controlnet_pairs_fidelity_judge_dice"]) <= 1.0
        assert float(row["fidelity_judge_reference_dice"]) == pytest.approx(float(summary[-1]["scratch_mean"]))
    reference = json.loads((out / "fidelity_reference.json").read_text())
    assert reference["num_cases"] == 2 and reference["model_file"].endswith("models/model.pt")
    plan = json.loads((out / "experiment.json").read_text())
    assert plan["arms"] == list(ARMS) and plan["generator"]["mask_augmentation"] == "elastic"


def test_generator_trains_on_the_unlabelled_pool_and_its_samples_say_synthetic(experiment):
    root, _, unlabelled = experiment
    gen = root / "experiment" / "generator"
    assert json.loads((gen / "done.json").read_text())["unlabelled_dir"] == str(unlabelled.resolve())
    trained_on = json.loads((gen / "models" / "datalist.json").read_text())
    assert {os.path.basename(i["image"]) for i in trained_on["training"] + trained_on["validation"]} == {
        p.name for p in unlabelled.glob("*.nii.gz")}
    samples = sorted((gen / "samples").glob("*.nii.gz"))
    assert len(samples) == 3
    assert nib.load(samples[0]).header["descrip"].tobytes().startswith(b"SYNTHETIC")
    report = json.loads((root / "experiment" / "runs" / "n002_seed0_generated_ssl" / "models" /
                         "pretrained_weights.json").read_text())
    assert report["pretrained_weights"] == str(root / "experiment" / "pretrain_generated" / "pretrained.pt")
    assert report["loaded"]


def test_controlnet_sees_only_its_budget_and_pairs_follow_its_masks(experiment):
    root, labelled, _ = experiment
    out = root / "experiment"
    for budget, seed in ((1, 0), (2, 1)):
        run = out / "runs" / f"n{budget:03d}_seed{seed}_controlnet_pairs"
        cases = json.loads((run / "result.json").read_text())["training_cases"]
        assert len(cases) == budget
        seen = json.loads((run / "generated" / "controlnet_datalist.json").read_text())
        assert {i["image"] for i in seen["training"] + seen["validation"]} == set(cases)  # no other label leaks in
        masks = sorted(p.name for p in (run / "generated" / "masks").iterdir())
        assert masks == sorted(os.path.basename(json.loads((run / "datalist.json").read_text())["training"][k]["label"])
                               for k in range(budget))
        pairs = json.loads((run / "generated" / "pairs" / "dataset.json").read_text())["training"]
        assert len(pairs) == -(-3 // budget) * budget  # ceil(num_pairs / budget) per mask
        for item in pairs:
            image = nib.load(run / "generated" / "pairs" / item["image"])
            label = nib.load(run / "generated" / "pairs" / item["label"])
            source = nib.load(labelled / "labelsTr" / (item["label"].rsplit("_", 2)[0] + ".nii.gz"))
            np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
            np.testing.assert_array_equal(image.affine, label.affine)
            assert set(np.unique(label.get_fdata()).tolist()) <= {0.0, 1.0}
        # supervised pre-training was validated on held-out pairs, never on real labels; fine-tuning starts from it
        pre = json.loads((run / "pretrain" / "datalist.json").read_text())
        assert all("/pairs/" in i["label"] for i in pre["training"] + pre["validation"])
        report = json.loads((run / "models" / "pretrained_weights.json").read_text())
        assert report["pretrained_weights"] == str(run / "pretrain" / "model.pt") and report["loaded"]
        fidelity = json.loads((run / "generated" / "fidelity.json").read_text())
        assert fidelity["num_cases"] == len(pairs) and 0.0 <= fidelity["per_label"]["1"]["mean"] <= 1.0
        judged = json.loads((run / "generated" / "fidelity_judge.json").read_text())
        assert judged["model_file"] == str(out / "runs" / f"n002_seed{seed}_scratch" / "models" / "model.pt")
        assert judged["num_cases"] == len(pairs)


def test_rerun_redoes_nothing_and_arms_are_checked(experiment):
    root, labelled, unlabelled = experiment
    kwargs = {"labelled_datalist": labelled / "dataset.json", "output_dir": root / "experiment",
              "unlabelled_dir": unlabelled, "budgets": (1, 2), "seeds": (0, 1), "num_val": 2,
              "overrides": {**BREAST_TINY, "device": "cpu"}, "launcher": "inprocess",
              "pretrain_overrides": {"max_steps": 4, "val_interval": 4, "ckpt_interval": 4, "val_fraction": 0.25},
              "train_overrides": {"max_steps": 6, "val_interval": 6, "ckpt_interval": 6}, "arms": ARMS,
              "generator_overrides": _generator_overrides(), "num_generated": 3, "num_pairs": 3,
              "mask_augmentation": "elastic"}
    again = run_label_budget_experiment(**kwargs)
    assert again["runs_done"] == 0 and again["runs_skipped"] == 16
    with pytest.raises(ValueError, match="unknown arms"):
        run_label_budget_experiment(**{**kwargs, "arms": ("scratch", "gan")})
    with pytest.raises(ValueError, match="need unlabelled_dir"):
        run_label_budget_experiment(**{**kwargs, "unlabelled_dir": None, "arms": ("controlnet_pairs",)})


def test_cli_names_a_bad_arm_in_one_line(tmp_path):
    labelled, unlabelled = write_breast_datasets(tmp_path, num_labelled=4, num_test=1, num_unlabelled=1)
    proc = subprocess.run([sys.executable, "-m", "meddiff.cli.main", "breast-experiment", "--labelled_datalist",
                           str(labelled / "dataset.json"), "--unlabelled_dir", str(unlabelled), "--output_dir",
                           str(tmp_path / "out"), "--arms", "scratch,controlnet"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown arms ['controlnet']" in proc.stderr and "controlnet_pairs" in proc.stderr
