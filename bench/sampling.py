# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Samplers of one trained latent diffusion model: network evaluations, seconds per volume and quality.

Every row samples the same seeds with the bundle's in-memory sampler (``meddiff.sampling.LatentDiffusionSampler``
over ``meddiff.schedulers.make_sampling_scheduler``), in this process, one after the other, so the time ratios
to the baseline (DDPM with all training steps, the paper's sampler) are measured on the same machine state.

Quality per row, against held-out real volumes (never seen in training):

* ``intensity_mmd``: MMD (meddiff.metrics.mmd_score, MONAI's linear-kernel estimator) of the volumes
  average-pooled to 8^3, in [0, 1] intensities; lower is better.
* ``feature_mmd``: the same on the autoencoder's latents (``encode_stage_2_inputs``); lower is better.
* ``msssim``: mean pairwise 3D MS-SSIM between the row's samples (diversity; high = alike); two-sided.
* ``nn_ncc``: each sample's shift-tolerant NCC with its nearest training volume (meddiff.metrics.shift_tolerant_ncc,
  the memorization audit's image space), averaged; two-sided. The held-out volumes give the real-vs-real value.
* ``ref_error`` (deterministic samplers): per-seed RMSE, in [-1, 1] units, to a ``--reference_steps`` run of
  the same sampler family from the same seed; how far the few-step solve is from the converged one
  (``ref_latent_error``: the same on the scaled latents, before the VQ-GAN snaps them to its codebook).

The quality band is the baseline's seed-to-seed spread: each metric is computed on every subset of
``subset_size`` seeds (all of them when there are at most ``max_subsets``, otherwise a seeded draw), the same
subsets for every row; the band is the 5th..95th percentile of the baseline's values, and a row's value is its
median over the subsets. A row is inside the band when both MMDs are at most the band's top and MS-SSIM and
NN-NCC lie inside it.

    python bench/sampling.py --bundle bundles/mri_generative_diffusion --overlay configs/demo_brain.json \\
        --data /tmp/demo/mri/data --heldout /tmp/demo/mri/heldout --seeds 8 --out bench/results/sampling_mri.json

``--data`` is the training folder (its datalist split gives the training volumes for NN-NCC); the held-out folder
is read through the bundle's preprocessing. ``python -m meddiff.cli.main demo_data`` is not needed: the MRI demo
data come from :func:`meddiff.data.demo.make_brain_demo` (``--make_data`` writes both folders).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meddiff.metrics import (
    audit_downsample_factor,
    mmd_score,
    pairwise_msssim,
    pooled_intensities,
    shift_tolerant_ncc,
    to_audit_grid,
)
from meddiff.sampling import LatentDiffusionSampler
from meddiff.schedulers import is_stochastic, make_sampling_scheduler
from meddiff.utils import atomic_write_json, atomic_write_text, machine_info, timed

__all__ = [
    "DEFAULT_ROWS",
    "Row",
    "format_table",
    "load_bundle_models",
    "main",
    "run_sampling_bench",
    "sampling_settings",
    "mark_inside_band",
    "run_info",
    "seed_subsets",
    "seed_band",
    "write_results",
]

logger = logging.getLogger("bench.sampling")

#: (sampling method, network evaluations per volume); the first row is the baseline
Row = tuple[str, int]
DEFAULT_ROWS: list[Row] = [("ddpm", 300), ("ddim", 50), ("ddim", 10), ("dpmpp_2m", 20), ("dpmpp_2m", 10),
                           ("dpmpp_2m", 5), ("rflow", 30), ("rflow", 10)]
POOL_GRID = (8, 8, 8)
LOWER_IS_BETTER = ("intensity_mmd", "feature_mmd")
TWO_SIDED = ("msssim", "nn_ncc")


def seed_subsets(num_seeds: int, subset_size: int, max_subsets: int = 200, seed: int = 0) -> list[tuple[int, ...]]:
    """Index subsets of the seeds the band is computed over: all ``C(n, k)`` if few, else a seeded draw.

    Args:
        num_seeds: number of seeds ``n``.
        subset_size: seeds per subset ``k`` (``2 <= k <= n``).
        max_subsets: most subsets.
        seed: seed of the draw.

    Returns:
        Sorted index tuples, without repeats.

    Raises:
        ValueError: if ``subset_size`` is out of range.
    """
    if not 2 <= subset_size <= num_seeds:
        raise ValueError(f"subset_size must be in [2, {num_seeds}] (number of seeds), got {subset_size}.")
    if math.comb(num_seeds, subset_size) <= max_subsets:
        return list(itertools.combinations(range(num_seeds), subset_size))
    rng = np.random.default_rng(seed)
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < max_subsets:
        chosen.add(tuple(sorted(int(i) for i in rng.choice(num_seeds, subset_size, replace=False))))
    return sorted(chosen)


def _features(autoencoder: nn.Module, volumes: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([autoencoder.encode_stage_2_inputs(v[None].to(device)).flatten(1).float().cpu()
                          for v in volumes])


def _msssim_matrix(volumes01: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
    n = len(volumes01)
    pairs = list(itertools.combinations(range(n), 2))
    values, settings = pairwise_msssim(list(volumes01), pairs)
    matrix = np.full((n, n), np.nan)
    for (i, j), v in zip(pairs, values):
        matrix[i, j] = matrix[j, i] = v
    return matrix, settings


def _subset_metrics(real_pooled: torch.Tensor, real_feat: torch.Tensor, pooled: torch.Tensor, feat: torch.Tensor,
                    msssim: np.ndarray, nn_ncc: torch.Tensor, subsets: Sequence[tuple[int, ...]]) -> dict[str, list]:
    out: dict[str, list] = {"intensity_mmd": [], "feature_mmd": [], "msssim": [], "nn_ncc": []}
    for s in subsets:
        idx = list(s)
        out["intensity_mmd"].append(mmd_score(real_pooled, pooled[idx])["value"])
        out["feature_mmd"].append(mmd_score(real_feat, feat[idx])["value"])
        out["msssim"].append(float(np.mean([msssim[i, j] for i, j in itertools.combinations(idx, 2)])))
        out["nn_ncc"].append(float(nn_ncc[idx].mean()))
    return out


def _sample(autoencoder: nn.Module, model: nn.Module, info: Mapping[str, Any], method: str, steps: int,
            seeds: Sequence[int], settings: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Volumes (N, 1, H, W, D) in [-1, 1], scaled latents, seconds per volume, network evaluations per volume."""
    num_train = int(settings["num_train_timesteps"])
    if method == "ddpm" and steps != num_train:
        raise ValueError(f"ddpm always runs all num_train_timesteps={num_train} steps, got a row with {steps}.")
    scheduler = make_sampling_scheduler(method, num_train_timesteps=num_train, schedule=settings["schedule"],
                                        prediction_type=info.get("prediction_type") or settings["prediction_type"],
                                        timestep_spacing=settings["timestep_spacing"])
    sampler = LatentDiffusionSampler(autoencoder, model, scheduler, latent_info=dict(info), num_inference_steps=steps,
                                     sample_batch_size=int(settings["sample_batch_size"]),
                                     sampling_dtype=settings["sampling_dtype"], device=settings["device"],
                                     progress=False, clip_latents=bool(settings["clip_latents"]))

    def sample_and_decode() -> tuple[torch.Tensor, torch.Tensor]:
        latents = sampler.sample_latents(list(seeds))
        size = sampler.sample_batch_size
        return torch.cat([sampler.decode(latents[i:i + size]).cpu() for i in range(0, len(latents), size)]), latents

    (volumes, latents), seconds = timed(sample_and_decode, settings["device"])
    return volumes, latents.cpu(), seconds / len(seeds), sampler.steps


def run_sampling_bench(
    autoencoder: nn.Module,
    denoisers: Mapping[str, tuple[nn.Module, Mapping[str, Any]]],
    heldout: torch.Tensor,
    training: torch.Tensor,
    seeds: Sequence[int],
    rows: Sequence[Row] = DEFAULT_ROWS,
    reference_steps: int = 200,
    num_train_timesteps: int = 300,
    schedule: str = "cosine",
    prediction_type: str = "epsilon",
    timestep_spacing: str = "trailing",
    sample_batch_size: int = 1,
    sampling_dtype: str = "float32",
    clip_latents: bool = True,
    subset_size: int | None = None,
    max_subsets: int = 200,
    max_shift: int = 2,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Sample every row for ``seeds`` and measure time and quality (see the module doc).

    Args:
        autoencoder: the trained stage-1 model (``encode_stage_2_inputs``/``decode_stage_2_outputs``).
        denoisers: ``{"ddpm": (network, latent_info), "rflow": (network, latent_info)}``; ``latent_info`` as written
            by ``train_diffusion`` (``scale_factor``, ``latent_shape``, ``objective``, ...). Rows of ``rflow`` use
            the ``"rflow"`` entry, every other row the ``"ddpm"`` one; rows without their denoiser are skipped.
        heldout: (M, 1, H, W, D) held-out real volumes in [-1, 1], as the bundle's preprocessing makes them.
        training: (K, 1, H, W, D) training volumes in [-1, 1] (nearest-neighbour similarity).
        seeds: sample seeds, the same for every row (at least 3).
        rows: ``(sampling_method, steps)``; the first is the baseline.
        reference_steps: steps of the reference run per deterministic sampler family.
        num_train_timesteps: training diffusion steps (``ddpm`` rows must use exactly this many).
        schedule: noise schedule of the weights.
        prediction_type: the ddpm denoiser's target, if its ``latent_info`` does not record it.
        timestep_spacing: timestep spacing of ``ddim``/``dpmpp_2m``.
        sample_batch_size: volumes per denoiser call.
        sampling_dtype: ``"float32"`` or ``"bfloat16"`` (autocast) for the denoiser.
        clip_latents: clip x0 estimates to the training latent range recorded in ``latent_info``.
        subset_size: seeds per band subset (default: half the seeds, at least 2).
        max_subsets: most band subsets.
        max_shift: NN-NCC translation search, voxels of the audit grid.
        device: where to sample.

    Returns:
        ``{"rows": [...], "band": {...}, "baseline": {...}, "real": {...}, "settings": {...}}``, JSON-ready.

    Raises:
        ValueError: too few seeds, no denoiser for the baseline row, or mismatched shapes.
    """
    if len(seeds) < 3:
        raise ValueError(f"the bench needs at least 3 seeds for a seed-to-seed band, got {len(seeds)}.")
    if not rows:
        raise ValueError("no rows to run.")
    base_family = "rflow" if rows[0][0] == "rflow" else "ddpm"
    if base_family not in denoisers:
        raise ValueError(f"the baseline row {rows[0]} needs the {base_family!r} denoiser; got {sorted(denoisers)}.")
    if heldout.shape[1:] != training.shape[1:]:
        raise ValueError(f"held-out and training volumes differ in shape: {tuple(heldout.shape)} vs "
                         f"{tuple(training.shape)}.")
    device = torch.device(device)
    autoencoder = autoencoder.to(device).eval()
    settings = {"num_train_timesteps": num_train_timesteps, "schedule": schedule, "prediction_type": prediction_type,
                "timestep_spacing": timestep_spacing, "sample_batch_size": sample_batch_size,
                "sampling_dtype": sampling_dtype, "clip_latents": clip_latents, "device": device}
    k = subset_size or max(2, len(seeds) // 2)
    subsets = seed_subsets(len(seeds), k, max_subsets)
    factor = audit_downsample_factor(heldout.shape[2:], 64)

    real01 = (heldout.float() + 1) / 2
    real_pooled = pooled_intensities(real01, POOL_GRID)
    real_feat = _features(autoencoder, heldout.float(), device)
    train_grid = to_audit_grid((training.float() + 1) / 2, factor)
    real_nn, _ = shift_tolerant_ncc(to_audit_grid(real01, factor), train_grid, max_shift=max_shift)
    real_msssim, msssim_settings = _msssim_matrix(real01)
    real = {"num_heldout": len(heldout), "num_training": len(training),
            "msssim": float(np.nanmean(real_msssim)),
            "nn_ncc": [float(v) for v in real_nn.max(1).values],
            "nn_ncc_range": [float(real_nn.max(1).values.min()), float(real_nn.max(1).values.max())]}

    # warm-up (allocator, kernels), so the first timed row is not charged for it
    first = denoisers[base_family]
    _sample(autoencoder, first[0], first[1], "rflow" if base_family == "rflow" else "ddim", 2, seeds[:1], settings)

    references: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    results: list[dict[str, Any]] = []
    for method, steps in rows:
        family = "rflow" if method == "rflow" else "ddpm"
        if family not in denoisers:
            logger.warning("skipping %s %d: no %s denoiser given", method, steps, family)
            results.append({"method": method, "steps": steps, "skipped": f"no {family} denoiser"})
            continue
        model, info = denoisers[family]
        logger.info("sampling %s with %d steps, %d seeds", method, steps, len(seeds))
        volumes, latents, seconds, evaluations = _sample(autoencoder, model, info, method, steps, seeds, settings)
        vol01 = (volumes + 1) / 2
        pooled = pooled_intensities(vol01, POOL_GRID)
        feat = _features(autoencoder, volumes, device)
        msssim, _ = _msssim_matrix(vol01)
        nn_all, _ = shift_tolerant_ncc(to_audit_grid(vol01, factor), train_grid, max_shift=max_shift)
        nn_ncc = nn_all.max(1).values
        per_subset = _subset_metrics(real_pooled, real_feat, pooled, feat, msssim, nn_ncc, subsets)
        row: dict[str, Any] = {
            "method": method, "steps": steps, "evaluations": evaluations, "seconds_per_volume": seconds,
            "stochastic": is_stochastic(make_sampling_scheduler(method, num_train_timesteps=num_train_timesteps)),
            **{name: float(statistics.median(values)) for name, values in per_subset.items()},
            "all_seeds": {"intensity_mmd": mmd_score(real_pooled, pooled)["value"],
                          "feature_mmd": mmd_score(real_feat, feat)["value"],
                          "msssim": float(np.nanmean(msssim)), "nn_ncc": float(nn_ncc.mean())},
            "nn_ncc_per_seed": [float(v) for v in nn_ncc],
            "nn_ncc_inside_real_range": float(((nn_ncc >= real["nn_ncc_range"][0])
                                               & (nn_ncc <= real["nn_ncc_range"][1])).float().mean()),
            "_subsets": per_subset,
        }
        if not row["stochastic"]:
            if method not in references:
                logger.info("reference: %s with %d steps", method, reference_steps)
                references[method] = _sample(autoencoder, model, info, method, reference_steps, seeds, settings)[:2]
            ref_volumes, ref_latents = references[method]
            err = ((volumes - ref_volumes) ** 2).flatten(1).mean(1).sqrt()
            latent_err = ((latents - ref_latents) ** 2).flatten(1).mean(1).sqrt()
            row["ref_error"] = float(err.mean())
            row["ref_error_per_seed"] = [float(v) for v in err]
            row["ref_latent_error"] = float(latent_err.mean())
        results.append(row)

    baseline = results[0]
    band = seed_band(baseline["_subsets"])
    for row in results:
        if "skipped" in row:
            continue
        mark_inside_band(row, band)
        row["time_ratio"] = row["seconds_per_volume"] / baseline["seconds_per_volume"]
        row["subset_values"] = row.pop("_subsets")
    return {
        "rows": results,
        "band": band,
        "baseline": f"{baseline['method']} {baseline['steps']}",
        "real": real,
        "settings": {**{key: (str(v) if isinstance(v, torch.device) else v) for key, v in settings.items()},
                     "seeds": [int(s) for s in seeds], "reference_steps": reference_steps, "subset_size": k,
                     "num_subsets": len(subsets), "pool_grid": list(POOL_GRID), "audit_factor": factor,
                     "max_shift": max_shift, "msssim": msssim_settings},
    }


def seed_band(subset_values: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """The seed-to-seed band: 5th and 95th percentile of the baseline's per-subset values, per metric.

    Args:
        subset_values: metric name -> the baseline's value on every seed subset.

    Returns:
        ``{metric: [low, high]}`` for every metric of ``LOWER_IS_BETTER`` and ``TWO_SIDED``.
    """
    return {name: [float(np.percentile(subset_values[name], 5)), float(np.percentile(subset_values[name], 95))]
            for name in (*LOWER_IS_BETTER, *TWO_SIDED)}


def mark_inside_band(row: dict[str, Any], band: Mapping[str, Sequence[float]]) -> None:
    """Set ``row["inside"]`` (per metric: lower-is-better ones at most the band's top, two-sided ones inside it) and
    ``row["inside_band"]`` (all of them).

    Args:
        row: a result row with a median value per metric (modified in place).
        band: :func:`seed_band`'s output.
    """
    inside = {name: row[name] <= band[name][1] for name in LOWER_IS_BETTER}
    inside.update({name: band[name][0] <= row[name] <= band[name][1] for name in TWO_SIDED})
    row["inside"] = {name: bool(v) for name, v in inside.items()}
    row["inside_band"] = all(inside.values())


def sampling_settings(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings a bench takes from the bundle's config and its command line.

    Args:
        cfg: the bundle's parsed config (``load_bundle_models``).
        args: the command line (``sample_batch_size``, ``sampling_dtype``).

    Returns:
        ``num_train_timesteps``, ``schedule``, ``timestep_spacing``, ``sample_batch_size``, ``sampling_dtype`` and
        ``device``, as keyword arguments of ``run_sampling_bench`` and ``run_sizes_bench``.
    """
    return {"num_train_timesteps": int(cfg.get_parsed_content("num_train_timesteps")),
            "schedule": str(cfg.get_parsed_content("noise_schedule")),
            "timestep_spacing": str(cfg.get("timestep_spacing", "trailing")),
            "sample_batch_size": args.sample_batch_size, "sampling_dtype": args.sampling_dtype,
            "device": cfg.get_parsed_content("device")}


def run_info(script: str, argv: Sequence[str] | None, tic: float) -> dict[str, Any]:
    """The machine, the command line and the wall time since ``tic`` (``time.perf_counter``) of a bench run.

    Args:
        script: the bench script's path from the repository root (``bench/sampling.py``).
        argv: the arguments ``main`` got (``None``: the process's).
        tic: ``time.perf_counter()`` at the start.

    Returns:
        ``{"machine": ..., "command": ..., "wall_seconds": ...}``.
    """
    return {"machine": machine_info(),
            "command": f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_seconds": time.perf_counter() - tic}


def write_results(result: Mapping[str, Any], table: str, out: str | Path, markdown: str | Path | None,
                  log: logging.Logger) -> None:
    """Write ``result`` as JSON to ``out`` (atomically), ``table`` to ``markdown`` if given, and log both.

    Args:
        result: the JSON-ready result.
        table: its Markdown table.
        out: the JSON path.
        markdown: the Markdown path or ``None``.
        log: the bench's logger.
    """
    atomic_write_json(Path(out), result)
    if markdown:
        atomic_write_text(Path(markdown), table + "\n")
    log.info("results in %s\n%s", out, table)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of the rows: evaluations, seconds per volume, time ratio, quality and the band verdict."""
    band = result["band"]
    lines = [
        "| sampler | steps | evaluations | s / volume | time vs baseline | intensity MMD | feature MMD | "
        "MS-SSIM | NN-NCC | seeds in real NN-NCC range | ref. error | inside band |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['method']} | {row['steps']} | | | | | | | | | | skipped: {row['skipped']} |")
            continue
        outside = [name for name, ok in row["inside"].items() if not ok]
        verdict = "yes" if row["inside_band"] else "no (" + ", ".join(outside) + ")"
        lines.append(
            f"| {row['method']} | {row['steps']} | {row['evaluations']} | {row['seconds_per_volume']:.2f} | "
            f"{row['time_ratio']:.3f} | {_fmt(row['intensity_mmd'])} | {_fmt(row['feature_mmd'])} | "
            f"{row['msssim']:.4f} | {row['nn_ncc']:.4f} | {row['nn_ncc_inside_real_range']:.0%} | "
            f"{_fmt(row.get('ref_error'))} | {verdict} |")
    real = result["real"]
    lines += [
        "",
        f"Band (baseline {result['baseline']}, 5th-95th percentile over {result['settings']['num_subsets']} subsets "
        f"of {result['settings']['subset_size']} seeds): intensity MMD <= {band['intensity_mmd'][1]:.4g}, "
        f"feature MMD <= {band['feature_mmd'][1]:.4g}, MS-SSIM in [{band['msssim'][0]:.4f}, {band['msssim'][1]:.4f}], "
        f"NN-NCC in [{band['nn_ncc'][0]:.4f}, {band['nn_ncc'][1]:.4f}].",
        f"Real held-out volumes: MS-SSIM {real['msssim']:.4f}, NN-NCC to training {statistics.mean(real['nn_ncc']):.4f} "
        f"(range {real['nn_ncc_range'][0]:.4f}..{real['nn_ncc_range'][1]:.4f}).",
    ]
    return "\n".join(lines)


def load_bundle_models(
    bundle: str | Path,
    config_files: Sequence[str],
    overrides: Mapping[str, Any],
    extra_weights: str | Path | None = None,
    extra_info: str | Path | None = None,
) -> tuple[nn.Module, dict[str, tuple[nn.Module, dict[str, Any]]], Any]:
    """The bundle's autoencoder and denoiser(s), built from its configs as ``inference.json`` builds them.

    Args:
        bundle: bundle folder.
        config_files: config files relative to the bundle, merged in order.
        overrides: config overrides (e.g. ``bundle_root``, ``dataset_dir``).
        extra_weights: weights of a second denoiser of the same shape trained with the other objective (optional;
            e.g. the epsilon denoiser for the DDPM rows when the overlay's is the rectified flow).
        extra_info: its ``latent_info`` JSON (default: ``extra_weights`` with ``.json``).

    Returns:
        ``(autoencoder, denoisers, parser)``; ``denoisers`` as :func:`run_sampling_bench` takes them.
    """
    from monai.bundle import ConfigParser

    from meddiff.networks import load_pretrained

    bundle = Path(bundle).resolve()
    parser = ConfigParser()
    parser.read_config([str(bundle / c) for c in config_files])
    parser.update({"bundle_root": str(bundle), **overrides})
    autoencoder = parser.get_parsed_content("autoencoder")
    model = parser.get_parsed_content("diffusion_model")
    info = json.loads(Path(parser.get_parsed_content("latent_info_file")).read_text())
    denoisers = {str(info.get("objective", "ddpm")): (model, info)}
    if extra_weights is not None:
        extra = load_pretrained(parser.get_parsed_content("diffusion_def", lazy=False), str(extra_weights))
        info_path = Path(extra_info) if extra_info else Path(extra_weights).with_suffix(".json")
        extra_latent_info = json.loads(info_path.read_text())
        denoisers[str(extra_latent_info.get("objective", "ddpm"))] = (extra, extra_latent_info)
    return autoencoder, denoisers, parser


def _load_volumes(parser: Any, files: Sequence[str]) -> torch.Tensor:
    preprocessing = parser.get_parsed_content("preprocessing")
    return torch.stack([torch.as_tensor(preprocessing({"image": str(f)})["image"]).float() for f in files])


def _parse_rows(text: str) -> list[Row]:
    rows = []
    for item in text.split(","):
        method, _, steps = item.strip().partition(":")
        rows.append((method, int(steps)))
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: load a bundle's trained models and data, run :func:`run_sampling_bench`, write JSON + table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="bundles/mri_generative_diffusion")
    parser.add_argument("--configs", nargs="+",
                        default=["configs/common.json", "configs/train_autoencoder.json", "configs/inference.json"])
    parser.add_argument("--overlay", nargs="*", default=["configs/demo_brain.json"], help="configs merged last")
    parser.add_argument("--data", required=True, help="training data folder (the datalist split gives the training "
                                                      "volumes)")
    parser.add_argument("--heldout", required=True, help="folder of held-out volumes of the same kind")
    parser.add_argument("--extra_weights", default=None,
                        help="weights of a second denoiser trained with the other objective (e.g. models/model_ddpm.pt)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first_seed", type=int, default=1000)
    parser.add_argument("--rows", default=",".join(f"{m}:{s}" for m, s in DEFAULT_ROWS),
                        help="method:steps,... (the first is the baseline)")
    parser.add_argument("--reference_steps", type=int, default=200)
    parser.add_argument("--sample_batch_size", type=int, default=1)
    parser.add_argument("--sampling_dtype", default="float32")
    parser.add_argument("--out", default="bench/results/sampling.json")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from meddiff.data import find_volumes

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"dataset_dir": str(Path(args.data).resolve()), "datalist_file": str(Path(tmp) / "datalist.json"),
                     "progress": False}
        autoencoder, denoisers, cfg = load_bundle_models(args.bundle, [*args.configs, *args.overlay], overrides,
                                                         extra_weights=args.extra_weights)
        training = _load_volumes(cfg, [item["image"] for item in cfg.get_parsed_content("train_files")])
        heldout = _load_volumes(cfg, [str(v) for v in find_volumes(Path(args.heldout))])
        tic = time.perf_counter()
        result = run_sampling_bench(
            autoencoder, denoisers, heldout, training, seeds=range(args.first_seed, args.first_seed + args.seeds),
            rows=_parse_rows(args.rows), reference_steps=args.reference_steps,
            prediction_type=str(cfg.get_parsed_content("prediction_type")), **sampling_settings(cfg, args))
    result.update(run_info("bench/sampling.py", argv, tic))
    result["bundle"] = str(args.bundle)
    table = format_table(result)
    write_results(result, table, args.out, args.markdown, logger)
    return result


if __name__ == "__main__":
    main()
