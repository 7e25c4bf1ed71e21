# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""One trained latent diffusion model sampled at the training size and at other sizes (``spatial_size``).

The networks are convolutional, so ``inference.json`` may ask for any ``spatial_size`` the autoencoder's
compression divides and the denoiser's downsampling accepts (``meddiff.engines.check_sampling_size``). This
bench measures what that gives: every size samples the same seeds with the bundle's in-memory sampler
(``meddiff.sampling.LatentDiffusionSampler``, the bundle's default sampler unless ``--method``/``--steps``), in
this process, one after the other; the first size (the training size) is the baseline.

Quality per size against real volumes **of that size** (the bundle's preprocessing with that ``spatial_size``:
the same 3 mm volumes, padded or cropped to the larger field of view), with the metrics of
``bench/sampling.py``: intensity MMD (pooled to 8^3), feature MMD (autoencoder latents, pooled to the
training latent size so that sizes compare), pairwise MS-SSIM (diversity) and NN-NCC to the training volumes
(shift-tolerant NCC), with the held-out volumes' own NN-NCC range at that size. A size is *inside* when its
values fall in the training size's seed-to-seed band (5th..95th percentile over seed subsets; MMDs: at most
the top), as in ``bench/sampling.py``.

    python bench/sampling_sizes.py --data /tmp/mri/data --heldout /tmp/mri/heldout \\
        --sizes 64,64,64 96,96,64 128,128,64 --out bench/results/sampling_sizes.json \\
        --markdown bench/results/sampling_sizes.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sampling import (  # noqa: E402
    POOL_GRID,
    _load_volumes,
    _msssim_matrix,
    _subset_metrics,
    load_bundle_models,
    mark_inside_band,
    run_info,
    sampling_settings,
    seed_band,
    seed_subsets,
    write_results,
)
from meddiff.metrics import (  # noqa: E402
    audit_downsample_factor,
    pooled_intensities,
    shift_tolerant_ncc,
    to_audit_grid,
)
from meddiff.sampling import LatentDiffusionSampler  # noqa: E402
from meddiff.schedulers import make_sampling_scheduler  # noqa: E402
from meddiff.utils import timed  # noqa: E402

__all__ = ["format_table", "main", "run_sizes_bench"]

logger = logging.getLogger("bench.sampling_sizes")


def _features(autoencoder: nn.Module, volumes: torch.Tensor, grid: Sequence[int], device: torch.device) -> torch.Tensor:
    """Autoencoder latents average-pooled to ``grid`` (the training latent size), flattened: (N, C * prod(grid))."""
    with torch.no_grad():
        feats = [F.adaptive_avg_pool3d(autoencoder.encode_stage_2_inputs(v[None].to(device)).float(), list(grid))
                 for v in volumes]
    return torch.cat(feats).flatten(1).cpu()


