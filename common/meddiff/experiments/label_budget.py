# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The label-budget experiment of Khader et al. (2023): does synthetic pre-training help when labels are few?

For every label budget (a number of labelled cases, or a fraction of the labelled pool) and every
seed, the breast segmentation bundle is trained twice with the same cases, seed and schedule: from
scratch and from the self-supervised pre-trained weights (pre-training on the synthetic volumes runs
once). Each model is evaluated on the same fixed test set. Results:

* ``runs/n<NNN>_seed<S>_<init>/result.json`` per run (a run with this file is never redone, so an
  interrupted experiment resumes where it stopped; unfinished training resumes exactly from its checkpoints,
  ``resume`` is on for every stage);
* ``results.csv`` (one row per run), ``per_case.csv`` (one row per run and test case);
* ``summary.csv`` per budget: mean Dice per initialisation with a 95% t confidence interval over
  seeds, the paired difference, a Wilcoxon signed-rank test over (seed, test case) pairs and a
  paired t-test over seed means;
* ``dice_vs_budget.png``: Dice against label budget with the confidence intervals and p-values.

The workflows run through ``python -m monai.bundle run`` (``launcher="subprocess"``, one process per
stage, logs in each run folder) or in this process (``launcher="inprocess"``, faster for small runs).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.errors import DataError
from meddiff.data.segmentation import load_labelled_datalist
from meddiff.utils import atomic_path, atomic_write_json, atomic_write_text

__all__ = [
    "INITS",
    "STAGE_CONFIGS",
    "ExperimentError",
    "default_bundle",
    "run_label_budget_experiment",
    "run_stage",
    "stage_command",
    "summarize_label_budget",
]

logger = logging.getLogger(__name__)

#: workflow -> config files merged in this order (relative to the bundle)
STAGE_CONFIGS: dict[str, list[str]] = {
    "pretrain": ["configs/train.json", "configs/pretrain.json"],
    "train": ["configs/train.json"],
    "evaluate": ["configs/inference.json", "configs/evaluate.json"],
    "inference": ["configs/inference.json"],
}
#: initialisation name -> legend label
INITS: dict[str, str] = {"scratch": "from scratch", "pretrained": "synthetic pre-training"}


class ExperimentError(RuntimeError):
    """A stage of the experiment failed, or the output folder belongs to a different experiment."""


def default_bundle() -> Path:
    """The repository's ``bundles/breast_mri_segmentation`` (for an editable install of meddiff)."""
    return Path(__file__).resolve().parents[3] / "bundles" / "breast_mri_segmentation"


def _cli_value(value: Any) -> str:
    """A command-line value that ``python -m monai.bundle run`` (fire) parses back to ``value``."""
    return value if isinstance(value, str) else repr(value)


def stage_command(bundle: str | os.PathLike, stage: str, overrides: Mapping[str, Any]) -> list[str]:
    """The ``python -m monai.bundle run`` command of one workflow (run it with ``cwd=bundle``).

    Args:
        bundle: the bundle folder.
        stage: ``"pretrain"``, ``"train"``, ``"evaluate"`` or ``"inference"``.
        overrides: config ids and values.

    Returns:
        The argument list.
    """
    configs = "[" + ",".join(f"'{c}'" for c in STAGE_CONFIGS[stage]) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        cmd += [f"--{key}", _cli_value(value)]
    return cmd


