# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Analyse a reader study: real vs synthetic scores, detection accuracy, inter-reader agreement.

Writes ``STUDY/analysis/``: ``ratings.csv`` (every answer with the truth), ``scores.csv`` (per question and
reader: mean/median for real and synthetic, Mann-Whitney U), ``accuracy.csv`` (real-vs-synthetic accuracy,
exact binomial 95 % CI and test against chance = 50 %), ``agreement.csv`` (pairwise weighted Cohen's kappa
and ICC per question), ``summary.png`` and ``summary.html``.

:func:`weighted_kappa` and :func:`icc` are implemented here (numpy): Cohen (1968) weighted kappa with
linear or quadratic disagreement weights, and the six intraclass correlations of Shrout & Fleiss (1979)
from the two-way ANOVA mean squares.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ..data.errors import DataError
from .build import load_key, load_public_study
from .db import DB_FILE, RatingsDB

__all__ = ["analyse_study", "icc", "weighted_kappa"]

logger = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"


def weighted_kappa(
    a: Sequence[Any], b: Sequence[Any], categories: Sequence[Any] | None = None, weights: str | None = "quadratic"
) -> float:
    """Cohen's weighted kappa of two raters' ratings of the same items.

    ``kappa = 1 - sum(w * observed) / sum(w * expected)`` with disagreement weights
    ``w_ij = |i - j| / (K - 1)`` (linear), ``((i - j) / (K - 1))**2`` (quadratic) or ``i != j`` (``None``:
    Cohen's unweighted kappa), ``observed`` the K x K table of proportions and ``expected`` the outer
    product of its marginals.

    Args:
        a: first rater's category per item.
        b: second rater's category per item (same length).
        categories: the ordered categories (default: the sorted union of both raters' values).
        weights: ``"quadratic"``, ``"linear"`` or ``None``.

    Returns:
        Kappa; NaN when the expected disagreement is zero (both raters used one and the same category).

    Raises:
        ValueError: different lengths, no items, an unknown category or weighting.
    """
    if len(a) != len(b) or not len(a):
        raise ValueError(f"need two equally long, non-empty rating lists, got {len(a)} and {len(b)}")
    cats = list(categories) if categories is not None else sorted(set(a) | set(b))
    index = {c: i for i, c in enumerate(cats)}
    unknown = (set(a) | set(b)) - set(index)
    if unknown:
        raise ValueError(f"ratings {sorted(unknown)} are not among the categories {cats}")
    k = len(cats)
    table = np.zeros((k, k))
    for x, y in zip(a, b):
        table[index[x], index[y]] += 1
    table /= table.sum()
    expected = np.outer(table.sum(axis=1), table.sum(axis=0))
    i, j = np.indices((k, k))
    if weights is None:
        w = (i != j).astype(float)
    elif weights == "linear":
        w = np.abs(i - j) / max(k - 1, 1)
    elif weights == "quadratic":
        w = ((i - j) / max(k - 1, 1)) ** 2
    else:
        raise ValueError(f"weights must be 'quadratic', 'linear' or None, got {weights!r}")
    denom = float((w * expected).sum())
    return float("nan") if denom == 0 else 1.0 - float((w * table).sum()) / denom