def run_sizes_bench(
    autoencoder: nn.Module,
    model: nn.Module,
    latent_info: Mapping[str, Any],
    references: Mapping[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]],
    seeds: Sequence[int],
    method: str = "rflow",
    steps: int = 10,
    num_train_timesteps: int = 300,
    schedule: str = "cosine",
    timestep_spacing: str = "trailing",
    compression: int | None = None,
    sample_batch_size: int = 1,
    sampling_dtype: str = "float32",
    subset_size: int | None = None,
    max_subsets: int = 200,
    max_shift: int = 2,
    device: str | torch.device = "cpu",
    extra_metrics: Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Sample ``seeds`` at every size of ``references`` (the first is the baseline) and measure time and quality.

    Args:
        autoencoder: the trained stage-1 model.
        model: the trained denoiser.
        latent_info: its ``latent_info`` (as ``train_diffusion`` writes it).
        references: ``spatial_size -> (held-out, training)`` real volumes (N, 1, H, W, D) in [-1, 1] of that size.
        seeds: sample seeds (at least 3), the same for every size.
        method: sampling method.
        steps: network evaluations per volume.
        num_train_timesteps: training diffusion steps of the weights.
        schedule: noise schedule of the weights.
        timestep_spacing: timestep spacing of ``ddim``/``dpmpp_2m``.
        compression: the autoencoder's downsampling factor (``None``: read from the VQ-GAN).
        sample_batch_size: volumes per denoiser call.
        sampling_dtype: autocast dtype of the denoiser.
        subset_size: seeds per band subset (default: half the seeds, at least 2).
        max_subsets: most band subsets.
        max_shift: NN-NCC translation search, voxels of the audit grid.
        device: where to sample.
        extra_metrics: ``f(samples, held-out)`` (both (N, 1, H, W, D) in [-1, 1]) per size; its JSON-ready
            dict goes into the row as ``extra``.

    Returns:
        ``{"rows": [...], "band": {...}, "settings": {...}}``, JSON-ready.

    Raises:
        ValueError: too few seeds or no sizes.
    """
    if len(seeds) < 3:
        raise ValueError(f"the bench needs at least 3 seeds for a seed-to-seed band, got {len(seeds)}.")
    if not references:
        raise ValueError("no sizes to sample.")
    device = torch.device(device)
    autoencoder = autoencoder.to(device).eval()
    k = subset_size or max(2, len(seeds) // 2)
    subsets = seed_subsets(len(seeds), k, max_subsets)
    feature_grid = [int(s) for s in latent_info["latent_shape"][1:]]
    prediction_type = str(latent_info.get("prediction_type") or "epsilon")

    def sampler_at(size: Sequence[int], num_steps: int) -> LatentDiffusionSampler:
        scheduler = make_sampling_scheduler(method, num_train_timesteps=num_train_timesteps, schedule=schedule,
                                            prediction_type=prediction_type, timestep_spacing=timestep_spacing)
        return LatentDiffusionSampler(autoencoder, model, scheduler, latent_info=dict(latent_info),
                                      num_inference_steps=num_steps, sample_batch_size=sample_batch_size,
                                      sampling_dtype=sampling_dtype, device=device, progress=False,
                                      spatial_size=size, compression=compression)

    first = next(iter(references))
    sampler_at(first, 2).generate(list(seeds[:1]))  # warm-up (allocator, kernels)
    rows: list[dict[str, Any]] = []
    for size, (heldout, training) in references.items():
        sampler = sampler_at(size, steps)
        logger.info("sampling %s at %s (latent %s), %d seeds", method, list(size), sampler.latent_shape, len(seeds))
        volumes, seconds = timed(lambda s=sampler: s.generate(list(seeds)), device)
        factor = audit_downsample_factor(heldout.shape[2:], 64)
        real01, vol01 = (heldout.float() + 1) / 2, (volumes + 1) / 2
        train_grid = to_audit_grid((training.float() + 1) / 2, factor)
        real_nn = shift_tolerant_ncc(to_audit_grid(real01, factor), train_grid, max_shift=max_shift)[0].max(1).values
        real_pooled, pooled = pooled_intensities(real01, POOL_GRID), pooled_intensities(vol01, POOL_GRID)
        real_feat = _features(autoencoder, heldout.float(), feature_grid, device)
        feat = _features(autoencoder, volumes, feature_grid, device)
        msssim, _ = _msssim_matrix(vol01)
        real_msssim, _ = _msssim_matrix(real01)
        nn_ncc = shift_tolerant_ncc(to_audit_grid(vol01, factor), train_grid, max_shift=max_shift)[0].max(1).values
        per_subset = _subset_metrics(real_pooled, real_feat, pooled, feat, msssim, nn_ncc, subsets)
        low, high = float(real_nn.min()), float(real_nn.max())
        rows.append({
            "spatial_size": list(size), "latent_shape": sampler.latent_shape, "voxels": int(np.prod(size)),
            "seconds_per_volume": seconds / len(seeds), "evaluations": sampler.steps,
            **{name: float(statistics.median(values)) for name, values in per_subset.items()},
            "nn_ncc_per_seed": [float(v) for v in nn_ncc],
            "nn_ncc_inside_real_range": float(((nn_ncc >= low) & (nn_ncc <= high)).float().mean()),
            "real": {"num_heldout": len(heldout), "num_training": len(training), "audit_factor": factor,
                     "msssim": float(np.nanmean(real_msssim)), "nn_ncc": float(real_nn.mean()),
                     "nn_ncc_range": [low, high]},
            "subset_values": per_subset,
            **({"extra": dict(extra_metrics(volumes.float(), heldout.float()))} if extra_metrics else {}),
        })
    baseline = rows[0]
    band = seed_band(baseline["subset_values"])
    for row in rows:
        mark_inside_band(row, band)
        row["time_ratio"] = row["seconds_per_volume"] / baseline["seconds_per_volume"]
        row["voxel_ratio"] = row["voxels"] / baseline["voxels"]
    return {"rows": rows, "band": band, "baseline": baseline["spatial_size"],
            "settings": {"method": method, "steps": steps, "num_train_timesteps": num_train_timesteps,
                         "schedule": schedule, "timestep_spacing": timestep_spacing,
                         "sample_batch_size": sample_batch_size, "sampling_dtype": sampling_dtype,
                         "device": str(device), "seeds": [int(s) for s in seeds], "subset_size": k,
                         "num_subsets": len(subsets), "pool_grid": list(POOL_GRID), "feature_grid": feature_grid,
                         "max_shift": max_shift}}


def format_table(result: Mapping[str, Any]) -> str:
    """A Markdown table: per size, seconds per volume, ratios, quality, the real volumes' values, the verdict."""
    lines = [
        "| spatial_size | latent | s / volume | time vs training size | voxels vs training size | intensity MMD | "
        "feature MMD | MS-SSIM | real MS-SSIM | NN-NCC | real NN-NCC range | seeds in real range | inside band |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for row in result["rows"]:
        outside = [name for name, ok in row["inside"].items() if not ok]
        verdict = "yes" if row["inside_band"] else "no (" + ", ".join(outside) + ")"
        real = row["real"]
        lines.append(
            f"| {'×'.join(map(str, row['spatial_size']))} | {'×'.join(map(str, row['latent_shape']))} | "
            f"{row['seconds_per_volume']:.2f} | {row['time_ratio']:.2f} | {row['voxel_ratio']:.2f} | "
            f"{row['intensity_mmd']:.4g} | {row['feature_mmd']:.4g} | {row['msssim']:.4f} | {real['msssim']:.4f} | "
            f"{row['nn_ncc']:.4f} | {real['nn_ncc_range'][0]:.3f}–{real['nn_ncc_range'][1]:.3f} | "
            f"{row['nn_ncc_inside_real_range']:.0%} | {verdict} |")
    band, settings = result["band"], result["settings"]
    lines += ["", f"Band (training size {'×'.join(map(str, result['baseline']))}, 5th-95th percentile over "
              f"{settings['num_subsets']} subsets of {settings['subset_size']} seeds): intensity MMD <= "
              f"{band['intensity_mmd'][1]:.4g}, feature MMD <= {band['feature_mmd'][1]:.4g}, MS-SSIM in "
              f"[{band['msssim'][0]:.4f}, {band['msssim'][1]:.4f}], NN-NCC in [{band['nn_ncc'][0]:.4f}, "
              f"{band['nn_ncc'][1]:.4f}]. Sampler: {settings['method']} {settings['steps']} steps, "
              f"{settings['sampling_dtype']}."]
    return "\n".join(lines)


def _parse_size(text: str) -> tuple[int, int, int]:
    size = tuple(int(v) for v in text.split(","))
    if len(size) != 3:
        raise argparse.ArgumentTypeError(f"a size is H,W,D, got {text!r}")
    return size  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: the bundle's models and data, :func:`run_sizes_bench`, JSON + Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="bundles/mri_generative_diffusion")
    parser.add_argument("--configs", nargs="+",
                        default=["configs/common.json", "configs/train_autoencoder.json", "configs/inference.json"])
    parser.add_argument("--overlay", nargs="*", default=["configs/demo_brain.json"], help="configs merged last")
    parser.add_argument("--data", required=True, help="training data folder (its datalist split: training volumes)")
    parser.add_argument("--heldout", required=True, help="folder of held-out volumes of the same kind")
    parser.add_argument("--sizes", nargs="+", type=_parse_size, default=[(64, 64, 64), (96, 96, 64), (128, 128, 64)],
                        help="H,W,D sizes; the first is the baseline (the training size)")
    parser.add_argument("--method", default=None, help="sampling method (default: the bundle's sampling_method)")
    parser.add_argument("--steps", type=int, default=None, help="default: the bundle's num_inference_steps")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first_seed", type=int, default=1000)
    parser.add_argument("--sample_batch_size", type=int, default=1)
    parser.add_argument("--sampling_dtype", default="float32")
    parser.add_argument("--out", default="bench/results/sampling_sizes.json")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from meddiff.data import find_volumes

    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"dataset_dir": str(Path(args.data).resolve()), "datalist_file": str(Path(tmp) / "datalist.json"),
                     "progress": False}
        autoencoder, denoisers, cfg = load_bundle_models(args.bundle, [*args.configs, *args.overlay], overrides)
        method = args.method or str(cfg["sampling_method"])
        model, info = denoisers["rflow" if method == "rflow" else "ddpm"]
        train_files = [item["image"] for item in cfg.get_parsed_content("train_files")]
        heldout_files = [str(v) for v in find_volumes(Path(args.heldout))]
        references = {}
        for size in args.sizes:
            _, _, size_cfg = load_bundle_models(args.bundle, [*args.configs, *args.overlay],
                                                {**overrides, "spatial_size": list(size)})
            references[tuple(size)] = (_load_volumes(size_cfg, heldout_files), _load_volumes(size_cfg, train_files))
        result = run_sizes_bench(
            autoencoder, model, info, references, seeds=range(args.first_seed, args.first_seed + args.seeds),
            method=method, steps=args.steps or int(cfg["num_inference_steps"]),
            compression=2 ** len(cfg.get_parsed_content("autoencoder_channels")), **sampling_settings(cfg, args))
    result.update(run_info("bench/sampling_sizes.py", argv, tic))
    result["torch_threads"] = torch.get_num_threads()
    result["bundle"] = str(args.bundle)
    table = format_table(result)
    write_results(result, table, args.out, args.markdown, logger)
    return result


if __name__ == "__main__":
    main()
