# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Statistics of a reader study against hand-computed values, and the analysis of a study with planted answers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from meddiff.cli.main import main
from meddiff.data.errors import DataError
from meddiff.reader_study import RatingsDB, analyse_study, build_study, icc, load_key, load_public_study, weighted_kappa
from tests.reader_study.helpers import make_folders


def test_cohen_kappa_textbook() -> None:
    """Two readers, 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> po 0.7, pe 0.5, kappa 0.4."""
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert weighted_kappa(a, b, weights=None) == pytest.approx(0.4)
    # with two categories every weighting is the same
    assert weighted_kappa(a, b, weights="quadratic") == pytest.approx(0.4)


def test_weighted_kappa_by_hand() -> None:
    """A = 1 2 3 3, B = 1 3 3 2 on categories 1-3 (worked out on paper).

    Observed proportions: (1,1) (2,3) (3,3) (3,2), 1/4 each; marginals 1/4, 1/4, 1/2 for both readers.
    Quadratic weights 0, 1/4, 1: observed disagreement 2 * 1/4 * 1/4 = 1/8; expected
    2 * (1/16 * 1/4 + 1/8 * 1 + 1/8 * 1/4) = 11/32; kappa = 1 - (1/8) / (11/32) = 7/11.
    Linear weights 0, 1/2, 1: observed 1/4, expected 2 * (1/32 + 1/8 + 1/16) = 7/16; kappa = 1 - 4/7 = 3/7.
    Unweighted: po = 1/2, pe = 1/16 + 1/16 + 1/4 = 3/8; kappa = (1/2 - 3/8) / (5/8) = 1/5.
    """
    a, b = [1, 2, 3, 3], [1, 3, 3, 2]
    assert weighted_kappa(a, b, categories=[1, 2, 3]) == pytest.approx(7 / 11)
    assert weighted_kappa(a, b, categories=[1, 2, 3], weights="linear") == pytest.approx(3 / 7)
    assert weighted_kappa(a, b, categories=[1, 2, 3], weights=None) == pytest.approx(1 / 5)
    assert weighted_kappa(a, a, categories=range(1, 6)) == 1.0
    assert math.isnan(weighted_kappa([3, 3], [3, 3]))  # no expected disagreement
    with pytest.raises(ValueError, match="equally long"):
        weighted_kappa([1], [1, 2])
    with pytest.raises(ValueError, match="not among the categories"):
        weighted_kappa([1, 6], [1, 2], categories=range(1, 6))
    with pytest.raises(ValueError, match="weights"):
        weighted_kappa([1], [1], weights="cubic")


def test_icc_shrout_fleiss() -> None:
    """Shrout & Fleiss (1979), Table 2: six targets, four judges; the published ICCs (two decimals)."""
    y = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])
    got = icc(y)
    published = {"ICC(1,1)": 0.17, "ICC(2,1)": 0.29, "ICC(3,1)": 0.71, "ICC(1,k)": 0.44, "ICC(2,k)": 0.62,
                 "ICC(3,k)": 0.91}
    for name, value in published.items():
        assert got[name] == pytest.approx(value, abs=0.006), name
    assert icc(np.array([[1, 1], [3, 3], [5, 5]]))["ICC(2,1)"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="targets >= 2"):
        icc(np.ones((1, 3)))


