# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Full-resolution volumes in bounded memory: whole against tiled decoding, and full sampling, per volume.

Every row runs in its own child process (``--child``), so its peak RSS (``VmHWM``) is its own; the parent
collects the rows, compares the tiled decode with the whole decode of the same latent and writes JSON and
Markdown. Networks are built from the bundle's configs with a data overlay (knee by default: VQ-GAN
64 · [1, 2, 4], three levels = 8x per axis; pseudo-3D denoiser 32 · [1, 2, 4, 8]) with untrained weights
(time and memory do not depend on them) at ``--spatial_size`` (512×512×256 by default: latent 8×64×64×32):

* ``decode whole`` / ``decode tiled``: :meth:`LatentDiffusionSampler.decode` of one random latent (the VQ
  nearest-code search makes it a valid code volume) with ``decode_dtype`` bf16, tiling off
  (``decode_tile_threshold`` null) and with the inference config's tiling keys;
* ``sample whole`` / ``sample tiled``: :meth:`LatentDiffusionSampler.sample_latents` + ``decode`` at batch 1
  with the inference config's sampler (10 rectified-flow steps, bf16 denoiser and decode), then what
  :meth:`LatentDiffusionSampler.run` does with the volume (HU, int16 NIfTI, two PNG mosaics); the peak RSS of
  the denoising, decode and write phases are read apart (``/proc/self/clear_refs`` resets the peak).

**Seam error**: the largest absolute difference between the tiled and the whole decode of the same latent,
as a percentage of the intensity range ([-1, 1]: 2) and of the whole decode's own range (an untrained
decoder's output spans much less than [-1, 1]). Besides the big rows, an in-process sweep over
``decode_overlap`` measures it at a smaller size for the untrained knee decoder and, with
``--trained_bundle``, for trained weights (latents sampled by the shipped denoiser).

    OMP_NUM_THREADS=2 python bench/large_volume.py --out bench/results/large_volume.json \\
        --markdown bench/results/large_volume.md
    python bench/large_volume.py --spatial_size 64 64 32 --sweep_latent 8 8 6 --sweep_tile 5 --no_trained  # toy
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import load_config  # noqa: E402
from meddiff.sampling import LatentDiffusionSampler, affine_from_geometry, save_mosaic_png, save_nifti  # noqa: E402
from meddiff.sampling.tiled_decode import TiledDecoder  # noqa: E402
from meddiff.schedulers import make_sampling_scheduler  # noqa: E402
from meddiff.transforms.intensity import scale_from_unit_range  # noqa: E402
from meddiff.utils import atomic_write_json, atomic_write_text, machine_info  # noqa: E402

logger = logging.getLogger("bench.large_volume")
REPO = Path(__file__).resolve().parents[1]
TILING_KEYS = ("decode_tile_size", "decode_overlap", "decode_tile_threshold")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource  # not Linux: the process's peak since start

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> dict[str, float]:
    wall, cpu = _clock()
    return {"wall_s": round(wall - start[0], 2), "cpu_s": round(cpu - start[1], 2)}


