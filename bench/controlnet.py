# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Mask-conditioned (ControlNet) vs unconditioned sampling: seconds per volume, measured in one process.

For each width (``demo``: the MRI bundle's demo overlay, 64^3 at 3 mm, VQ-GAN 4x, latent 4 x 16^3, denoiser
16 * [1, 2, 4, 8]; ``knee``: the MRNet overlay, 256 x 256 x 32, VQ-GAN 8x, latent 8 x 32 x 32 x 4, denoiser
32 * [1, 2, 4, 8]) the bundle's networks are built from its configs (untrained weights: the time does not
depend on them; the ControlNet is ``controlnet_def``, a ``Pseudo3DControlNet`` with 3 label classes). Both
samplers use the bundle defaults (rflow, 10 steps, bf16 denoiser and decode) on the same seeds:
``LatentDiffusionSampler.generate`` for the unconditioned row and ``ControlNetSampler.generate_for_masks`` on a
synthetic label map for the conditioned one; the four timings (whole volume and denoising loop alone, each
unconditioned and conditioned) are interleaved, ``--repeats`` times after a warm-up, and each is the fastest of its
runs (medians are in the JSON). On CPUs the time is this process's CPU time with ``--threads`` (default 1) torch
threads, which other jobs on a shared machine inflate far less than the wall time; on a GPU, the wall time. The
target: conditioned time per volume at most 1.5x the unconditioned.

    OMP_NUM_THREADS=1 python bench/controlnet.py --out bench/results/controlnet.json \\
        --markdown bench/results/controlnet.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from meddiff.sampling import ControlNetSampler, LatentDiffusionSampler
from meddiff.schedulers import make_sampling_scheduler
from meddiff.transforms import one_hot_labels
from meddiff.utils import atomic_write_json, machine_info

logger = logging.getLogger("bench.controlnet")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "mri_generative_diffusion"
CONFIGS = ["configs/common.json", "configs/train_autoencoder.json"]
OVERLAYS = {"demo": "configs/demo_brain.json", "knee": "configs/knee_mrnet.json"}
NUM_LABEL_CLASSES = 3


def build(overlay: str, device: str) -> tuple[Any, dict[str, Any]]:
    """Untrained autoencoder, denoiser and ControlNet of the bundle with ``overlay``, and their shapes."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / c) for c in [*CONFIGS, overlay]])
    parser.update({"bundle_root": str(BUNDLE), "num_label_classes": NUM_LABEL_CLASSES})
    torch.manual_seed(0)
    nets = {k: parser.get_parsed_content(k) for k in ("autoencoder_def", "diffusion_def", "controlnet_def")}
    for net in nets.values():
        net.to(device).eval()
    size = [int(s) for s in parser.get_parsed_content("spatial_size")]
    compression = 2 ** len(parser.get_parsed_content("autoencoder_channels"))
    latent = [int(parser.get_parsed_content("embedding_dim")), *(s // compression for s in size)]
    shapes = {"spatial_size": size, "latent_shape": latent, "spacing": parser.get_parsed_content("pixdim"),
              "denoiser_parameters": sum(p.numel() for p in nets["diffusion_def"].parameters()),
              "controlnet_parameters": sum(p.numel() for p in nets["controlnet_def"].parameters())}
    return nets, shapes


def write_mask(folder: Path, size: list[int], spacing: list[float]) -> Path:
    """A synthetic 3-class label map (background, a body ellipsoid, an inner blob) at the sampled size."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij")
    label = (sum(g**2 for g in grids) < 0.7).astype(np.uint8)
    label[(grids[0] - 0.2) ** 2 + grids[1] ** 2 + grids[2] ** 2 < 0.1] = 2
    path = folder / "mask.nii.gz"
    nib.save(nib.Nifti1Image(label, np.diag([*spacing, 1.0])), path)
    return path


