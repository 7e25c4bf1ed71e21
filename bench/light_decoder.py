# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""A lighter decoder at full resolution: decode time and memory against reconstruction PSNR.

MONAI's ``VQVAE`` runs its finest level (``autoencoder_channels[0]``, residual layers at half the image
resolution, then the transposed convolution to the image) on 8x more voxels than the next one, so that level
holds most of a decode's time and memory. Narrowing it is a config choice (``--autoencoder_channels``, no new
network); it changes the autoencoder, so the VQ-GAN and then the denoiser are retrained. This bench measures
both sides in one run:

* **Time and memory** (each row in its own child process, as ``bench/large_volume.py`` does): the decode of
  one latent at ``--spatial_size`` (512x512x256) with the knee overlay's widths, ``autoencoder_channels[0]``
  in ``--widths`` (64 = the overlay's, then narrower), untrained weights (time and memory do not depend on
  them), the inference config's decode settings (bf16, tiles above 256^3 voxels).
* **Reconstruction**: the CT demo VQ-GAN recipe (``configs/demo_head_ct.json``: channels 16, 32, 4x; 500
  steps at lr 1e-3, no GAN phase: the shipped weights' schedule) trained through the real CLI on the CT demo
  DICOM trees (8 variants of the shipped head CT, 2 held out for validation) for ``autoencoder_channels[0]``
  in ``--psnr_widths`` (16 = the shipped width; 8 and 4 keep the ratios of ``--widths``). Per run: the
  validation PSNR the trainer logs (held-out volumes, data range [-1, 1]) and the decode time of the trained
  VQ-GAN at the demo size, in this process.

    OMP_NUM_THREADS=2 python bench/light_decoder.py --out bench/results/light_decoder.json \\
        --markdown bench/results/light_decoder.md
    python bench/light_decoder.py --spatial_size 64 64 32 --widths 16 8 --psnr_widths 8 4 --steps 4  # toy
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.large_volume import TILING_KEYS, run_child  # noqa: E402
from bench.pipeline import load_config  # noqa: E402
from bench.sampling import run_info, write_results  # noqa: E402
from meddiff.cli.stages import TRAIN_OVERRIDES, bundle_command, demo_train_stages, trained_weights  # noqa: E402
from meddiff.data.demo import make_ct_demo  # noqa: E402

logger = logging.getLogger("bench.light_decoder")
REPO = Path(__file__).resolve().parents[1]
MRI_BUNDLE = REPO / "bundles" / "mri_generative_diffusion"
CT_BUNDLE = REPO / "bundles" / "ct_generative_diffusion"
CT_OVERLAY = "configs/demo_head_ct.json"


def time_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode time and peak RSS of one latent per ``--widths`` entry, each in a child process."""
    config = load_config(MRI_BUNDLE, args.overlay, {})
    tiling = {key: config[key] for key in TILING_KEYS}
    rest = [int(c) for c in config["autoencoder_channels"]][1:]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            channels = [width, *rest]
            spec = {"name": f"channels {channels}", "kind": "decode", "bundle": str(MRI_BUNDLE),
                    "overlay": args.overlay, "device": args.device, "threads": args.threads, "tiling": tiling,
                    "overrides": {"spatial_size": args.spatial_size, "num_classes": 0,
                                  "autoencoder_channels": channels},
                    "save": None, "write_dir": tmp}
            row = {"autoencoder_channels": channels, **run_child(spec, args.timeout)}
            logger.info("decode %s: %s", channels, row)
            rows.append(row)
    return rows


def train_vqgan(width: int, data: Path, work: Path, steps: int) -> dict[str, Any]:
    """Train the CT demo VQ-GAN recipe with ``autoencoder_channels[0] = width`` through the bundle CLI."""
    config = load_config(CT_BUNDLE, CT_OVERLAY, {})
    channels = [width, *[int(c) for c in config["autoencoder_channels"]][1:]]
    ckpt = work / f"vqgan_{width}"
    stage = dict(demo_train_stages(0, {})["train_autoencoder"])
    stage.update({"max_steps": str(steps), "val_interval": str(max(1, steps // 2)), "ckpt_interval": str(steps)})
    overrides = {**TRAIN_OVERRIDES, **stage, "bundle_root": str(CT_BUNDLE), "dataset_dir": str(data),
                 "ckpt_dir": str(ckpt), "autoencoder_channels": json.dumps(channels), **trained_weights(ckpt)}
    cmd = bundle_command(["configs/common.json", "configs/train_autoencoder.json", CT_OVERLAY], overrides)
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=CT_BUNDLE, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train_autoencoder (channels {channels}) failed:\n{proc.stderr[-4000:]}")
    seconds = time.perf_counter() - tic
    log = [json.loads(line) for f in ckpt.glob("*_log.jsonl") for line in f.read_text().splitlines()]
    val = [r for r in log if "val_psnr" in r]
    parser = load_config(CT_BUNDLE, CT_OVERLAY, {"ckpt_dir": str(ckpt), "autoencoder_channels": channels,
                                                 **trained_weights(ckpt)})
    autoencoder = parser.get_parsed_content("autoencoder").eval()
    params = sum(p.numel() for p in autoencoder.decoder.parameters())
    latents = torch.randn((1, int(parser["embedding_dim"]),
                           *[s // 2 ** len(channels) for s in parser["spatial_size"]]),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        autoencoder.decode_stage_2_outputs(latents)  # warm-up
        tic_decode = time.perf_counter()
        for _ in range(3):
            autoencoder.decode_stage_2_outputs(latents)
    return {"autoencoder_channels": channels, "train_seconds": round(seconds, 1),
            "val_psnr": [round(r["val_psnr"], 3) for r in val], "val_steps": [r["step"] for r in val],
            "decoder_parameters": params, "decode_seconds_demo_size": round((time.perf_counter() - tic_decode) / 3, 4)}


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    base = results["time_rows"][0] if results["time_rows"] else None
    lines = [f"Decode of one latent at {results['spatial_size']} (knee overlay, untrained weights, inference "
             f"config's decode settings), {results['device']}, torch threads {results['threads']}:", "",
             "| autoencoder_channels | tiled | decode s wall / CPU | CPU time vs first row | peak RSS GB |",
             "| --- | --- | ---: | ---: | ---: |"]
    for row in results["time_rows"]:
        ratio = row["decode"]["cpu_s"] / base["decode"]["cpu_s"]
        lines.append(f"| {row['autoencoder_channels']} | {'yes' if row['tiled'] else 'no'} | "
                     f"{row['decode']['wall_s']} / {row['decode']['cpu_s']} | x{ratio:.2f} | "
                     f"{row['peak_rss_mb'] / 1024:.2f} |")
    if results["psnr_rows"]:
        first = results["psnr_rows"][0]
        lines += ["", f"CT demo VQ-GAN recipe, {results['steps']} steps each (validation PSNR at steps "
                  f"{first['val_steps']}):", "",
                  "| autoencoder_channels | decoder parameters | validation PSNR dB | vs first row | "
                  "decode s at demo size | train s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in results["psnr_rows"]:
            psnr = row["val_psnr"][-1] if row["val_psnr"] else float("nan")
            delta = psnr - (first["val_psnr"][-1] if first["val_psnr"] else float("nan"))
            lines.append(f"| {row['autoencoder_channels']} | {row['decoder_parameters']:,} | "
                         f"{' / '.join(f'{p:.2f}' for p in row['val_psnr'])} | {delta:+.2f} | "
                         f"{row['decode_seconds_demo_size']:.3f} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay", default="configs/knee_mrnet.json", help="MRI bundle overlay of the time rows")
    parser.add_argument("--spatial_size", type=int, nargs=3, default=[512, 512, 256])
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 32, 16],
                        help="autoencoder_channels[0] of the time rows (the first is the baseline)")
    parser.add_argument("--psnr_widths", type=int, nargs="*", default=[16, 8, 4],
                        help="autoencoder_channels[0] of the trained CT demo VQ-GANs (the first is the baseline)")
    parser.add_argument("--steps", type=int, default=500, help="VQ-GAN training steps per width")
    parser.add_argument("--num_volumes", type=int, default=8, help="CT demo patients (2 are held out)")
    parser.add_argument("--workdir", type=Path, help="keep data and checkpoints here (default: a temp dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the time rows (default: torch's)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per time row")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "light_decoder.json")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    args = parser.parse_args(argv)
    tic = time.perf_counter()
    results: dict[str, Any] = {"bench": "light_decoder", "spatial_size": args.spatial_size, "overlay": args.overlay,
                               "device": args.device, "threads": args.threads or torch.get_num_threads(),
                               "steps": args.steps,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "time_rows": time_rows(args)}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        data = work / "data"
        if args.psnr_widths and not data.is_dir():
            make_ct_demo(data, num_volumes=args.num_volumes)
        results["psnr_rows"] = [train_vqgan(w, data, work, args.steps) for w in args.psnr_widths]
    results.update(run_info("bench/light_decoder.py", argv, tic))
    write_results(results, markdown(results), args.out, args.markdown, logger)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