def icc(ratings: np.ndarray) -> dict[str, float]:
    """Intraclass correlations of Shrout & Fleiss (1979) for ``n`` targets rated by the same ``k`` raters.

    From the mean squares of targets (MSR), raters (MSC), error (MSE) and within targets (MSW):
    ``ICC(1,1) = (MSR - MSW) / (MSR + (k-1) MSW)``,
    ``ICC(2,1) = (MSR - MSE) / (MSR + (k-1) MSE + k (MSC - MSE) / n)`` (two-way random, absolute agreement),
    ``ICC(3,1) = (MSR - MSE) / (MSR + (k-1) MSE)`` (two-way mixed, consistency), and the ``(., k)`` forms
    for the mean of the k raters.

    Args:
        ratings: array ``(n, k)``, one row per target, one column per rater; n >= 2, k >= 2.

    Returns:
        ``{"ICC(1,1)", "ICC(2,1)", "ICC(3,1)", "ICC(1,k)", "ICC(2,k)", "ICC(3,k)"}``; NaN where a
        denominator is zero (e.g. all ratings equal).

    Raises:
        ValueError: not a 2D array with at least 2 targets and 2 raters, or NaN in it.
    """
    y = np.asarray(ratings, dtype=float)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"ratings must be (targets >= 2, raters >= 2), got shape {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("ratings contain NaN or Inf")
    n, k = y.shape
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((y - grand) ** 2).sum()
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    msw = (ss_total - ss_rows) / (n * (k - 1))

    def ratio(num: float, den: float) -> float:
        return float("nan") if den == 0 else float(num / den)

    return {
        "ICC(1,1)": ratio(msr - msw, msr + (k - 1) * msw),
        "ICC(2,1)": ratio(msr - mse, msr + (k - 1) * mse + k * (msc - mse) / n),
        "ICC(3,1)": ratio(msr - mse, msr + (k - 1) * mse),
        "ICC(1,k)": ratio(msr - msw, msr),
        "ICC(2,k)": ratio(msr - mse, msr + (msc - mse) / n),
        "ICC(3,k)": ratio(msr - mse, msr),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _csv_text(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _fmt(r.get(c, "")) for c in columns})
    return buf.getvalue()