def _build(parser: ConfigParser, device: torch.device, tiling: dict[str, Any]) -> LatentDiffusionSampler:
    torch.manual_seed(0)
    autoencoder = parser.get_parsed_content("autoencoder_def").to(device).eval()
    denoiser = parser.get_parsed_content("network_def").to(device).eval()
    for p in denoiser.parameters():  # untrained output layers are zero: give the solver non-trivial outputs
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    factor = 2 ** len(parser["autoencoder_channels"])
    latent_shape = [int(parser["embedding_dim"])] + [int(s) // factor for s in parser["spatial_size"]]
    info = {"scale_factor": 1.0, "latent_shape": latent_shape, "latent_min": -5.0, "latent_max": 5.0,
            "objective": "rflow", "prediction_type": parser["prediction_type"]}
    scheduler = make_sampling_scheduler(parser["sampling_method"], int(parser["num_train_timesteps"]),
                                        parser["noise_schedule"], parser["prediction_type"],
                                        timestep_spacing=parser["timestep_spacing"])
    return LatentDiffusionSampler(autoencoder, denoiser, scheduler, latent_info=info,
                                  num_inference_steps=int(parser["num_inference_steps"]), sample_batch_size=1,
                                  sampling_dtype=parser["sampling_dtype"], decode_dtype=parser["decode_dtype"],
                                  device=device, progress=False, **tiling)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One row in this process: ``spec`` has kind (decode/sample), bundle, overlay, overrides, tiling, save."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    parser = load_config(Path(spec["bundle"]), spec["overlay"], spec["overrides"])
    device = torch.device(spec["device"])
    sampler = _build(parser, device, spec["tiling"])
    row: dict[str, Any] = {"latent_shape": sampler.latent_shape, "rss_after_build_mb": _peak_rss_mb()}
    with torch.no_grad():
        if spec["kind"] == "decode":
            generator = torch.Generator().manual_seed(0)
            latents = torch.randn((1, *sampler.latent_shape), generator=generator).to(device)
            start = _clock()
            images = sampler.decode(latents)
            row["decode"] = _since(start)
        else:
            start = _clock()
            latents = sampler.sample_latents([0])
            row["denoise"] = _since(start)
            row["denoise_peak_rss_mb"] = _peak_rss_mb()
            phase_reset = _reset_peak_rss()
            start = _clock()
            images = sampler.decode(latents)
            row["decode"] = _since(start)
            if phase_reset:
                row["decode_peak_rss_mb"] = _peak_rss_mb()
                _reset_peak_rss()
            start = _clock()
            _write_like_run(images, Path(spec["write_dir"]))
            row["write"] = _since(start)
            if phase_reset:
                row["write_peak_rss_mb"] = _peak_rss_mb()
            row["total_wall_s"] = round(row["denoise"]["wall_s"] + row["decode"]["wall_s"], 2)
    row["image_shape"] = list(images.shape[2:])
    row["tiled"] = sampler.tiled_decoder.applies(sampler.autoencoder, latents)
    if device.type == "cuda":
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if spec.get("save"):
        np.save(spec["save"], images.cpu().numpy())
    if spec["kind"] == "decode" or "write_peak_rss_mb" not in row:
        row["peak_rss_mb"] = _peak_rss_mb()
    else:  # clear_refs reset the peak: the process's peak is the largest phase's
        row["peak_rss_mb"] = max(row["denoise_peak_rss_mb"], row["decode_peak_rss_mb"], row["write_peak_rss_mb"])
    return row


def _write_like_run(images: torch.Tensor, folder: Path) -> None:
    """What :meth:`LatentDiffusionSampler.run` does with a batch-1 decode (CT outputs: HU, int16 NIfTI, 2 PNGs)."""
    volume = torch.cat([images.cpu()])[0]  # generate()'s concatenation
    volume = scale_from_unit_range(volume, -1024.0, 1024.0)
    affine = affine_from_geometry([0.75, 0.75, 1.5], "RAS", spatial_size=volume.shape[1:])
    save_nifti(volume, affine, folder / "sample_000.nii.gz", dtype="int16")
    for name, window in (("lung", (-1350.0, 150.0)), ("soft_tissue", (-160.0, 240.0))):
        save_mosaic_png(volume, folder / f"sample_000_{name}.png", num_slices=16, window=window)


def run_child(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    """Run :func:`child` in a fresh Python process and return its row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    if proc.returncode != 0:
        raise RuntimeError(f"row {spec['name']} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def seam_error(tiled: np.ndarray, whole: np.ndarray, intensity_range: float = 2.0) -> dict[str, float]:
    """Max |tiled - whole| as a percentage of ``intensity_range`` and of ``whole``'s own range."""
    err = float(np.abs(tiled - whole).max())
    own = float(whole.max() - whole.min())
    return {"max_abs": round(err, 6), "pct_of_intensity_range": round(100 * err / intensity_range, 4),
            "pct_of_output_range": round(100 * err / own, 4) if own > 0 else 0.0}


def overlap_sweep(autoencoder: torch.nn.Module, latents: torch.Tensor, tile: int, overlaps: Sequence[int],
                  dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """Seam error of tiled against whole decoding of ``latents`` (unscaled) for each overlap, in this process."""
    def autocast() -> Any:
        return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    whole = TiledDecoder(tile_size=max(latents.shape[2:]) + 1, overlap=0, threshold=0)
    with torch.no_grad():
        reference = whole(autoencoder, latents, autocast).clamp(-1, 1).numpy()
    rows = []
    for overlap in overlaps:
        if tile <= overlap:
            continue
        decoder = TiledDecoder(tile_size=tile, overlap=overlap, threshold=0)
        start = _clock()
        with torch.no_grad():
            tiled = decoder(autoencoder, latents, autocast).clamp(-1, 1).numpy()
        rows.append({"tile": tile, "overlap": overlap, **seam_error(tiled, reference), **_since(start)})
        logger.info("sweep %s", rows[-1])
    return rows


def sweeps(args: argparse.Namespace) -> dict[str, Any]:
    """Overlap sweeps: the untrained knee decoder (random latents) and, if given, trained weights."""
    out: dict[str, Any] = {}
    parser = load_config(args.bundle, args.overlay or None, {})
    torch.manual_seed(0)
    autoencoder = parser.get_parsed_content("autoencoder_def").eval()
    latents = torch.randn((1, int(parser["embedding_dim"]), *args.sweep_latent), generator=torch.Generator().manual_seed(1))
    out["untrained"] = {"overlay": args.overlay, "latent": list(latents.shape[1:]),
                        "rows": overlap_sweep(autoencoder, latents, args.sweep_tile, args.overlaps)}
    if args.trained_bundle:
        parser = load_config(args.trained_bundle, args.trained_overlay, {})
        sampler = LatentDiffusionSampler(
            parser.get_parsed_content("autoencoder"), parser.get_parsed_content("diffusion_model"),
            parser.get_parsed_content("sampling_scheduler"), latent_info=parser.get_parsed_content("latent_info"),
            num_inference_steps=int(parser["num_inference_steps"]), progress=False, decode_tile_threshold=None)
        z = sampler.sample_latents([0, 1]) / sampler.scale_factor
        intensity = parser["intensity_range"]
        rows = overlap_sweep(sampler.autoencoder, z, args.trained_tile, args.overlaps)
        out["trained"] = {"bundle": args.trained_bundle.name, "overlay": args.trained_overlay,
                          "latent": list(z.shape[1:]), "intensity_range": intensity, "rows": rows}
    return out


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    rows = results["rows"]
    lines = [f"Volume {results['spatial_size']} (latent {rows['decode whole']['latent_shape']}), overlay "
             f"`{results['overlay']}`, untrained weights, {results['device']}, "
             f"{results['machine'].get('cpu', '')}, torch threads {results['threads']}.", "",
             "| row | tiles | denoise s (wall / CPU) | decode s (wall / CPU) | total s / volume (wall / CPU) | peak RSS GB | "
             "denoise peak GB | decode peak GB | write peak GB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def gb(value: float | None) -> str:
        return "-" if value is None else f"{value / 1024:.2f}"

    for name, row in rows.items():
        denoise = row.get("denoise")
        phases = [row[k] for k in ("denoise", "decode") if k in row]
        total = f"{round(sum(p['wall_s'] for p in phases), 2)} / {round(sum(p['cpu_s'] for p in phases), 2)}"
        denoise_s = "-" if denoise is None else f"{denoise['wall_s']} / {denoise['cpu_s']}"
        lines.append(f"| {name} | {'yes' if row['tiled'] else 'no'} | {denoise_s} | "
                     f"{row['decode']['wall_s']} / {row['decode']['cpu_s']} | {total} | {gb(row['peak_rss_mb'])} | "
                     f"{gb(row.get('denoise_peak_rss_mb'))} | {gb(row.get('decode_peak_rss_mb'))} | "
                     f"{gb(row.get('write_peak_rss_mb'))} |")
    seam = results["seam_error"]
    for kind in ("decode", "sample"):
        if f"{kind} whole" in rows and f"{kind} tiled" in rows:
            whole, tiled = rows[f"{kind} whole"], rows[f"{kind} tiled"]
            lines += ["", f"{kind}, tiled vs whole: decode CPU time x{tiled['decode']['cpu_s'] / whole['decode']['cpu_s']:.2f}"
                      f", peak RSS x{tiled['peak_rss_mb'] / whole['peak_rss_mb']:.2f}."]
    lines += ["", f"Seam error, tiled vs whole decode of the same latent: max abs {seam['max_abs']} = "
              f"**{seam['pct_of_intensity_range']} %** of the intensity range [-1, 1] "
              f"({seam['pct_of_output_range']} % of the whole decode's own range). "
              f"Tiling keys: {results['tiling']}.", ""]
    for name, sweep in results.get("sweeps", {}).items():
        lines += [f"Overlap sweep, {name} decoder (latent {sweep['latent']}, tiles of {sweep['rows'][0]['tile']} "
                  "latent voxels, fp32):", "", "| overlap | seam error % of intensity range | % of output range | "
                  "decode s |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['overlap']} | {r['pct_of_intensity_range']} | {r['pct_of_output_range']} | {r['wall_s']} |"
                  for r in sweep["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "mri_generative_diffusion")
    parser.add_argument("--overlay", default="configs/knee_mrnet.json", help="data overlay, relative to --bundle")
    parser.add_argument("--spatial_size", type=int, nargs=3, default=[512, 512, 256])
    parser.add_argument("--tiling", default="{}", help="JSON overrides of the tiling keys for the tiled rows")
    parser.add_argument("--rows", nargs="+", default=["decode", "sample"], choices=["decode", "sample"])
    parser.add_argument("--sweep_latent", type=int, nargs=3, default=[20, 20, 12],
                        help="latent size of the untrained overlap sweep")
    parser.add_argument("--sweep_tile", type=int, default=12)
    parser.add_argument("--overlaps", type=int, nargs="+", default=[0, 2, 4, 6, 8])
    parser.add_argument("--trained_bundle", type=Path, default=REPO / "bundles" / "ct_generative_diffusion")
    parser.add_argument("--trained_overlay", default="configs/demo_head_ct.json")
    parser.add_argument("--trained_tile", type=int, default=12)
    parser.add_argument("--no_trained", action="store_true", help="skip the trained-weights sweep")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--from_json", type=Path, help="only rewrite --markdown from this results JSON")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        if args.markdown:
            atomic_write_text(args.markdown, markdown(results) + "\n")
        return results
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_trained:
        args.trained_bundle = None
    config = load_config(args.bundle, args.overlay, {})
    tiling = {key: config[key] for key in TILING_KEYS}
    tiling.update(json.loads(args.tiling))
    results: dict[str, Any] = {"bench": "large_volume", "bundle": args.bundle.name, "overlay": args.overlay,
                               "spatial_size": args.spatial_size, "device": args.device, "threads":
                               torch.get_num_threads(), "machine": machine_info(), "tiling": tiling, "rows": {},
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    base = {"bundle": str(args.bundle), "overlay": args.overlay, "device": args.device, "threads": args.threads,
            "overrides": {"spatial_size": args.spatial_size, "num_classes": 0}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.rows:
            for mode, keys in (("whole", {"decode_tile_threshold": None}), ("tiled", tiling)):
                name = f"{kind} {mode}"
                spec = {**base, "name": name, "kind": kind, "tiling": keys,
                        "save": f"{tmp}/{mode}.npy" if kind == "decode" else None, "write_dir": tmp}
                logger.info("row %s ...", name)
                results["rows"][name] = run_child(spec, args.timeout)
                logger.info("%s: %s", name, results["rows"][name])
        if "decode" in args.rows:
            results["seam_error"] = seam_error(np.load(f"{tmp}/tiled.npy", mmap_mode="r"),
                                               np.load(f"{tmp}/whole.npy", mmap_mode="r"))
            for kind in ("decode",):
                whole, tiled = results["rows"][f"{kind} whole"], results["rows"][f"{kind} tiled"]
                results[f"{kind}_cpu_time_ratio_tiled_vs_whole"] = round(tiled["decode"]["cpu_s"] /
                                                                         whole["decode"]["cpu_s"], 3)
                results[f"{kind}_peak_rss_ratio_tiled_vs_whole"] = round(tiled["peak_rss_mb"] / whole["peak_rss_mb"], 3)
    if args.sweep_tile:
        results["sweeps"] = sweeps(args)
    text = markdown(results) if "decode" in args.rows else json.dumps(results["rows"], indent=1)
    print(text)
    if args.out:
        atomic_write_json(args.out, results)
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
