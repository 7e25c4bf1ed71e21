# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The label-budget experiment of Khader et al. (2023): does synthetic pre-training help when labels are few?

For every label budget (a number of labelled cases, or a fraction of the labelled pool) and every
seed, the breast segmentation bundle is trained once per arm with the same cases, seed and schedule:
from scratch, and from pre-trained weights (restoration pre-training on unlabelled volumes; the same
on samples of the MRI generation bundle trained on them; supervised pre-training on ControlNet image +
mask pairs made from the budget's own labels, see :mod:`meddiff.experiments.generated_data`). Each model
is evaluated on the same fixed test set. Results:

* ``runs/n<NNN>_seed<S>_<init>/result.json`` per run (a run with this file is never redone, so an
  interrupted experiment resumes where it stopped; unfinished training resumes exactly from its checkpoints,
  ``resume`` is on for every stage);
* ``results.csv`` (one row per run), ``per_case.csv`` (one row per run and test case);
* ``summary.csv`` per budget: mean Dice per arm with a 95% t confidence interval over seeds and, for
  each arm against scratch, the paired difference, a Wilcoxon signed-rank test over (seed, test case)
  pairs and a paired t-test over seed means (and the ControlNet pairs' conditioning fidelity);
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
from meddiff.transforms.label_maps import MASK_AUGMENTATIONS
from meddiff.utils import atomic_path, atomic_write_json, atomic_write_text

__all__ = [
    "GENERATED_ARMS",
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
#: initialisation (arm) name -> legend label; "scratch" is the reference every other arm is paired with
INITS: dict[str, str] = {
    "scratch": "from scratch",
    "pretrained": "restoration pre-training (unlabelled volumes)",
    "generated_ssl": "restoration pre-training (LDM samples)",
    "controlnet_pairs": "supervised pre-training (ControlNet pairs)",
}
#: arms that need the generation bundle trained on the unlabelled pool
GENERATED_ARMS = ("generated_ssl", "controlnet_pairs")


class ExperimentError(RuntimeError):
    """A stage of the experiment failed, or the output folder belongs to a different experiment."""


def default_bundle() -> Path:
    """The repository's ``bundles/breast_mri_segmentation`` (for an editable install of meddiff)."""
    return Path(__file__).resolve().parents[3] / "bundles" / "breast_mri_segmentation"


def _cli_value(value: Any) -> str:
    """A command-line value that ``python -m monai.bundle run`` (fire) parses back to ``value``."""
    return value if isinstance(value, str) else repr(value)


def stage_command(bundle: str | os.PathLike, stage: str, overrides: Mapping[str, Any],
                  configs: Sequence[str] | None = None) -> list[str]:
    """The ``python -m monai.bundle run`` command of one workflow (run it with ``cwd=bundle``).

    Args:
        bundle: the bundle folder.
        stage: ``"pretrain"``, ``"train"``, ``"evaluate"`` or ``"inference"``.
        overrides: config ids and values.
        configs: config files merged in order (relative to the bundle); default ``STAGE_CONFIGS[stage]``.

    Returns:
        The argument list.
    """
    configs = "[" + ",".join(f"'{c}'" for c in (configs or STAGE_CONFIGS[stage])) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        cmd += [f"--{key}", _cli_value(value)]
    return cmd


def run_stage(
    bundle: str | os.PathLike, stage: str, overrides: Mapping[str, Any], launcher: str = "subprocess",
    log_file: str | os.PathLike | None = None, configs: Sequence[str] | None = None,
) -> None:
    """Run one workflow of the bundle.

    Args:
        bundle: the bundle folder.
        stage: ``"pretrain"``, ``"train"``, ``"evaluate"`` or ``"inference"``, or any name when ``configs`` is given.
        overrides: config ids and values.
        launcher: ``"subprocess"`` (``python -m monai.bundle run``, output appended to ``log_file``) or
            ``"inprocess"`` (``monai.bundle.run`` in this process).
        log_file: subprocess output file (default: inherited stdout/stderr).
        configs: config files merged in order (relative to the bundle); default ``STAGE_CONFIGS[stage]``.

    Raises:
        ExperimentError: the workflow failed (the message quotes the end of its log).
        ValueError: unknown ``stage`` or ``launcher``.
    """
    if configs is None and stage not in STAGE_CONFIGS:
        raise ValueError(f"stage must be one of {sorted(STAGE_CONFIGS)}, got {stage!r}")
    configs = list(configs or STAGE_CONFIGS[stage])
    bundle = Path(bundle).resolve()
    if launcher == "inprocess":
        from monai.bundle import run as bundle_run

        try:
            bundle_run(config_file=[str(bundle / c) for c in configs],
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
    cmd = stage_command(bundle, stage, overrides, configs)
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
    """Per-budget statistics of finished runs, every arm paired with training from scratch.

    Args:
        results: run results (``result.json`` contents: ``budget``, ``seed``, ``init``, ``cases``).
        metric: per-case metric compared (``dice_<class>``).

    Returns:
        One row per budget: for each arm present the mean over seeds of the per-run mean metric with a 95% t
        interval and the mean HD95; for each arm but ``scratch`` the paired difference to ``scratch``
        (``<arm>_difference_mean``), the Wilcoxon signed-rank p-value over (seed, case) pairs
        (``<arm>_wilcoxon_p``, ``<arm>_n_paired_cases``) and the paired t-test p-value over seed means
        (``<arm>_ttest_p``); NaN where undefined.
    """
    from scipy import stats

    arms = [i for i in INITS if any(r["init"] == i for r in results)]
    rows = []
    for budget in sorted({int(r["budget"]) for r in results}):
        at = [r for r in results if int(r["budget"]) == budget]
        row: dict[str, Any] = {"budget": budget}
        per_seed: dict[str, dict[int, float]] = {}
        per_case: dict[str, dict[tuple[int, str], float]] = {}
        for init in arms:
            runs = [r for r in at if r["init"] == init]
            per_seed[init] = {int(r["seed"]): float(np.nanmean([c[metric] for c in r["cases"]])) for r in runs}
            per_case[init] = {(int(r["seed"]), c["case"]): float(c[metric]) for r in runs for c in r["cases"]}
            mean, lo, hi = _t_interval(list(per_seed[init].values()))
            row.update({f"{init}_n_seeds": len(runs), f"{init}_mean": mean, f"{init}_ci_low": lo,
                        f"{init}_ci_high": hi})
            hd = [np.nanmean([c.get("hd95_breast", math.nan) for c in r["cases"]]) for r in runs]
            row[f"{init}_hd95_mean"] = float(np.nanmean(hd)) if hd and np.isfinite(hd).any() else math.nan
        for init in arms:
            if init == "scratch" or "scratch" not in per_seed:
                continue
            seeds = sorted(set(per_seed["scratch"]) & set(per_seed[init]))
            diffs = [per_seed[init][s] - per_seed["scratch"][s] for s in seeds]
            row[f"{init}_difference_mean"] = float(np.mean(diffs)) if diffs else math.nan
            pairs = sorted(set(per_case["scratch"]) & set(per_case[init]))
            d_case = np.asarray([per_case[init][k] - per_case["scratch"][k] for k in pairs])
            d_case = d_case[np.isfinite(d_case)]
            row[f"{init}_n_paired_cases"] = int(d_case.size)
            if d_case.size == 0:
                row[f"{init}_wilcoxon_p"] = math.nan
            elif np.allclose(d_case, 0):
                row[f"{init}_wilcoxon_p"] = 1.0
            else:
                row[f"{init}_wilcoxon_p"] = float(stats.wilcoxon(d_case).pvalue)
            if len(seeds) >= 2 and not np.allclose(diffs, 0):
                row[f"{init}_ttest_p"] = float(stats.ttest_rel([per_seed[init][s] for s in seeds],
                                                               [per_seed["scratch"][s] for s in seeds]).pvalue)
            else:
                row[f"{init}_ttest_p"] = math.nan
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
    arms = [i for i in INITS if summary and f"{i}_mean" in summary[0]]
    colours = {"scratch": "tab:grey", "pretrained": "tab:blue", "generated_ssl": "tab:orange",
               "controlnet_pairs": "tab:green"}
    offsets = np.linspace(-0.03, 0.03, len(arms)) if len(arms) > 1 else [0.0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2 + 0.3 * max(len(arms) - 2, 0)), dpi=100)
    for init, offset in zip(arms, offsets):
        label, colour = INITS[init], colours[init]
        mean = np.asarray([r[f"{init}_mean"] for r in summary], dtype=float)
        # Dice lives in [0, 1]: draw the (symmetric t) interval clipped to it
        lo = np.clip(np.asarray([r[f"{init}_ci_low"] for r in summary], dtype=float), 0.0, 1.0)
        hi = np.clip(np.asarray([r[f"{init}_ci_high"] for r in summary], dtype=float), 0.0, 1.0)
        x = budgets * (1 + offset)  # small shift so the bars do not overlap
        err = np.where(np.isfinite(lo), np.vstack([mean - lo, hi - mean]), 0.0)
        ax.errorbar(x, mean, yerr=err, color=colour, marker="o", capsize=4, label=f"{label} (mean, 95% CI)")
        if np.isfinite(lo).any() and len(arms) <= 2:  # bands only where they do not hide each other
            ax.fill_between(x, np.where(np.isfinite(lo), lo, mean), np.where(np.isfinite(hi), hi, mean),
                            color=colour, alpha=0.15, linewidth=0)
    for r, b in zip(summary, budgets):
        # the smallest p of an arm against scratch, named after the arm's colour
        tests = [(r.get(f"{i}_wilcoxon_p", math.nan), i) for i in arms if i != "scratch"]
        tests = [(p, i) for p, i in tests if np.isfinite(p)]
        top = np.nanmax([r[f"{i}_{k}"] for i in arms for k in ("mean", "ci_high")])
        if tests and np.isfinite(top):
            p, best = min(tests)
            ax.annotate(f"p={p:.2g}", (b, min(top, 1.0) + 0.01), ha="center", va="bottom", fontsize=8,
                        color=colours[best])
    if budgets.size > 1 and budgets.max() / budgets.min() >= 4:
        ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(int(b)) for b in budgets])
    ax.minorticks_off()
    low = np.nanmin([[r[f"{i}_mean"], r[f"{i}_ci_low"]] for r in summary for i in arms])
    ax.set_ylim(max(0.0, (low if np.isfinite(low) else 0.0) - 0.05), 1.05)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel(metric_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.01, "p: Wilcoxon signed-rank against from scratch, paired (seed, test case); the arm with the "
             "smallest p, in its colour", fontsize=7, color="0.4")
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


def _run_dir(out: Path, budget: int, seed: int, init: str) -> Path:
    """The folder of one run: ``runs/n<NNN>_seed<S>_<init>``."""
    return out / "runs" / f"n{int(budget):03d}_seed{int(seed)}_{init}"


def _pretrain(bundle_dir: Path, dataset_dir: Path, out: Path, overrides: Mapping[str, Any], launcher: str,
              what: str) -> Path:
    """Self-supervised pre-training on a folder of volumes, once (``<out>/pretrained.pt``)."""
    weights, done = out / "pretrained.pt", out / "done.json"
    if done.is_file() and weights.is_file():
        logger.info("pre-training on %s already done: %s", what, weights)
        return weights
    logger.info("pre-training on %s (%s)", what, dataset_dir)
    tic = time.perf_counter()
    run_stage(bundle_dir, "pretrain", {**overrides, "dataset_dir": str(dataset_dir), "ckpt_dir": str(out),
                                       "resume": True}, launcher=launcher, log_file=out / "pretrain.log")
    atomic_write_json(done, {"weights": str(weights), "dataset_dir": str(dataset_dir),
                             "seconds": time.perf_counter() - tic})
    return weights


def _supervised_pretrain(bundle_dir: Path, pairs_dir: Path, pairs: Sequence[Mapping[str, str]], out: Path,
                         overrides: Mapping[str, Any], seed: int, launcher: str) -> Path:
    """Supervised pre-training on generated image + mask pairs (validated on held-out pairs, never on real labels)."""
    weights, done = out / "model.pt", out / "done.json"
    if done.is_file() and weights.is_file():
        return weights
    items = [{"image": str(pairs_dir / i["image"]), "label": str(pairs_dir / i["label"])} for i in pairs]
    num_val = max(1, len(items) // 10)
    atomic_write_json(out / "datalist.json", {"training": items[:-num_val], "validation": items[-num_val:]})
    tic = time.perf_counter()
    run_stage(bundle_dir, "train", {**overrides, "seed": int(seed), "dataset_dir": str(pairs_dir),
                                    "datalist_file": str(out / "datalist.json"), "ckpt_dir": str(out),
                                    "resume": True, "pretrained_weights": None},
              launcher=launcher, log_file=out / "train.log")
    atomic_write_json(done, {"weights": str(weights), "num_pairs": len(items), "seconds": time.perf_counter() - tic})
    return weights


def _conditioning_fidelity(bundle_dir: Path, items: Sequence[Mapping[str, Any]], root: Path, report_file: Path,
                           model_file: Path | None = None, overrides: Mapping[str, Any] | None = None) -> float | None:
    """Mean whole-breast Dice of a segmenter on image + mask items, against their masks.

    The segmenter is the bundle's inference workflow with ``model_file`` (default: its shipped
    ``models/model.pt``) and ``overrides``. The report (per case) is kept in ``report_file`` and reused.
    """
    from meddiff.evaluation.fidelity import ConditioningFidelity

    if not report_file.is_file():
        fidelity = ConditioningFidelity(bundle_dir, label_map={1: [1]}, model_file=model_file, progress=False,
                                        overrides=overrides)
        atomic_write_json(report_file, fidelity.evaluate([root / i["image"] for i in items],
                                                         [root / i["label"] for i in items]))
    return json.loads(report_file.read_text())["per_label"]["1"]["mean"]


def _judged_fidelity(out: Path, results: Sequence[Mapping[str, Any]], largest: int, bundle_dir: Path,
                     overrides: Mapping[str, Any]) -> dict[tuple[int, int], float]:
    """Fidelity of every ControlNet run's pairs, judged by the experiment's own segmenter of the same seed.

    The judge is the run trained from scratch on the largest budget (``largest``): it saw only real labelled
    cases, on the experiment's grid, and its Dice on the real test cases (in ``results``) is the ceiling to
    compare with. Returns ``{(budget, seed): mean Dice}``; runs whose judge is not trained yet are left out.
    """
    fidelity = {}
    for r in results:
        budget, seed = int(r["budget"]), int(r["seed"])
        judge = _run_dir(out, largest, seed, "scratch") / "models" / "model.pt"
        if r["init"] != "controlnet_pairs" or not judge.is_file():
            continue
        pairs_dir = _run_dir(out, budget, seed, "controlnet_pairs") / "generated" / "pairs"
        pairs = json.loads((pairs_dir / "dataset.json").read_text())["training"]
        fidelity[(budget, seed)] = _conditioning_fidelity(bundle_dir, pairs, pairs_dir,
                                                          pairs_dir.parent / "fidelity_judge.json",
                                                          model_file=judge, overrides=overrides)
    return fidelity


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
    arms: Sequence[str] = ("scratch", "pretrained"),
    generator_bundle: str | os.PathLike | None = None,
    generator_overrides: Mapping[str, Any] | str | os.PathLike | None = None,
    num_generated: int = 40,
    num_pairs: int = 40,
    mask_augmentation: str = "affine",
) -> dict[str, Any]:
    """Run (or resume) the label-budget experiment and write the CSVs and the plot.

    Arms (``arms``), each trained on the same cases with the same seed and schedule, then fine-tuned or trained
    on the budget:

    * ``scratch``: from scratch (the reference of the paired statistics);
    * ``pretrained``: restoration pre-training on ``unlabelled_dir`` (or ``pretrained_weights``), once;
    * ``generated_ssl``: the paper's route: restoration pre-training on ``num_generated`` samples of the
      generation bundle's latent diffusion model, itself trained on ``unlabelled_dir``, once;
    * ``controlnet_pairs``: supervised pre-training on ``num_pairs`` image + mask pairs from a ControlNet on that
      model, trained per budget and seed on the budget's labelled cases only and sampled from their masks
      (``mask_augmentation``).

    Args:
        labelled_datalist: Decathlon-style JSON with ``training`` (the labelled pool) and ``test`` (the
            fixed test set) image/label pairs (e.g. ``dataset.json`` of ``meddiff breast-phantoms``).
        output_dir: experiment folder (created; rerun with the same folder to resume, or to add arms).
        unlabelled_dir: folder of unlabelled volumes: restoration pre-training, and the generator's training set.
        budgets: label budgets: numbers of labelled cases, or fractions of the pool in ``(0, 1)``.
        seeds: seeds; each draws its own nested subsets of the pool and seeds the training.
        num_val: validation cases taken once from the pool (fixed for all runs, used for best-checkpoint
            selection); the remaining cases form the pool the budgets draw from.
        split_seed: seed of the validation draw and (with each seed) of the budget subsets.
        pretrained_weights: use these pre-trained weights for ``pretrained`` instead of running pre-training.
        bundle: the breast segmentation bundle (default: the repository's).
        overrides: config overrides for every stage (e.g. network size, ``max_steps``), a dict or JSON file.
        pretrain_overrides: extra overrides of the pre-training stages (all three arms that pre-train).
        train_overrides: extra overrides of the training runs.
        evaluate_overrides: extra overrides of the evaluations.
        launcher: ``"subprocess"`` or ``"inprocess"`` (see :func:`run_stage`).
        title: plot title (default: from the datalist, marked when the data are phantoms).
        arms: the arms to run (``scratch`` is always run).
        generator_bundle: the MRI generation bundle (default: the repository's).
        generator_overrides: overrides of the generation bundle's stages, a dict or JSON file (see
            :func:`meddiff.experiments.generated_data.split_generator_overrides`).
        num_generated: generated volumes for ``generated_ssl``.
        num_pairs: generated pairs per budget and seed for ``controlnet_pairs``.
        mask_augmentation: ``off``, ``affine`` or ``elastic``: how the budget's masks are varied for the pairs.

    Returns:
        ``{"results_csv", "per_case_csv", "summary_csv", "plot", "summary", "runs_done", "runs_skipped"}``.

    Raises:
        DataError: bad datalist (missing files, no test set).
        ValueError: bad budgets or arms, or an arm's data missing.
        ExperimentError: a stage failed, or ``output_dir`` holds an experiment with other settings.
    """
    out = Path(output_dir).resolve()
    budgets = [budgets] if isinstance(budgets, (int, float)) else list(budgets)  # `--budgets 5` on the CLI
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    arms = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else list(arms)
    unknown = sorted(set(arms) - set(INITS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(INITS)}")
    arms = [i for i in INITS if i in arms or i == "scratch"]
    bundle_dir = Path(bundle).resolve() if bundle is not None else default_bundle()
    if not (bundle_dir / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"{bundle_dir} is not the breast segmentation bundle (no configs/train.json); "
                                "pass --bundle")
    if "pretrained" in arms and unlabelled_dir is None and pretrained_weights is None:
        raise ValueError("the 'pretrained' arm needs unlabelled_dir (volumes to pre-train on) or pretrained_weights")
    generated = [i for i in arms if i in GENERATED_ARMS]
    if generated and unlabelled_dir is None:
        raise ValueError(f"the arms {generated} need unlabelled_dir: the generation bundle trains on it")
    if mask_augmentation not in MASK_AUGMENTATIONS:
        raise ValueError(f"mask_augmentation must be one of {list(MASK_AUGMENTATIONS)}, got {mask_augmentation!r}")
    common = _load_overrides(overrides)
    stage_extra = {"pretrain": _load_overrides(pretrain_overrides), "train": _load_overrides(train_overrides),
                   "evaluate": _load_overrides(evaluate_overrides)}
    gen_overrides = _load_overrides(generator_overrides)
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

    # the settings that must not change between a run and its resumption (arms may be added)
    fixed = {"labelled_datalist": str(labelled), "pool": pool, "validation": val_items, "test": splits["test"],
             "split_seed": split_seed, "overrides": common, "stage_overrides": stage_extra,
             "unlabelled_dir": str(Path(unlabelled_dir).resolve()) if unlabelled_dir is not None else None,
             "pretrained_weights": str(Path(pretrained_weights).resolve()) if pretrained_weights else None}
    generator_settings = {"generator_overrides": gen_overrides, "num_generated": int(num_generated),
                          "num_pairs": int(num_pairs), "mask_augmentation": mask_augmentation}
    plan_file = out / "experiment.json"
    previous = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    if previous:
        changed = sorted(k for k in fixed if previous.get(k) != json.loads(json.dumps(fixed[k])))
        if generated and previous.get("generator"):  # a generator that exists must not change either
            changed += sorted(k for k, v in generator_settings.items()
                              if previous["generator"].get(k) != json.loads(json.dumps(v)))
        if changed:
            raise ExperimentError(f"{out} holds an experiment with different {', '.join(changed)}; "
                                  "use another output_dir or delete it")
    atomic_write_json(plan_file, {**fixed, "budgets": counts, "seeds": [int(s) for s in seeds], "arms": arms,
                                  "generator": generator_settings if generated else previous.get("generator"),
                                  "bundle": str(bundle_dir), "phantom": is_phantom})
    atomic_write_json(out / "test_datalist.json", {"test": splits["test"]})

    # 1. pre-training and generation, once
    pretrain = {**common, **stage_extra["pretrain"]}
    init_weights: dict[str, Path | None] = {"scratch": None}
    if "pretrained" in arms:
        if pretrained_weights is None:
            init_weights["pretrained"] = _pretrain(bundle_dir, Path(unlabelled_dir).resolve(), out / "pretrain",
                                                   pretrain, launcher, "the unlabelled volumes")
        else:
            init_weights["pretrained"] = Path(pretrained_weights).resolve()
            if not init_weights["pretrained"].is_file():
                raise FileNotFoundError(f"pre-trained weights file {init_weights['pretrained']} not found")
    generator = None
    if generated:
        from meddiff.experiments import generated_data

        gen_bundle = (Path(generator_bundle).resolve() if generator_bundle is not None
                      else generated_data.default_generator_bundle())
        if not (gen_bundle / "configs" / "train_controlnet.json").is_file():
            raise FileNotFoundError(f"{gen_bundle} is not the MRI generation bundle (no configs/train_controlnet.json);"
                                    " pass --generator_bundle")
        generator = generated_data.train_generator(out / "generator", gen_bundle, unlabelled_dir, gen_overrides,
                                                   launcher=launcher)
    if "generated_ssl" in arms:
        samples = generated_data.sample_volumes(out / "generator" / "samples", gen_bundle, generator,
                                                num_generated, gen_overrides, launcher=launcher)
        init_weights["generated_ssl"] = _pretrain(bundle_dir, samples, out / "pretrain_generated", pretrain, launcher,
                                                  f"{num_generated} generated volumes")

    # 2. the runs
    runs_done = runs_skipped = 0
    total = len(counts) * len(seeds) * len(arms)
    k = 0
    results = []
    for n in counts:
        for seed in seeds:
            subset_order = list(range(len(pool)))
            random.Random(split_seed * 1_000_003 + int(seed)).shuffle(subset_order)
            subset = [pool[i] for i in subset_order[:n]]  # nested: a larger budget adds cases
            for init in arms:
                k += 1
                run_dir = _run_dir(out, n, seed, init)
                result_file = run_dir / "result.json"
                if result_file.is_file():
                    results.append(json.loads(result_file.read_text()))
                    runs_skipped += 1
                    logger.info("run %d/%d (%d cases, seed %s, %s) already done", k, total, n, seed, INITS[init])
                    continue
                logger.info("run %d/%d: %d labelled cases, seed %s, %s", k, total, n, seed, INITS[init])
                extra: dict[str, Any] = {}
                weights = init_weights.get(init)
                if init == "controlnet_pairs":
                    pairs = generated_data.controlnet_pairs(
                        run_dir / "generated", gen_bundle, generator, subset, num_pairs, int(seed), gen_overrides,
                        mask_augmentation=mask_augmentation, launcher=launcher)
                    pairs_dir = Path(pairs["pairs_dir"])
                    pair_items = json.loads(Path(pairs["datalist"]).read_text())["training"]
                    weights = _supervised_pretrain(bundle_dir, pairs_dir, pair_items, run_dir / "pretrain", pretrain,
                                                   int(seed), launcher)
                    extra = {"num_pairs": pairs["num_pairs"], "controlnet_seconds": pairs["train_seconds"],
                             "fidelity_dice_breast": _conditioning_fidelity(
                                 bundle_dir, pair_items, pairs_dir, run_dir / "generated" / "fidelity.json")}
                atomic_write_json(run_dir / "datalist.json", {"training": subset, "validation": val_items})
                tic = time.perf_counter()
                run_stage(bundle_dir, "train", {**common, **stage_extra["train"], "seed": int(seed),
                                                "dataset_dir": str(run_dir),
                                                "datalist_file": str(run_dir / "datalist.json"),
                                                "ckpt_dir": str(run_dir / "models"), "resume": True,
                                                "pretrained_weights": str(weights) if weights is not None else None},
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
                          "train_seconds": train_s, "eval_seconds": time.perf_counter() - tic, **extra}
                atomic_write_json(result_file, result)
                results.append(result)
                runs_done += 1

    # 3. tables and plot
    judged = _judged_fidelity(out, results, max(counts), bundle_dir, common) if "controlnet_pairs" in arms else {}
    run_rows, case_rows = [], []
    for r in results:
        means = {f"{m}_mean": s.get("mean") for m, s in r["metrics"].items()}
        run_rows.append({"budget": r["budget"], "seed": r["seed"], "init": r["init"], **means,
                         "best_val_dice": r.get("best_val_dice"), "train_seconds": r.get("train_seconds"),
                         "fidelity_dice_breast": r.get("fidelity_dice_breast"),
                         "fidelity_judge_dice_breast": judged.get((int(r["budget"]), int(r["seed"])))
                         if r["init"] == "controlnet_pairs" else None})
        for c in r["cases"]:
            case_rows.append({"budget": r["budget"], "seed": r["seed"], "init": r["init"],
                              **{k: v for k, v in c.items() if k not in ("image", "label")}})
    metric_cols = list(results[0]["metrics"]) if results else []
    _write_csv(out / "results.csv", run_rows, ["budget", "seed", "init", *(f"{m}_mean" for m in metric_cols),
                                               "best_val_dice", "train_seconds", "fidelity_dice_breast",
                                               "fidelity_judge_dice_breast"])
    _write_csv(out / "per_case.csv", case_rows, ["budget", "seed", "init", "case", *metric_cols])
    summary_rows = summarize_label_budget(results)
    if "controlnet_pairs" in arms:
        # conditioning fidelity of the ControlNet pairs per budget, by two segmenters, each beside its Dice on the
        # real test cases: the bundle's shipped one, and the experiment's own (scratch, largest budget)
        shipped_reference = _conditioning_fidelity(bundle_dir, splits["test"], Path("/"),
                                                   out / "fidelity_reference.json")
        judge_reference = [r["metrics"]["dice_breast"]["mean"] for r in results
                           if r["init"] == "scratch" and int(r["budget"]) == max(counts)]
        for row in summary_rows:
            shipped = [r["fidelity_dice_breast"] for r in results if r["init"] == "controlnet_pairs"
                       and r["budget"] == row["budget"] and r.get("fidelity_dice_breast") is not None]
            judge = [v for (b, _), v in judged.items() if b == row["budget"] and v is not None]
            row.update({"controlnet_pairs_fidelity_dice": float(np.mean(shipped)) if shipped else math.nan,
                        "fidelity_reference_dice": shipped_reference,
                        "controlnet_pairs_fidelity_judge_dice": float(np.mean(judge)) if judge else math.nan,
                        "fidelity_judge_reference_dice": float(np.mean(judge_reference))
                        if judge_reference else math.nan})
        logger.info("conditioning fidelity: shipped segmenter %.3f on the real test cases; the experiment's own "
                    "(scratch, %d cases) %s", shipped_reference, max(counts),
                    f"{np.mean(judge_reference):.3f}" if judge_reference else "not trained yet")
    done_arms = [i for i in INITS if any(r["init"] == i for r in results)]
    summary_cols = ["budget"] + [f"{i}_{s}" for i in done_arms for s in ("n_seeds", "mean", "ci_low", "ci_high",
                                                                             "hd95_mean")]
    summary_cols += [f"{i}_{s}" for i in done_arms if i != "scratch"
                     for s in ("difference_mean", "n_paired_cases", "wilcoxon_p", "ttest_p")]
    if "controlnet_pairs" in done_arms:
        summary_cols += ["controlnet_pairs_fidelity_dice", "fidelity_reference_dice",
                         "controlnet_pairs_fidelity_judge_dice", "fidelity_judge_reference_dice"]
    _write_csv(out / "summary.csv", summary_rows, summary_cols)
    if title is None:
        title = "Whole-breast Dice vs label budget" + (" (PHANTOM data, not patients)" if is_phantom else "")
    plot = plot_label_budget(summary_rows, out / "dice_vs_budget.png", title)
    logger.info("label-budget experiment: %d runs done, %d already done; results in %s", runs_done, runs_skipped,
                out)
    return {"results_csv": str(out / "results.csv"), "per_case_csv": str(out / "per_case.csv"),
            "summary_csv": str(out / "summary.csv"), "plot": str(plot), "summary": summary_rows,
            "runs_done": runs_done, "runs_skipped": runs_skipped}
