# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Whole-pipeline seconds per volume: the bundle's default sampler against the paper's 300 ancestral DDPM steps.

Both rows build the autoencoder and the denoiser from the bundle's own configs (``common.json``,
``train_autoencoder.json``, ``inference.json`` and a data overlay, knee by default: 256x256x32 images,
8x compression, latent 8x32x32x4, denoiser 32 x [1, 2, 4, 8]) with untrained weights (time does not
depend on them), and sample with :class:`meddiff.sampling.LatentDiffusionSampler` in this process:

* ``default``: the inference config's ``sampling_method``, ``num_inference_steps``, ``sampling_dtype``,
  ``decode_dtype`` and ``sample_batch_size`` (10 rectified-flow steps in bf16);
* ``paper``: ancestral DDPM over all ``num_train_timesteps`` steps in float32, one volume at a time,
  fp32 decode: the paper's sampler on the same-width denoiser.

Printed and written per row: seconds per volume for the diffusion part and for the whole pipeline
(with decode), network evaluations, and the speed-up of ``default`` over ``paper``. Also measured:
``decode_bf16_max_abs_error``, the largest difference (in [-1, 1] image units) between bf16 and fp32
decodes of the same latents (with ``--autoencoder_weights`` on trained weights; untrained otherwise).

    python bench/pipeline.py --out bench/results/pipeline_knee.json
    python bench/pipeline.py --overlay configs/chest_lidc.json --bundle bundles/ct_generative_diffusion
    python bench/pipeline.py --set spatial_size=[16,16,8] --set unet_channels=[8,16] ...   # toy sizes
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from meddiff.sampling import LatentDiffusionSampler
from meddiff.schedulers import make_sampling_scheduler
from meddiff.utils import CLOCKS, atomic_write_json, machine_info, timed

logger = logging.getLogger("bench.pipeline")
REPO = Path(__file__).resolve().parents[1]


def load_config(bundle: Path, overlay: str | None, overrides: dict[str, Any]) -> ConfigParser:
    """The bundle's inference config (common + train_autoencoder + inference [+ overlay]) with overrides."""
    files = [bundle / "configs" / f"{name}.json" for name in ("common", "train_autoencoder", "inference")]
    if overlay:
        files.append(bundle / overlay)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser


