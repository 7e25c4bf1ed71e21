# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The label-budget experiment end to end on tiny phantoms: tables, plot, resumability, trained beats untrained."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from meddiff.experiments.label_budget import (
    ExperimentError,
    _resolve_budgets,
    run_label_budget_experiment,
    run_stage,
    stage_command,
    summarize_label_budget,
)
from tests.breast_helpers import BREAST_BUNDLE, BREAST_TINY, write_breast_datasets

STAGES = {
    "pretrain_overrides": {"max_steps": 4, "val_interval": 4, "ckpt_interval": 4, "val_fraction": 0.25},
    "train_overrides": {"max_steps": 12, "val_interval": 6, "ckpt_interval": 12},
}


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_budget")
    labelled, unlabelled = write_breast_datasets(root, num_labelled=9, num_test=3)
    kwargs = {"labelled_datalist": labelled / "dataset.json", "output_dir": root / "experiment",
              "unlabelled_dir": unlabelled, "budgets": (1, 4), "seeds": (0, 1), "num_val": 2,
              "overrides": {**BREAST_TINY, "device": "cpu"}, "launcher": "inprocess", **STAGES}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse single-thread fixture
    try:
        first = run_label_budget_experiment(**kwargs)
    finally:
        torch.set_num_threads(threads)
    return root, kwargs, first


def test_writes_tables_and_plot(experiment):
    root, _, first = experiment
    out = root / "experiment"
    assert first["runs_done"] == 8 and first["runs_skipped"] == 0
    runs = _csv(out / "results.csv")
    assert len(runs) == 8
    assert {(r["budget"], r["seed"], r["init"]) for r in runs} == {
        (b, s, i) for b in ("1", "4") for s in ("0", "1") for i in ("scratch", "pretrained")}
    assert len(_csv(out / "per_case.csv")) == 8 * 3
    summary = _csv(out / "summary.csv")
    assert [r["budget"] for r in summary] == ["1", "4"]
    for row in summary:
        for init in ("scratch", "pretrained"):
            mean, lo, hi = (float(row[f"{init}_{k}"]) for k in ("mean", "ci_low", "ci_high"))
            assert 0.0 <= mean <= 1.0 and lo <= mean <= hi
        assert int(row["pretrained_n_paired_cases"]) == 6 and 0.0 <= float(row["pretrained_wilcoxon_p"]) <= 1.0
        assert "generated_ssl_mean" not in row  # arms not asked for leave no columns
    png = Image.open(out / "dice_vs_budget.png")
    assert png.size[0] > 300 and png.size[1] > 200
    plan = json.loads((out / "experiment.json").read_text())
    assert plan["phantom"] is True and plan["budgets"] == [1, 4] and len(plan["validation"]) == 2
    # nested subsets: the 4-case runs of a seed contain its 1-case subset; both inits see the same cases
    result = {(r, s, i): json.loads((out / "runs" / f"n{r:03d}_seed{s}_{i}" / "result.json").read_text())
              for r in (1, 4) for s in (0, 1) for i in ("scratch", "pretrained")}
    for s in (0, 1):
        assert set(result[(1, s, "scratch")]["training_cases"]) <= set(result[(4, s, "scratch")]["training_cases"])
        assert result[(4, s, "scratch")]["training_cases"] == result[(4, s, "pretrained")]["training_cases"]
    assert result[(4, 0, "scratch")]["training_cases"] != result[(4, 1, "scratch")]["training_cases"]
    report = json.loads((out / "runs" / "n004_seed0_pretrained" / "models" / "pretrained_weights.json").read_text())
    assert report["pretrained_weights"] == str(out / "pretrain" / "pretrained.pt") and report["loaded"]
    scratch = json.loads((out / "runs" / "n004_seed0_scratch" / "models" / "pretrained_weights.json").read_text())
    assert scratch["pretrained_weights"] is None


def test_second_run_redoes_nothing(experiment):
    root, kwargs, _ = experiment
    runs = root / "experiment" / "runs"
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}
    models = {p: p.stat().st_mtime_ns for p in runs.glob("*/models/model.pt")}
    pre = (root / "experiment" / "pretrain" / "pretrained.pt").stat().st_mtime_ns
    again = run_label_budget_experiment(**kwargs)
    assert again["runs_done"] == 0 and again["runs_skipped"] == 8
    assert stamps == {p: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}
    assert models == {p: p.stat().st_mtime_ns for p in runs.glob("*/models/model.pt")}
    assert pre == (root / "experiment" / "pretrain" / "pretrained.pt").stat().st_mtime_ns