def _planted(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    real, syn = make_folders(tmp_path / "data", n_real=5, n_syn=5)
    study = build_study(real, syn, tmp_path / "study", seed=11)
    key = load_key(study)
    real_cases = sorted(c for c, v in key["cases"].items() if v["truth"] == "real")
    syn_cases = sorted(c for c, v in key["cases"].items() if v["truth"] == "synthetic")
    cases = real_cases + syn_cases  # c0-c4 real, c5-c9 synthetic
    public = load_public_study(study)
    db = RatingsDB(study / "ratings.sqlite", public["cases"], ["realism", "anatomy", "consistency"], key["seed"])
    # reader A misses c4 and c9 (8/10); reader B misses c3, c4, c8, c9 (6/10)
    answers = {
        "A": ["real"] * 4 + ["synthetic"] * 5 + ["real"],
        "B": ["real"] * 3 + ["synthetic"] * 5 + ["real"] * 2,
    }
    realism = [5, 5, 4, 4, 5, 1, 2, 2, 1, 2]  # both readers, real above synthetic
    anatomy = {"A": [1, 2, 3, 3, 3, 3, 3, 3, 3, 3], "B": [1, 3, 3, 2, 3, 3, 3, 3, 3, 3]}
    for reader in ("A", "B"):
        db.login(reader)
        for i, case in enumerate(cases):
            scores = {"realism": realism[i], "anatomy": anatomy[reader][i], "consistency": 3}
            db.record(reader, case, scores, answers[reader][i], seconds=10.0 + i)
    return study, dict(zip([f"c{i}" for i in range(10)], cases))


def test_planted_study(tmp_path: Path) -> None:
    study, _ = _planted(tmp_path)
    result = analyse_study(study)
    acc = {a["reader"]: a for a in result["accuracy"]}
    assert (acc["A"]["correct"], acc["A"]["n"], acc["B"]["correct"]) == (8, 10, 6)
    assert acc["A"]["accuracy"] == 0.8 and acc["B"]["accuracy"] == 0.6 and acc["all"]["accuracy"] == 0.7
    # exact (Clopper-Pearson) 95 % interval of 8/10, and the two-sided binomial p: 2 * 56 / 1024
    assert (acc["A"]["ci_low"], acc["A"]["ci_high"]) == pytest.approx((0.4439, 0.9748), abs=1e-4)
    assert acc["A"]["p_value"] == pytest.approx(112 / 1024)
    assert acc["A"]["sensitivity"] == acc["A"]["specificity"] == 0.8
    assert acc["A"]["mean_seconds"] == pytest.approx(14.5)

    agree = {(a["item"], a["statistic"]): a for a in result["agreement"]}
    # answers: A real/B real 4, A real/B synthetic 1, A synthetic/B real 1, both synthetic 4 -> po 0.8, pe 0.5
    assert agree[("real or synthetic", "Cohen's kappa")]["value"] == pytest.approx(0.6)
    assert agree[("realism", "weighted kappa (quadratic)")]["value"] == pytest.approx(1.0)
    assert agree[("realism", "ICC(2,1)")]["value"] == pytest.approx(1.0)
    # anatomy: the hand-worked 1 2 3 3 / 1 3 3 2 pattern plus six (3, 3) pairs, categories 1-5, quadratic:
    # observed 2 * (1/10) * (1/16) = 1/80; marginals (1, 1, 8)/10 for categories 1, 2, 3 for both readers;
    # expected 2 * (1/100 * 1/16 + 8/100 * 1/4 + 8/100 * 1/16) = 41/800; kappa = 1 - (10/800) / (41/800) = 31/41
    assert agree[("anatomy", "weighted kappa (quadratic)")]["value"] == pytest.approx(31 / 41)
    assert math.isnan(agree[("consistency", "weighted kappa (quadratic)")]["value"])  # all 3s: undefined

    scores = {(s["question"], s["reader"]): s for s in result["scores"]}
    realism = scores[("realism", "A")]
    assert (realism["mean_real"], realism["median_real"]) == (4.6, 5.0)
    assert (realism["mean_synthetic"], realism["median_synthetic"]) == (1.6, 2.0)
    assert realism["mannwhitney_u"] == 25.0 and realism["p_value"] < 0.05  # every real above every synthetic
    assert scores[("consistency", "all")]["p_value"] == 1.0

    out = study / "analysis"
    for name in ("ratings.csv", "scores.csv", "accuracy.csv", "agreement.csv", "summary.png", "summary.html"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "ratings.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 10 * 3 and sum(int(r["correct"]) for r in rows) == (8 + 6) * 3
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.6" in (out / "summary.html").read_text()


def test_analyse_cli_and_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    real, syn = make_folders(tmp_path / "data", n_real=1, n_syn=1)
    study = build_study(real, syn, tmp_path / "study")
    with pytest.raises(DataError, match="no reader has rated"):
        analyse_study(study)
    with pytest.raises(SystemExit) as e:
        main(["reader-study", "analyse", str(tmp_path / "data")])
    assert e.value.code == 1 and "is not a reader study" in caplog.text
    key = load_key(study)
    db = RatingsDB(study / "ratings.sqlite", list(key["cases"]), ["realism", "anatomy", "consistency"], key["seed"])
    db.login("solo")
    case = next(iter(key["cases"]))
    db.record("solo", case, {"realism": 3, "anatomy": 3, "consistency": 3}, "real", 1.0)
    main(["reader-study", "analyse", str(study), "--out_dir", str(tmp_path / "out")])
    assert "One reader so far" in (tmp_path / "out" / "summary.html").read_text()
    (study / "key.json").unlink()
    with pytest.raises(DataError, match="key.json: is missing"):
        analyse_study(study)