def _score_stats(rows: list[dict[str, Any]], questions: Sequence[str], readers: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for q in questions:
        for reader in [*readers, "all"]:
            sel = [r for r in rows if r["question"] == q and (reader == "all" or r["reader"] == reader)]
            real = np.array([r["score"] for r in sel if r["truth"] == "real"], dtype=float)
            syn = np.array([r["score"] for r in sel if r["truth"] == "synthetic"], dtype=float)
            u, p = float("nan"), float("nan")
            if len(real) and len(syn):
                res = stats.mannwhitneyu(real, syn, alternative="two-sided")
                u, p = float(res.statistic), float(res.pvalue)
            out.append({
                "question": q, "reader": reader, "n_real": len(real), "n_synthetic": len(syn),
                "mean_real": float(real.mean()) if len(real) else float("nan"),
                "median_real": float(np.median(real)) if len(real) else float("nan"),
                "mean_synthetic": float(syn.mean()) if len(syn) else float("nan"),
                "median_synthetic": float(np.median(syn)) if len(syn) else float("nan"),
                "mannwhitney_u": u, "p_value": p,
            })
    return out


def _accuracy(answers: dict[tuple[str, str], dict[str, Any]], readers: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for reader in [*readers, "all"]:
        sel = [v for (rd, _), v in answers.items() if reader == "all" or rd == reader]
        n = len(sel)
        correct = sum(v["answer"] == v["truth"] for v in sel)
        syn = [v for v in sel if v["truth"] == "synthetic"]
        real = [v for v in sel if v["truth"] == "real"]
        row = {"reader": reader, "n": n, "correct": correct, "accuracy": correct / n if n else float("nan"),
               "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
               "sensitivity": sum(v["answer"] == "synthetic" for v in syn) / len(syn) if syn else float("nan"),
               "specificity": sum(v["answer"] == "real" for v in real) / len(real) if real else float("nan"),
               "mean_seconds": float(np.mean([v["seconds"] for v in sel])) if sel else float("nan")}
        if n:
            test = stats.binomtest(correct, n, 0.5)
            ci = test.proportion_ci(confidence_level=0.95, method="exact")
            row.update(ci_low=float(ci.low), ci_high=float(ci.high), p_value=float(test.pvalue))
        out.append(row)
    return out


def _agreement(
    rows: list[dict[str, Any]], answers: dict[tuple[str, str], dict[str, Any]], questions: Sequence[str],
    readers: Sequence[str],
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    scores: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)  # (question, reader) -> case -> score
    for r in rows:
        scores[(r["question"], r["reader"])][r["case"]] = r["score"]
    for a, b in itertools.combinations(readers, 2):
        for q in questions:
            common = sorted(set(scores[(q, a)]) & set(scores[(q, b)]))
            kappa = weighted_kappa([scores[(q, a)][c] for c in common], [scores[(q, b)][c] for c in common],
                                   categories=range(1, 6)) if common else float("nan")
            out.append({"item": q, "statistic": "weighted kappa (quadratic)", "readers": f"{a}|{b}",
                        "n": len(common), "value": kappa})
        ans_a = {c: v["answer"] for (rd, c), v in answers.items() if rd == a}
        ans_b = {c: v["answer"] for (rd, c), v in answers.items() if rd == b}
        common = sorted(set(ans_a) & set(ans_b))
        kappa = weighted_kappa([ans_a[c] for c in common], [ans_b[c] for c in common],
                               categories=["real", "synthetic"], weights=None) if common else float("nan")
        out.append({"item": "real or synthetic", "statistic": "Cohen's kappa", "readers": f"{a}|{b}",
                    "n": len(common), "value": kappa})
    if len(readers) >= 2:
        for q in questions:
            common = sorted(set.intersection(*(set(scores[(q, rd)]) for rd in readers)))
            values = {"ICC(2,1)": float("nan"), "ICC(3,1)": float("nan")}
            if len(common) >= 2:
                values = icc(np.array([[scores[(q, rd)][c] for rd in readers] for c in common]))
            for name in ("ICC(2,1)", "ICC(3,1)"):
                out.append({"item": q, "statistic": name, "readers": "|".join(readers), "n": len(common),
                            "value": values[name]})
    return out


def _plot(path: Path, score_rows: list[dict[str, Any]], rows: list[dict[str, Any]], acc: list[dict[str, Any]],
          questions: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.atomic import atomic_path

    nq = len(questions)
    fig, axes = plt.subplots(1, nq + 1, figsize=(3.2 * (nq + 1), 3.4), constrained_layout=True)
    rng = np.random.default_rng(0)
    for ax, q in zip(axes, questions):
        data = [[r["score"] for r in rows if r["question"] == q["id"] and r["truth"] == t] for t in ("real", "synthetic")]
        ax.boxplot(data, widths=0.5, showfliers=False)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), np.asarray(d) + rng.uniform(-0.12, 0.12, len(d)),
                       s=10, alpha=0.5, color="C0" if i == 1 else "C3")
        ax.set_xticks([1, 2], ["real", "synthetic"])
        p = next(s["p_value"] for s in score_rows if s["question"] == q["id"] and s["reader"] == "all")
        ax.set_title(f"{q['id']} (Mann-Whitney p={_fmt(p)})", fontsize=9)
        ax.set_ylim(0.5, 5.5)
        ax.set_yticks(range(1, 6))
        ax.set_ylabel("Likert score")
    ax = axes[-1]
    names = [a["reader"] for a in acc]
    x = np.arange(len(acc))
    accs = np.array([a["accuracy"] for a in acc])
    err = np.array([[a["accuracy"] - a["ci_low"] for a in acc], [a["ci_high"] - a["accuracy"] for a in acc]])
    ax.bar(x, accs, color=["C2"] * (len(acc) - 1) + ["C7"])
    ax.errorbar(x, accs, yerr=err, fmt="none", color="k", capsize=3)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95 % CI)")
    ax.set_title("real or synthetic?", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _html_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_SCORE_COLS = ("question", "reader", "n_real", "n_synthetic", "mean_real", "median_real", "mean_synthetic",
               "median_synthetic", "mannwhitney_u", "p_value")
_ACC_COLS = ("reader", "n", "correct", "accuracy", "ci_low", "ci_high", "p_value", "sensitivity", "specificity",
             "mean_seconds")
_AGREE_COLS = ("item", "statistic", "readers", "n", "value")
_RATING_COLS = ("reader", "case", "truth", "question", "score", "answer", "correct", "seconds")


def analyse_study(study: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Analyse every rating of a study and write CSV tables, a figure and an HTML summary.

    Args:
        study: the study folder (with ``key.json`` and ``ratings.sqlite``).
        out_dir: where to write (default ``STUDY/analysis``).

    Returns:
        ``{"scores": [...], "accuracy": [...], "agreement": [...], "readers": [...], "out_dir": Path}``
        (the rows of the CSV files).

    Raises:
        DataError: not a study, no key, no ratings yet, or ratings of cases the key does not know.
    """
    from ..utils.atomic import atomic_write_text

    study_path = Path(study)
    public = load_public_study(study_path)
    key = load_key(study_path)
    truth = {c: v["truth"] for c, v in key["cases"].items()}
    questions = [q["id"] for q in public["questions"]]
    db = RatingsDB(RatingsDB.require(study_path / DB_FILE), public["cases"], questions, key["seed"])
    raw = db.rows()
    if not raw:
        raise DataError(study_path / DB_FILE, "holds no ratings yet")
    unknown = sorted({r["case"] for r in raw} - set(truth))
    if unknown:
        raise DataError(study_path / "key.json", f"has no truth for rated cases {unknown}: wrong key for this study?")
    rows = [{**r, "truth": truth[r["case"]], "correct": int(r["answer"] == truth[r["case"]])} for r in raw]
    readers = sorted({r["reader"] for r in rows})
    answers = {(r["reader"], r["case"]): r for r in rows}

    score_rows = _score_stats(rows, questions, readers)
    acc = _accuracy(answers, readers)
    agree = _agreement(rows, answers, questions, readers)

    out = Path(out_dir) if out_dir is not None else study_path / ANALYSIS_DIR
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ratings.csv", _csv_text(rows, _RATING_COLS))
    atomic_write_text(out / "scores.csv", _csv_text(score_rows, _SCORE_COLS))
    atomic_write_text(out / "accuracy.csv", _csv_text(acc, _ACC_COLS))
    atomic_write_text(out / "agreement.csv", _csv_text(agree, _AGREE_COLS))
    _plot(out / "summary.png", score_rows, rows, acc, public["questions"])
    n_cases = len(public["cases"])
    note = "" if len(readers) >= 2 else "<p>One reader so far: agreement needs two.</p>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(public['title'])}: analysis</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #bbb;padding:2px 8px;text-align:right}}th{{background:#eee}}</style></head><body>
<h1>{html.escape(public['title'])}: analysis</h1>
<p>{n_cases} cases ({sum(t == 'synthetic' for t in truth.values())} synthetic), {len(readers)} reader(s),
{len(answers)} rated case(s); modality {html.escape(public['modality'].upper())}, shape {public['shape']}.</p>
<img src="summary.png" alt="scores and accuracy" style="max-width:100%">
<h2>Likert scores, real vs synthetic (two-sided Mann-Whitney U)</h2>{_html_table(score_rows, _SCORE_COLS)}
<h2>Real or synthetic? Accuracy with exact binomial 95 % CI; p against chance (50 %)</h2>
<p>Sensitivity: synthetic cases called synthetic; specificity: real cases called real.
The pooled row counts every reader's answers as independent.</p>{_html_table(acc, _ACC_COLS)}
<h2>Inter-reader agreement</h2>{note}{_html_table(agree, _AGREE_COLS)}
</body></html>
"""
    atomic_write_text(out / "summary.html", page)
    logger.info("analysis of %d reader(s), %d rated case(s): %s", len(readers), len(answers), out / "summary.html")
    return {"scores": score_rows, "accuracy": acc, "agreement": agree, "readers": readers, "out_dir": out}