def test_an_interrupted_run_is_finished(experiment):
    root, kwargs, _ = experiment
    result = root / "experiment" / "runs" / "n001_seed1_scratch" / "result.json"
    result.unlink()  # as if killed between training and evaluation
    again = run_label_budget_experiment(**kwargs)
    assert again["runs_done"] == 1 and again["runs_skipped"] == 7 and result.is_file()


def test_trained_models_beat_an_untrained_one(experiment, tmp_path):
    root, _, _ = experiment
    out = root / "experiment"
    parser = ConfigParser()
    parser.read_config(str(BREAST_BUNDLE / "configs" / "inference.json"))
    parser.update({**BREAST_TINY, "bundle_root": str(BREAST_BUNDLE), "device": "cpu"})
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "untrained.pt")
    run_stage(BREAST_BUNDLE, "evaluate", {**BREAST_TINY, "device": "cpu", "dataset_dir": str(out),
                                          "datalist_file": str(out / "test_datalist.json"),
                                          "model_file": str(tmp_path / "untrained.pt"),
                                          "output_dir": str(tmp_path / "eval")}, launcher="inprocess")
    untrained = json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]["dice_breast"]["mean"]
    trained = [float(r["dice_breast_mean"]) for r in _csv(out / "results.csv")]
    assert min(trained) > untrained + 0.1, (trained, untrained)


def test_changed_settings_are_refused(experiment):
    _, kwargs, _ = experiment
    with pytest.raises(ExperimentError, match="different overrides"):
        run_label_budget_experiment(**{**kwargs, "overrides": {**kwargs["overrides"], "learning_rate": 0.1}})


def test_budgets_and_arguments_are_checked(tmp_path):
    assert _resolve_budgets([0.5, 2, 2.0], pool_size=10) == [2, 5]
    with pytest.raises(ValueError, match="pool has 3"):
        _resolve_budgets([5], pool_size=3)
    with pytest.raises(ValueError, match="number of cases"):
        _resolve_budgets([2.5], pool_size=10)
    with pytest.raises(ValueError, match="unlabelled_dir"):
        run_label_budget_experiment(tmp_path / "dataset.json", tmp_path / "out")


def test_summary_statistics():
    def run(budget, seed, init, dice):
        return {"budget": budget, "seed": seed, "init": init,
                "cases": [{"case": f"c{i}", "dice_breast": d, "hd95_breast": 1.0} for i, d in enumerate(dice)]}

    results = []
    for seed in range(3):
        results.append(run(5, seed, "scratch", [0.80, 0.82, 0.84, 0.86]))
        results.append(run(5, seed, "pretrained", [0.85 + 0.01 * seed, 0.87, 0.89, 0.91]))
    (row,) = summarize_label_budget(results)
    assert row["scratch_n_seeds"] == 3 and math.isclose(row["scratch_mean"], 0.83)
    assert math.isnan(row["pretrained_ttest_p"]) is False and row["pretrained_difference_mean"] > 0.04
    assert row["pretrained_n_paired_cases"] == 12 and row["pretrained_wilcoxon_p"] < 0.01
    assert row["scratch_ci_low"] == row["scratch_ci_high"] == pytest.approx(0.83)  # no spread over seeds


def test_stage_command_round_trips_values_through_the_cli():
    cmd = stage_command(BREAST_BUNDLE, "train", {"pretrained_weights": None, "pixdim": [1.5, 1.5, 2.0],
                                                 "dataset_dir": "/data/x", "amp": False})
    assert cmd[1:4] == ["-m", "monai.bundle", "run"]
    assert cmd[4] == "--config_file" and cmd[6:8] == ["--bundle_root", str(BREAST_BUNDLE)]
    args = dict(zip(cmd[8::2], cmd[9::2]))
    assert args == {"--pretrained_weights": "None", "--pixdim": "[1.5, 1.5, 2.0]", "--dataset_dir": "/data/x",
                    "--amp": "False"}