def bench(name: str, device: str, repeats: int, seeds: list[int]) -> dict[str, Any]:
    nets, shapes = build(OVERLAYS[name], device)
    info = {"scale_factor": 1.0, "latent_shape": shapes["latent_shape"], "objective": "rflow",
            "prediction_type": "None", "num_train_timesteps": 1000}
    common = {"autoencoder": nets["autoencoder_def"], "diffusion_model": nets["diffusion_def"], "latent_info": info,
              "num_inference_steps": 10, "sampling_dtype": "bfloat16", "decode_dtype": "bfloat16",
              "device": device, "progress": False, "spacing": shapes["spacing"], "sample_batch_size": 1}
    bare = LatentDiffusionSampler(scheduler=make_sampling_scheduler("rflow", 1000), **common)
    with tempfile.TemporaryDirectory() as tmp:
        write_mask(Path(tmp), shapes["spatial_size"], shapes["spacing"])
        cond = ControlNetSampler(nets["controlnet_def"], tmp, {"num_label_classes": NUM_LABEL_CLASSES},
                                 scheduler=make_sampling_scheduler("rflow", 1000), **common)
        mask = cond.load_mask(Path(tmp) / "mask.nii.gz")

    cuda = device.startswith("cuda")

    def timed(fn) -> float:
        """Seconds per volume: wall time on a GPU; on CPUs this process's CPU time (``time.process_time``), which
        other jobs on a shared machine inflate far less than the wall time."""
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter() if cuda else time.process_time()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return ((time.perf_counter() if cuda else time.process_time()) - tic) / len(seeds)

    def run_bare() -> None:
        bare.generate(seeds)

    def run_cond() -> None:
        cond.generate_for_masks([mask] * len(seeds), seeds)

    def loop_bare() -> None:
        bare.sample_latents(seeds)

    condition = one_hot_labels(mask, NUM_LABEL_CLASSES)[None].to(device)

    def loop_cond() -> None:  # the denoising loop alone, as generate_for_masks runs it (no decode)
        for s in seeds:
            cond._cond, cond._cond_embedding = condition, None
            with torch.no_grad():
                cond._sample_chunk([s], [None])
        cond._cond = cond._cond_embedding = None

    times: dict[str, list[float]] = {"unconditioned": [], "controlnet": [], "loop_unconditioned": [],
                                     "loop_controlnet": []}
    run_bare(), run_cond()  # warm-up
    for _ in range(repeats):
        times["unconditioned"].append(timed(run_bare))
        times["controlnet"].append(timed(run_cond))
        times["loop_unconditioned"].append(timed(loop_bare))
        times["loop_controlnet"].append(timed(loop_cond))
    med = {k: min(v) for k, v in times.items()}
    row = {"name": name, "overlay": OVERLAYS[name], **shapes, "seconds_per_volume": med,
           "median_seconds_per_volume": {k: statistics.median(v) for k, v in times.items()}, "runs": times,
           "ratio": med["controlnet"] / med["unconditioned"],
           "loop_ratio": med["loop_controlnet"] / med["loop_unconditioned"],
           "median_ratio": statistics.median(times["controlnet"]) / statistics.median(times["unconditioned"])}
    logger.info("%s: unconditioned %.2f s/volume, ControlNet %.2f s/volume, ratio %.3f (denoising loop alone %.3f)",
                name, med["unconditioned"], med["controlnet"], row["ratio"], row["loop_ratio"])
    return row


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = ["| widths | image | latent | denoiser params | ControlNet params | unconditioned s / volume | "
             "ControlNet s / volume | ratio (target <= 1.5) | ratio of medians | loop-only ratio |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = r["seconds_per_volume"]
        lines.append(f"| {r['name']} | {'x'.join(map(str, r['spatial_size']))} | "
                     f"{'x'.join(map(str, r['latent_shape']))} | {r['denoiser_parameters'] / 1e6:.2f} M | "
                     f"{r['controlnet_parameters'] / 1e6:.2f} M | {s['unconditioned']:.2f} | {s['controlnet']:.2f} | "
                     f"{r['ratio']:.3f} | {r['median_ratio']:.3f} | {r['loop_ratio']:.3f} |")
    lines.append("")
    lines.append(f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} CPUs, {machine.get('threads')} torch "
                 f"threads), GPU: {machine.get('gpu', 'none')}, torch {machine.get('torch')}; seconds are "
                 f"{'wall time' if machine.get('gpu') else 'the process CPU time'}, the fastest of the repeats.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", default=list(OVERLAYS), choices=list(OVERLAYS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPUs")
    parser.add_argument("--seeds", type=int, default=1, help="volumes per timed run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = list(range(100, 100 + args.seeds))
    torch.set_num_threads(args.threads)
    rows = [bench(name, args.device, args.repeats, seeds) for name in args.widths]
    machine = machine_info()
    table = markdown(rows, machine)
    sys.stdout.write(table)
    result = {"rows": rows, "machine": machine, "device": args.device, "repeats": args.repeats, "seeds": seeds,
              "timer": "wall time" if args.device.startswith("cuda") else "process CPU time",
              "sampler": "rflow, 10 steps, bf16 denoiser and decode", "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.out:
        atomic_write_json(args.out, result)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