def run_stage(
    bundle: str | os.PathLike, stage: str, overrides: Mapping[str, Any], launcher: str = "subprocess",
    log_file: str | os.PathLike | None = None,
) -> None:
    """Run one workflow of the bundle.

    Args:
        bundle: the bundle folder.
        stage: ``"pretrain"``, ``"train"``, ``"evaluate"`` or ``"inference"``.
        overrides: config ids and values.
        launcher: ``"subprocess"`` (``python -m monai.bundle run``, output appended to ``log_file``) or
            ``"inprocess"`` (``monai.bundle.run`` in this process).
        log_file: subprocess output file (default: inherited stdout/stderr).

    Raises:
        ExperimentError: the workflow failed (the message quotes the end of its log).
        ValueError: unknown ``stage`` or ``launcher``.
    """
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"stage must be one of {sorted(STAGE_CONFIGS)}, got {stage!r}")
    bundle = Path(bundle).resolve()
    if launcher == "inprocess":
        from monai.bundle import run as bundle_run

        try:
            bundle_run(config_file=[str(bundle / c) for c in STAGE_CONFIGS[stage]],
                       meta_file=str(bundle / "configs" / "metadata.json"),
                       logging_file=str(bundle / "configs" / "logging.conf"), bundle_root=str(bundle), **overrides)
        except Exception as e:
            root = e
            while root.__cause__ is not None:  # MONAI wraps transform errors: report the original one
                root = root.__cause__
            cause = f" (caused by {type(root).__name__}: {root})" if root is not e else ""
            raise ExperimentError(f"{stage} failed: {type(e).__name__}: {e}{cause}") from e
        return
    if launcher != "subprocess":
        raise ValueError(f"launcher must be 'subprocess' or 'inprocess', got {launcher!r}")
    cmd = stage_command(bundle, stage, overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if log_file is None:
        proc = subprocess.run(cmd, cwd=bundle, env=env, check=False)
        tail = ""
    else:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as log:
            log.write(f"$ (cd {bundle} && {' '.join(cmd)})\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=bundle, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        tail = "\n".join(Path(log_file).read_text(errors="replace").splitlines()[-15:])
    if proc.returncode != 0:
        where = f"; see {log_file}:\n{tail}" if log_file is not None else ""
        raise ExperimentError(f"{stage} failed with exit code {proc.returncode}{where}")


def _resolve_budgets(budgets: Sequence[float], pool_size: int) -> list[int]:
    """Budgets as distinct case counts, ascending (fractions of the pool are rounded, at least 1)."""
    counts = []
    for b in budgets:
        b = float(b)
        if b <= 0 or (b >= 1 and not b.is_integer()):
            raise ValueError(f"a budget is a number of cases (integer >= 1) or a fraction in (0, 1), got {b}")
        n = max(round(b * pool_size), 1) if b < 1 else int(b)
        if n > pool_size:
            raise ValueError(f"budget {b:g} needs {n} labelled cases but the pool has {pool_size} "
                             "(training cases minus the validation cases)")
        counts.append(n)
    return sorted(set(counts))


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and t confidence interval (NaN bounds for fewer than two values)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def summarize_label_budget(results: Sequence[Mapping[str, Any]], metric: str = "dice_breast") -> list[dict[str, Any]]:
    """Per-budget statistics of finished runs.

    Args:
        results: run results (``result.json`` contents: ``budget``, ``seed``, ``init``, ``cases``).
        metric: per-case metric compared (``dice_<class>``).

    Returns:
        One row per budget: for each initialisation the mean over seeds of the per-run mean metric with
        a 95% t interval, the paired difference (pretrained - scratch), the Wilcoxon signed-rank p-value
        over (seed, case) pairs and the paired t-test p-value over seed means (NaN where undefined).
    """
    from scipy import stats

    rows = []
    for budget in sorted({int(r["budget"]) for r in results}):
        at = [r for r in results if int(r["budget"]) == budget]
        row: dict[str, Any] = {"budget": budget}
        per_seed: dict[str, dict[int, float]] = {}
        per_case: dict[str, dict[tuple[int, str], float]] = {}
        for init in INITS:
            runs = [r for r in at if r["init"] == init]
            per_seed[init] = {int(r["seed"]): float(np.nanmean([c[metric] for c in r["cases"]])) for r in runs}
            per_case[init] = {(int(r["seed"]), c["case"]): float(c[metric]) for r in runs for c in r["cases"]}
            mean, lo, hi = _t_interval(list(per_seed[init].values()))
            row.update({f"{init}_n_seeds": len(runs), f"{init}_mean": mean, f"{init}_ci_low": lo,
                        f"{init}_ci_high": hi})
            hd = [np.nanmean([c.get("hd95_breast", math.nan) for c in r["cases"]]) for r in runs]
            row[f"{init}_hd95_mean"] = float(np.nanmean(hd)) if hd and np.isfinite(hd).any() else math.nan
        seeds = sorted(set(per_seed["scratch"]) & set(per_seed["pretrained"]))
        diffs = [per_seed["pretrained"][s] - per_seed["scratch"][s] for s in seeds]
        row["n_paired_seeds"] = len(seeds)
        row["difference_mean"] = float(np.mean(diffs)) if diffs else math.nan
        pairs = sorted(set(per_case["scratch"]) & set(per_case["pretrained"]))
        d_case = np.asarray([per_case["pretrained"][k] - per_case["scratch"][k] for k in pairs])
        d_case = d_case[np.isfinite(d_case)]
        row["n_paired_cases"] = int(d_case.size)
        if d_case.size == 0:
            row["wilcoxon_p"] = math.nan
        elif np.allclose(d_case, 0):
            row["wilcoxon_p"] = 1.0
        else:
            row["wilcoxon_p"] = float(stats.wilcoxon(d_case).pvalue)
        if len(seeds) >= 2 and not np.allclose(diffs, 0):
            row["ttest_p"] = float(stats.ttest_rel([per_seed["pretrained"][s] for s in seeds],
                                                   [per_seed["scratch"][s] for s in seeds]).pvalue)
        else:
            row["ttest_p"] = math.nan
        rows.append(row)
    return rows


def plot_label_budget(summary: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str,
                      metric_label: str = "Dice (whole breast)") -> Path:
    """Write the Dice-against-budget plot (PNG, atomically).

    Args:
        summary: rows of :func:`summarize_label_budget`.
        path: the PNG file.
        title: plot title.
        metric_label: y-axis label.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = np.asarray([r["budget"] for r in summary], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for (init, label), colour, offset in zip(INITS.items(), ("tab:grey", "tab:blue"), (-0.02, 0.02)):
        mean = np.asarray([r[f"{init}_mean"] for r in summary], dtype=float)
        # Dice lives in [0, 1]: draw the (symmetric t) interval clipped to it
        lo = np.clip(np.asarray([r[f"{init}_ci_low"] for r in summary], dtype=float), 0.0, 1.0)
        hi = np.clip(np.asarray([r[f"{init}_ci_high"] for r in summary], dtype=float), 0.0, 1.0)
        x = budgets * (1 + offset)  # small shift so the bars do not overlap
        err = np.where(np.isfinite(lo), np.vstack([mean - lo, hi - mean]), 0.0)
        ax.errorbar(x, mean, yerr=err, color=colour, marker="o", capsize=4, label=f"{label} (mean, 95% CI)")
        if np.isfinite(lo).any():
            ax.fill_between(x, np.where(np.isfinite(lo), lo, mean), np.where(np.isfinite(hi), hi, mean),
                            color=colour, alpha=0.15, linewidth=0)
    for r, b in zip(summary, budgets):
        p = r["wilcoxon_p"]
        top = np.nanmax([r["scratch_mean"], r["pretrained_mean"], r["scratch_ci_high"], r["pretrained_ci_high"]])
        if np.isfinite(p) and np.isfinite(top):
            ax.annotate(f"p={p:.2g}", (b, min(top, 1.0) + 0.01), ha="center", va="bottom", fontsize=8)
    if budgets.size > 1 and budgets.max() / budgets.min() >= 4:
        ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(int(b)) for b in budgets])
    ax.minorticks_off()
    low = np.nanmin([[r[f"{i}_mean"], r[f"{i}_ci_low"]] for r in summary for i in INITS])
    ax.set_ylim(max(0.0, (low if np.isfinite(low) else 0.0) - 0.05), 1.05)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel(metric_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.01, "p: Wilcoxon signed-rank, paired (seed, test case)", fontsize=7, color="0.4")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _load_overrides(value: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"overrides file {path} not found (give a dict or a JSON file)")
    return dict(json.loads(path.read_text()))


def run_label_budget_experiment(
    labelled_datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    unlabelled_dir: str | os.PathLike | None = None,
    budgets: Sequence[float] = (5, 10, 20, 50),
    seeds: Sequence[int] = (0, 1, 2),
    num_val: int = 2,
    split_seed: int = 0,
    pretrained_weights: str | os.PathLike | None = None,
    bundle: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | str | os.PathLike | None = None,
    pretrain_overrides: Mapping[str, Any] | str | os.PathLike | None = None,
    train_overrides: Mapping[str, Any] | str | os.PathLike | None = None,
    evaluate_overrides: Mapping[str, Any] | str | os.PathLike | None = None,
    launcher: str = "subprocess",
    title: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the label-budget experiment and write the CSVs and the plot.

    Args:
        labelled_datalist: Decathlon-style JSON with ``training`` (the labelled pool) and ``test`` (the
            fixed test set) image/label pairs (e.g. ``dataset.json`` of ``meddiff breast-phantoms``).
        output_dir: experiment folder (created; rerun with the same folder to resume).
        unlabelled_dir: folder of unlabelled (synthetic) volumes for pre-training, run once.
        budgets: label budgets: numbers of labelled cases, or fractions of the pool in ``(0, 1)``.
        seeds: seeds; each draws its own nested subsets of the pool and seeds the training.
        num_val: validation cases taken once from the pool (fixed for all runs, used for best-checkpoint
            selection); the remaining cases form the pool the budgets draw from.
        split_seed: seed of the validation draw and (with each seed) of the budget subsets.
        pretrained_weights: use these pre-trained weights instead of running pre-training.
        bundle: the breast segmentation bundle (default: the repository's).
        overrides: config overrides for every stage (e.g. network size, ``max_steps``), a dict or JSON file.
        pretrain_overrides: extra overrides of the pre-training stage.
        train_overrides: extra overrides of the training runs.
        evaluate_overrides: extra overrides of the evaluation runs.
        launcher: ``"subprocess"`` or ``"inprocess"`` (see :func:`run_stage`).
        title: plot title (default: from the datalist, marked when the data are phantoms).

    Returns:
        ``{"results_csv", "per_case_csv", "summary_csv", "plot", "summary", "runs_done", "runs_skipped"}``.

    Raises:
        DataError: bad datalist (missing files, no test set).
        ValueError: bad budgets, or neither ``unlabelled_dir`` nor ``pretrained_weights``.
        ExperimentError: a stage failed, or ``output_dir`` holds an experiment with other settings.
    """
    out = Path(output_dir).resolve()
    budgets = [budgets] if isinstance(budgets, (int, float)) else list(budgets)  # `--budgets 5` on the CLI
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    bundle_dir = Path(bundle).resolve() if bundle is not None else default_bundle()
    if not (bundle_dir / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"{bundle_dir} is not the breast segmentation bundle (no configs/train.json); "
                                "pass --bundle")
    if unlabelled_dir is None and pretrained_weights is None:
        raise ValueError("give unlabelled_dir (volumes to pre-train on) or pretrained_weights")
    common = _load_overrides(overrides)
    stage_extra = {"pretrain": _load_overrides(pretrain_overrides), "train": _load_overrides(train_overrides),
                   "evaluate": _load_overrides(evaluate_overrides)}
    labelled = Path(labelled_datalist).resolve()
    splits = load_labelled_datalist(labelled, val_fraction=0.0, require_label=True)
    if not splits["test"]:
        raise DataError(labelled, "has no 'test' split: the experiment needs a fixed labelled test set")
    is_phantom = bool(json.loads(labelled.read_text()).get("phantom", False))
    pool = list(splits["training"]) + list(splits["validation"])
    if not 1 <= num_val < len(pool):
        raise ValueError(f"num_val must be in [1, {len(pool) - 1}] for a pool of {len(pool)} cases, got {num_val}")
    order = list(range(len(pool)))
    random.Random(split_seed).shuffle(order)
    val_items = [pool[i] for i in order[:num_val]]
    pool = [pool[i] for i in order[num_val:]]
    counts = _resolve_budgets(budgets, len(pool))

    # the settings that must not change between a run and its resumption
    fixed = {"labelled_datalist": str(labelled), "pool": pool, "validation": val_items, "test": splits["test"],
             "split_seed": split_seed, "overrides": common, "stage_overrides": stage_extra,
             "unlabelled_dir": str(Path(unlabelled_dir).resolve()) if unlabelled_dir is not None else None,
             "pretrained_weights": str(Path(pretrained_weights).resolve()) if pretrained_weights else None}
    plan_file = out / "experiment.json"
    if plan_file.is_file():
        previous = json.loads(plan_file.read_text())
        changed = sorted(k for k in fixed if previous.get(k) != json.loads(json.dumps(fixed[k])))
        if changed:
            raise ExperimentError(f"{out} holds an experiment with different {', '.join(changed)}; "
                                  "use another output_dir or delete it")
    atomic_write_json(plan_file, {**fixed, "budgets": counts, "seeds": [int(s) for s in seeds],
                                  "bundle": str(bundle_dir), "phantom": is_phantom})
    atomic_write_json(out / "test_datalist.json", {"test": splits["test"]})

    # 1. pre-training, once
    weights = Path(pretrained_weights).resolve() if pretrained_weights else out / "pretrain" / "pretrained.pt"
    if pretrained_weights is None:
        done = out / "pretrain" / "done.json"
        if done.is_file() and weights.is_file():
            logger.info("pre-training already done: %s", weights)
        else:
            logger.info("pre-training on %s", unlabelled_dir)
            tic = time.perf_counter()
            run_stage(bundle_dir, "pretrain", {**common, **stage_extra["pretrain"],
                                               "dataset_dir": str(Path(unlabelled_dir).resolve()),
                                               "ckpt_dir": str(out / "pretrain"), "resume": True},
                      launcher=launcher, log_file=out / "pretrain" / "pretrain.log")
            atomic_write_json(done, {"weights": str(weights), "seconds": time.perf_counter() - tic})
    elif not weights.is_file():
        raise FileNotFoundError(f"pre-trained weights file {weights} not found")

    # 2. the runs
    runs_done = runs_skipped = 0
    total = len(counts) * len(seeds) * len(INITS)
    k = 0
    results = []
    for n in counts:
        for seed in seeds:
            subset_order = list(range(len(pool)))
            random.Random(split_seed * 1_000_003 + int(seed)).shuffle(subset_order)
            subset = [pool[i] for i in subset_order[:n]]  # nested: a larger budget adds cases
            for init in INITS:
                k += 1
                run_dir = out / "runs" / f"n{n:03d}_seed{seed}_{init}"
                result_file = run_dir / "result.json"
                if result_file.is_file():
                    results.append(json.loads(result_file.read_text()))
                    runs_skipped += 1
                    logger.info("run %d/%d (%d cases, seed %s, %s) already done", k, total, n, seed, INITS[init])
                    continue
                logger.info("run %d/%d: %d labelled cases, seed %s, %s", k, total, n, seed, INITS[init])
                atomic_write_json(run_dir / "datalist.json", {"training": subset, "validation": val_items})
                tic = time.perf_counter()
                run_stage(bundle_dir, "train", {**common, **stage_extra["train"], "seed": int(seed),
                                                "dataset_dir": str(run_dir),
                                                "datalist_file": str(run_dir / "datalist.json"),
                                                "ckpt_dir": str(run_dir / "models"), "resume": True,
                                                "pretrained_weights": str(weights) if init == "pretrained" else None},
                          launcher=launcher, log_file=run_dir / "train.log")
                train_s = time.perf_counter() - tic
                tic = time.perf_counter()
                run_stage(bundle_dir, "evaluate", {**common, **stage_extra["evaluate"], "seed": int(seed),
                                                   "dataset_dir": str(out),
                                                   "datalist_file": str(out / "test_datalist.json"),
                                                   "model_file": str(run_dir / "models" / "model.pt"),
                                                   "output_dir": str(run_dir / "eval")},
                          launcher=launcher, log_file=run_dir / "evaluate.log")
                summary = json.loads((run_dir / "eval" / "summary.json").read_text())
                train_summary_file = run_dir / "models" / "segmentation_summary.json"
                best = json.loads(train_summary_file.read_text()).get("best_metric") \
                    if train_summary_file.is_file() else None
                result = {"budget": n, "seed": int(seed), "init": init, "training_cases": [s["image"] for s in subset],
                          "best_val_dice": None if best is None else 1.0 - float(best),
                          "metrics": summary["metrics"], "cases": summary["cases"],
                          "train_seconds": train_s, "eval_seconds": time.perf_counter() - tic}
                atomic_write_json(result_file, result)
                results.append(result)
                runs_done += 1

    # 3. tables and plot
    run_rows, case_rows = [], []
    for r in results:
        means = {f"{m}_mean": s.get("mean") for m, s in r["metrics"].items()}
        run_rows.append({"budget": r["budget"], "seed": r["seed"], "init": r["init"], **means,
                         "best_val_dice": r.get("best_val_dice"), "train_seconds": r.get("train_seconds")})
        for c in r["cases"]:
            case_rows.append({"budget": r["budget"], "seed": r["seed"], "init": r["init"],
                              **{k: v for k, v in c.items() if k not in ("image", "label")}})
    metric_cols = list(results[0]["metrics"]) if results else []
    _write_csv(out / "results.csv", run_rows, ["budget", "seed", "init", *(f"{m}_mean" for m in metric_cols),
                                               "best_val_dice", "train_seconds"])
    _write_csv(out / "per_case.csv", case_rows, ["budget", "seed", "init", "case", *metric_cols])
    summary_rows = summarize_label_budget(results)
    summary_cols = ["budget"] + [f"{i}_{s}" for i in INITS for s in ("n_seeds", "mean", "ci_low", "ci_high",
                                                                         "hd95_mean")]
    summary_cols += ["n_paired_seeds", "difference_mean", "n_paired_cases", "wilcoxon_p", "ttest_p"]
    _write_csv(out / "summary.csv", summary_rows, summary_cols)
    if title is None:
        title = "Whole-breast Dice vs label budget" + (" (PHANTOM data, not patients)" if is_phantom else "")
    plot = plot_label_budget(summary_rows, out / "dice_vs_budget.png", title)
    logger.info("label-budget experiment: %d runs done, %d already done; results in %s", runs_done, runs_skipped,
                out)
    return {"results_csv": str(out / "results.csv"), "per_case_csv": str(out / "per_case.csv"),
            "summary_csv": str(out / "summary.csv"), "plot": str(plot), "summary": summary_rows,
            "runs_done": runs_done, "runs_skipped": runs_skipped}