def run(parser: ConfigParser, volumes: int, device: torch.device, paper_steps: int | None,
        autoencoder_weights: str | None = None, clock: str = "wall") -> dict[str, Any]:
    """Time the default and the paper rows on ``volumes`` volumes each (see the module docstring)."""
    torch.manual_seed(0)
    autoencoder = parser.get_parsed_content("autoencoder_def").to(device).eval()
    if autoencoder_weights:
        autoencoder.load_state_dict(torch.load(autoencoder_weights, map_location=device, weights_only=True))
    denoiser = parser.get_parsed_content("network_def").to(device).eval()
    for p in denoiser.parameters():  # untrained output layers are zero: give the solver non-trivial outputs
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    latent_shape = parser.get_parsed_content("latent_shape_check")
    prediction_type = parser["prediction_type"]
    info = {"scale_factor": 1.0, "latent_shape": latent_shape, "latent_min": -5.0, "latent_max": 5.0,
            "objective": "ddpm", "prediction_type": prediction_type}
    num_train = int(parser["num_train_timesteps"])
    rows = {
        "default": {"method": parser["sampling_method"], "steps": int(parser["num_inference_steps"]),
                    "sampling_dtype": parser["sampling_dtype"], "decode_dtype": parser["decode_dtype"],
                    "sample_batch_size": int(parser["sample_batch_size"])},
        "paper": {"method": "ddpm", "steps": num_train, "sampling_dtype": "float32", "decode_dtype": "float32",
                  "sample_batch_size": 1},
    }
    results: dict[str, Any] = {
        "latent_shape": latent_shape, "spatial_size": parser["spatial_size"],
        "autoencoder_params_m": round(sum(p.numel() for p in autoencoder.parameters()) / 1e6, 2),
        "denoiser_params_m": round(sum(p.numel() for p in denoiser.parameters()) / 1e6, 2),
        "denoiser": type(denoiser).__name__, "unet_channels": parser["unet_channels"], "rows": rows,
    }
    seeds = list(range(volumes))
    latents = None
    truncated = paper_steps is not None and paper_steps != num_train
    if truncated:  # time a strided deterministic stand-in with the same per-step cost, scale to all steps
        rows["paper"].update(method="ddim", steps=paper_steps)
    for name, row in rows.items():
        scheduler = make_sampling_scheduler(row["method"], num_train, parser["noise_schedule"], prediction_type,
                                            ddim_eta=float(parser["ddim_eta"]),
                                            timestep_spacing=parser["timestep_spacing"])
        row_info = {**info, "objective": "rflow"} if row["method"] == "rflow" else info  # the same network, timed
        sampler = LatentDiffusionSampler(autoencoder, denoiser, scheduler, latent_info=row_info,
                                         num_inference_steps=row["steps"], sample_batch_size=row["sample_batch_size"],
                                         sampling_dtype=row["sampling_dtype"], decode_dtype=row["decode_dtype"],
                                         device=device, progress=False)
        sampler.sample_latents(seeds[:1])  # warm-up (allocations, oneDNN kernel choice)
        z, diffusion = timed(lambda s=sampler: s.sample_latents(seeds), device, clock)
        _, decode = timed(lambda s=sampler, z=z: [s.decode(z[i:i + 1]) for i in range(len(z))], device, clock)
        scale = num_train / sampler.steps if name == "paper" else 1.0
        row.update(evaluations=sampler.steps if name == "default" else num_train,
                   measured_steps=sampler.steps, extrapolated=scale != 1.0,
                   diffusion_s_per_volume=round(diffusion / volumes * scale, 3),
                   decode_s_per_volume=round(decode / volumes, 3))
        row["total_s_per_volume"] = round(row["diffusion_s_per_volume"] + row["decode_s_per_volume"], 3)
        logger.info("%s: %s", name, row)
        if name == "default":
            latents = z
    decoders = {dtype: LatentDiffusionSampler(autoencoder, denoiser, make_sampling_scheduler(
        "ddim", num_train, prediction_type=prediction_type), latent_info=info, device=device, progress=False,
        decode_dtype=dtype) for dtype in ("float32", "bfloat16")}
    fp32, bf16 = decoders["float32"], decoders["bfloat16"]
    first = latents[:1]
    results["decode_bf16_max_abs_error"] = round(float((fp32.decode(first) - bf16.decode(first)).abs().max()), 5)
    _, t32 = timed(lambda: fp32.decode(first), device, clock)
    _, t16 = timed(lambda: bf16.decode(first), device, clock)
    results["decode_s_fp32"], results["decode_s_bf16"] = round(t32, 3), round(t16, 3)
    paper, default = rows["paper"], rows["default"]
    results["speedup_total"] = round(paper["total_s_per_volume"] / default["total_s_per_volume"], 2)
    results["speedup_diffusion"] = round(paper["diffusion_s_per_volume"] / default["diffusion_s_per_volume"], 2)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "mri_generative_diffusion")
    parser.add_argument("--overlay", default="configs/knee_mrnet.json", help="data overlay, relative to --bundle "
                        "('' for the bundle's defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="config override, e.g. --set num_inference_steps=8 (repeatable)")
    parser.add_argument("--volumes", type=int, default=2, help="volumes per row")
    parser.add_argument("--paper_steps", type=int, help="time only this many DDIM-strided steps of the paper row and "
                        "scale to all training steps (default: run all of them)")
    parser.add_argument("--autoencoder_weights", help="trained autoencoder weights for the decode error")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help="wall time, or CPU time of this process")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    config = load_config(args.bundle, args.overlay or None, overrides)
    device = torch.device(args.device)
    results = {"bench": "pipeline", "bundle": args.bundle.name, "overlay": args.overlay, "overrides": overrides,
               "device": str(device), "machine": machine_info(),
               "volumes": args.volumes, "clock": args.clock,
               **run(config, args.volumes, device, args.paper_steps, args.autoencoder_weights, args.clock)}
    for name in ("default", "paper"):
        row = results["rows"][name]
        print(f"{name:8s} {'ddpm' if name == 'paper' else row['method']:9s} {row['evaluations']:4d} evals  {row['sampling_dtype']:9s} "
              f"diffusion {row['diffusion_s_per_volume']:8.2f} s  decode {row['decode_s_per_volume']:6.2f} s  "
              f"total {row['total_s_per_volume']:8.2f} s/volume" + ("  (extrapolated)" if row["extrapolated"] else ""))
    print(f"latent {results['latent_shape']}, denoiser {results['denoiser_params_m']} M, autoencoder "
          f"{results['autoencoder_params_m']} M; speed-up default vs paper: total {results['speedup_total']}x, "
          f"diffusion {results['speedup_diffusion']}x; bf16 decode max abs error "
          f"{results['decode_bf16_max_abs_error']} ({results['decode_s_bf16']} s vs {results['decode_s_fp32']} s fp32)")
    if args.out:
        atomic_write_json(args.out, results)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
