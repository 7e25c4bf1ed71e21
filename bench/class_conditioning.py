# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Class-conditioned generation with classifier-free guidance: does a sample show the class that was asked for?

Two-class demo data (:func:`meddiff.data.demo.make_lesion_demo`: brain template variants, every other one with a
simulated lesion, a bright blob at a fixed place, 30 mm radius by default; ``healthy`` / ``lesion``). The MRI
bundle's shipped demo VQ-GAN (``models/model_autoencoder.pt``, 64^3 at 3 mm, latent 4 x 16^3) was trained on
lesion-free brains and erases the lesion, so it is first fine-tuned on the two-class training volumes
(``--ae_steps``, ``4 * L1 + quantization``, no discriminator; 0 keeps it); its reconstructions of the held-out real
volumes, classified by the statistic below, are the ceiling of the agreement (reported for the shipped and the
fine-tuned VQ-GAN). A small class-conditioned pseudo-3D denoiser is then trained on CPU through the real CLI (``python -m monai.bundle run ... train_diffusion.json`` with
``--num_classes 2 --labels_file``), then sampled in this process with the bundle's sampler.

Measured class (a statistic on real volumes, no network): the lesion region is where the held-out ``lesion``
volumes exceed the same volumes made without the lesion (same seed, :func:`meddiff.data.demo.make_brain_demo`),
after the bundle's preprocessing, by more than half the largest difference; a volume's statistic is its median
intensity there, and the threshold is the midpoint between the two classes' means on the training volumes. Its
accuracy on the held-out real volumes is reported (the statistic must tell real classes apart first).

Rows (same seeds): ``uncond`` (null class, the unconditional band), and for each guidance scale a row asking for
``healthy`` / ``lesion`` alternately. Per row: ``agreement`` (requested == measured class), diversity (mean
pairwise 3D MS-SSIM between the row's samples) and NN-NCC (shift-tolerant NCC with the nearest training volume),
each as the median over seed subsets; the band is the 5th..95th percentile of the ``uncond`` row over the same
subsets (as bench/sampling.py does for samplers). A conditioned row mixes two classes on purpose, so its all-pairs
MS-SSIM is not like-for-like with the unconditional row (whose class mix is the model's own, not half and half);
``msssim_within_class`` (pairs of the same class: asked for, or in the ``uncond`` row measured) is, and is compared
with the ``uncond`` row's band and with the real within-class band: same-class pairs of the autoencoder's
reconstructions of the real training + held-out volumes, 5th..95th percentile over half-size subsets.

    OMP_NUM_THREADS=2 python bench/class_conditioning.py --steps 1500 --ae_steps 400 --out bench/results/class_conditioning.json \\
        --markdown bench/results/class_conditioning.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling import _load_volumes, _msssim_matrix, load_bundle_models, seed_subsets  # noqa: E402

from meddiff.data import read_labels_file, volume_id  # noqa: E402
from meddiff.data.demo import make_brain_demo, make_lesion_demo  # noqa: E402
from meddiff.metrics import audit_downsample_factor, shift_tolerant_ncc, to_audit_grid  # noqa: E402
from meddiff.sampling import LatentDiffusionSampler  # noqa: E402
from meddiff.schedulers import make_sampling_scheduler  # noqa: E402
from meddiff.utils import atomic_torch_save, atomic_write_json, machine_info  # noqa: E402

logger = logging.getLogger("bench.class_conditioning")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/common.json", "configs/train_autoencoder.json"]
OVERLAY = "configs/demo_brain.json"


def lesion_statistic(train: torch.Tensor, is_lesion: np.ndarray, with_lesion: torch.Tensor,
                     without_lesion: torch.Tensor) -> tuple[torch.Tensor, float, dict[str, float]]:
    """The lesion region mask, the threshold, and the class means of the statistic on the training volumes.

    Args:
        train: (N, 1, H, W, D) real training volumes in [-1, 1].
        is_lesion: (N,) bool, which of them have a lesion.
        with_lesion: (M, 1, H, W, D) volumes with the lesion.
        without_lesion: (M, 1, H, W, D) the same volumes without it.

    Returns:
        ``(mask, threshold, {"healthy": mean, "lesion": mean})``.
    """
    diff = (with_lesion - without_lesion).mean(0)[0]
    mask = diff > 0.5 * diff.max()
    stats = region_mean(train, mask)
    means = {"healthy": float(stats[~is_lesion].mean()), "lesion": float(stats[is_lesion].mean())}
    return mask, (means["healthy"] + means["lesion"]) / 2, means


def region_mean(volumes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) median intensity of each volume inside ``mask`` (the lesion is the brightest tissue, near 1 after the
    bundle's intensity scaling; the tissue there without it is grey or white matter)."""
    return volumes[:, 0][:, mask].median(1).values


def class_auc(requested: Sequence[str], statistic: Sequence[float]) -> float:
    """Threshold-free separation: the share of (lesion-requested, healthy-requested) sample pairs whose lesion
    statistic is ordered as asked (ties count half); 0.5 = no class signal, 1.0 = fully separated."""
    les = [s for r, s in zip(requested, statistic) if r == "lesion"]
    hea = [s for r, s in zip(requested, statistic) if r == "healthy"]
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in les for b in hea]))


def within_class_mean(msssim: np.ndarray, subset: Sequence[int], is_lesion: np.ndarray) -> float:
    """Mean MS-SSIM over the pairs of ``subset`` whose two volumes are of the same class (``is_lesion`` per index)."""
    return float(np.nanmean([msssim[i, j] for i in subset for j in subset if i < j and is_lesion[i] == is_lesion[j]]))


def _train(bundle: Path, data: Path, labels: Path, steps: int, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           "[" + ",".join(f"'{c}'" for c in [*CONFIGS, "configs/train_diffusion.json", OVERLAY]) + "]",
           "--bundle_root", str(bundle), "--dataset_dir", str(data), "--num_classes", "2",
           "--labels_file", str(labels), "--cfg_dropout", str(args.cfg_dropout),
           "--diffusion_weights", "$@ckpt_dir + '/diffusion_model.pt'",
           "--latent_info_file", "$@ckpt_dir + '/diffusion_model.json'",
           "--unet_channels", args.unet_channels, "--unet_attention_levels", args.unet_attention_levels,
           "--max_steps", str(steps), "--batch_size", str(args.batch_size), "--diffusion_lr", str(args.lr),
           "--warmup_steps", "50", "--ema_start_step", str(steps + 1), "--val_fraction", "0.125",
           "--val_interval", str(steps), "--ckpt_interval", str(steps), "--log_interval", "100",
           "--num_workers", "0", "--progress", "false"]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise RuntimeError(f"train_diffusion failed:\n{proc.stderr[-6000:]}")
    logger.info("trained %d steps in %.0f s", steps, time.perf_counter() - tic)
    return time.perf_counter() - tic


def finetune_autoencoder(autoencoder: torch.nn.Module, volumes: torch.Tensor, steps: int, lr: float,
                         batch_size: int, seed: int = 0) -> list[float]:
    """Fine-tune the autoencoder in place on ``volumes`` with the VQ-GAN trainer's generator loss before the
    adversarial phase (``4 * L1 + quantization``; ``VQGANTrainer`` defaults), Adam, random batches.

    Args:
        autoencoder: the VQ-GAN (MONAI ``VQVAE``: ``forward`` returns ``(reconstruction, quantization_loss)``).
        volumes: (N, 1, H, W, D) preprocessed training volumes.
        steps: optimiser steps.
        lr: Adam learning rate.
        batch_size: volumes per step.
        seed: seed of the batch draw.

    Returns:
        The L1 loss of every 50th step.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    autoencoder.train()
    log = []
    for step in range(steps):
        x = volumes[torch.randperm(len(volumes), generator=generator)[:batch_size]]
        recon, q_loss = autoencoder(x)
        l1 = torch.nn.functional.l1_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        (4.0 * l1 + q_loss).backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log.append(round(l1.item(), 5))
            logger.info("autoencoder fine-tune step %d/%d: L1 %.4f", step + 1, steps, log[-1])
    autoencoder.eval()
    return log


def reconstruct(autoencoder: torch.nn.Module, volumes: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W, D) decode(encode(volumes)) clamped to [-1, 1], one volume at a time."""
    with torch.no_grad():
        return torch.cat([autoencoder.decode_stage_2_outputs(autoencoder.encode_stage_2_inputs(v[None]))
                          for v in volumes]).clamp(-1, 1)


#: the settings each cached stage of a --workdir depends on (the denoiser trains on the fine-tuned autoencoder)
DATA_SETTINGS = ("lesion_radius_mm", "lesion_contrast", "num_train", "num_heldout")
AUTOENCODER_SETTINGS = (*DATA_SETTINGS, "ae_steps", "ae_lr", "ae_batch_size")
DENOISER_SETTINGS = (*AUTOENCODER_SETTINGS, "steps", "lr", "batch_size", "cfg_dropout", "unet_channels",
                     "unet_attention_levels")


def cached_file(work: Path, stem: str, args: argparse.Namespace, settings: Sequence[str]) -> Path:
    """``<work>/<stem>_<hash of the settings>.pt``: a rerun in the same ``--workdir`` reuses a stage only when
    every setting it depends on is the same."""
    key = json.dumps({k: getattr(args, k) for k in settings}, sort_keys=True)
    return work / f"{stem}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def parse_guidance_rows(spec: str) -> list[dict[str, Any]]:
    """``--guidance`` rows: comma-separated scales, each optionally with ``:interval=LO-HI`` and/or ``:rescale=PHI``
    (``"1.0,3.0,3.0:interval=0.2-0.8"``) -> ``[{"name", "guidance_scale", "guidance_interval", "guidance_rescale"}]``.
    """
    rows = []
    for item in spec.split(","):
        scale, *options = item.strip().split(":")
        row = {"name": f"g={float(scale)}", "guidance_scale": float(scale), "guidance_interval": [0.0, 1.0],
               "guidance_rescale": 0.0}
        for option in options:
            key, _, value = option.partition("=")
            if key == "interval":
                lo, _, hi = value.partition("-")
                row["guidance_interval"] = [float(lo), float(hi)]
            elif key == "rescale":
                row["guidance_rescale"] = float(value)
            else:
                raise ValueError(f"--guidance: unknown option {option!r} in {item!r} (interval=LO-HI, rescale=PHI)")
            row["name"] += f" {key} {value}"
        rows.append(row)
    return rows


def _sample(autoencoder: torch.nn.Module, model: torch.nn.Module, info: dict, seeds: Sequence[int],
            classes: Sequence[str] | None, guidance: dict[str, Any], steps: int) -> tuple[torch.Tensor, float]:
    scheduler = make_sampling_scheduler("rflow", num_train_timesteps=int(info["num_train_timesteps"]))
    sampler = LatentDiffusionSampler(autoencoder, model, scheduler, latent_info=info, num_inference_steps=steps,
                                     num_samples=len(seeds), seeds=list(seeds), class_label=classes,
                                     guidance_scale=guidance["guidance_scale"],
                                     guidance_interval=guidance["guidance_interval"],
                                     guidance_rescale=guidance["guidance_rescale"], sample_batch_size=4,
                                     progress=False)
    tic = time.perf_counter()
    volumes = sampler.generate(list(seeds))
    return volumes, (time.perf_counter() - tic) / len(seeds)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="diffusion training steps")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--cfg_dropout", type=float, default=0.1)
    parser.add_argument("--unet_channels", default="[16,32,64]")
    parser.add_argument("--unet_attention_levels", default="[False,True,True]")
    parser.add_argument("--lesion_radius_mm", type=float, default=30.0, help="make_lesion_demo's lesion radius")
    parser.add_argument("--lesion_contrast", type=float, default=0.8, help="make_lesion_demo's lesion peak")
    parser.add_argument("--ae_steps", type=int, default=400,
                        help="fine-tune steps of the shipped VQ-GAN on the two-class training volumes (0: keep it)")
    parser.add_argument("--ae_lr", type=float, default=2e-4)
    parser.add_argument("--ae_batch_size", type=int, default=2)
    parser.add_argument("--num_train", type=int, default=16)
    parser.add_argument("--num_heldout", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--sampling_steps", type=int, default=10)
    parser.add_argument("--guidance", default="1.0,1.5,2.0,3.0",
                        help="guidance rows: scales, each optionally :interval=LO-HI and/or :rescale=PHI "
                             "(guidance_interval, guidance_rescale); the bundle default is 1.5 over [0, 1]")
    parser.add_argument("--workdir", default=None, help="keep data, weights and logs here (default: a temp dir)")
    parser.add_argument("--out", default="bench/results/class_conditioning.json")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        data, heldout, labels = work / "data", work / "heldout", work / "labels.csv"
        lesion = {k: getattr(args, k) for k in ("lesion_radius_mm", "lesion_contrast")}
        make_lesion_demo(data, args.num_train, spacing=3.0, seed=0, labels_file=labels, **lesion)
        make_lesion_demo(heldout, args.num_heldout, spacing=3.0, seed=100, labels_file=work / "heldout_labels.csv",
                         **lesion)
        make_brain_demo(work / "heldout_clean", args.num_heldout, spacing=3.0, seed=100)
        bundle = work / "bundle"
        source = REPO / "bundles" / "mri_generative_diffusion"
        shutil.copytree(source / "configs", bundle / "configs", dirs_exist_ok=True)
        (bundle / "models").mkdir(parents=True, exist_ok=True)
        for name in ("model_autoencoder.pt", "model_nyul_landmarks.json"):
            shutil.copy(source / "models" / name, bundle / "models" / name)

        from monai.bundle import ConfigParser

        cfg = ConfigParser()
        cfg.read_config([str(bundle / c) for c in [*CONFIGS, "configs/inference.json", OVERLAY]])
        cfg.update({"bundle_root": str(bundle), "dataset_dir": str(data), "progress": False})
        table = read_labels_file(labels)
        train_files = [item["image"] for item in cfg.get_parsed_content("train_files")]
        train = _load_volumes(cfg, train_files)
        train_lesion = np.array([table[volume_id(f)] == "lesion" for f in train_files])
        held_table = read_labels_file(work / "heldout_labels.csv")
        held_files = sorted(str(p) for p in heldout.glob("*.nii.gz"))
        held = _load_volumes(cfg, held_files)
        held_lesion = np.array([held_table[volume_id(f)] == "lesion" for f in held_files])
        pairs = [f for f, les in zip(held_files, held_lesion) if les]
        clean = _load_volumes(cfg, [str(work / "heldout_clean" / Path(f).name) for f in pairs])
        mask, threshold, means = lesion_statistic(train, train_lesion, held[torch.as_tensor(held_lesion)], clean)
        held_acc = float(((region_mean(held, mask) > threshold).numpy() == held_lesion).mean())
        logger.info("lesion region %d voxels, threshold %.3f, class means %s, held-out real accuracy %.2f",
                    int(mask.sum()), threshold, means, held_acc)

        def ceiling(ae: torch.nn.Module) -> dict[str, Any]:
            """The autoencoder's ceiling: the statistic on its reconstructions of the held-out real volumes."""
            stat = region_mean(reconstruct(ae, held), mask)
            return {"accuracy": float(((stat > threshold).numpy() == held_lesion).mean()),
                    "auc": class_auc(["lesion" if x else "healthy" for x in held_lesion], stat.tolist()),
                    "statistic": [round(float(x), 4) for x in stat]}

        autoencoder = cfg.get_parsed_content("autoencoder").eval()
        shipped_ceiling = ceiling(autoencoder)
        logger.info("shipped autoencoder on held-out real volumes: %s", shipped_ceiling)
        ae_log: list[float] = []
        ae_seconds = 0.0
        kept = cached_file(work, "autoencoder_finetuned", args, AUTOENCODER_SETTINGS)
        if args.ae_steps > 0 and kept.is_file():
            autoencoder.load_state_dict(torch.load(kept, map_location="cpu", weights_only=True))
            ae_log, ae_seconds = json.loads(kept.with_suffix(".json").read_text())
        elif args.ae_steps > 0:
            ae_tic = time.perf_counter()
            ae_log = finetune_autoencoder(autoencoder, train, args.ae_steps, args.ae_lr, args.ae_batch_size)
            ae_seconds = time.perf_counter() - ae_tic
            atomic_torch_save(autoencoder.state_dict(), kept)
            atomic_write_json(kept.with_suffix(".json"), [ae_log, ae_seconds])
        if args.ae_steps > 0:
            shutil.copy(kept, bundle / "models" / "model_autoencoder.pt")
        recon_ceiling = ceiling(autoencoder)
        logger.info("bench autoencoder on held-out real volumes: %s", recon_ceiling)
        trained = cached_file(work, "diffusion_model", args, DENOISER_SETTINGS)
        if trained.is_file():
            for suffix in (".pt", ".json"):
                shutil.copy(trained.with_suffix(suffix), bundle / "models" / f"diffusion_model{suffix}")
            train_seconds = json.loads(trained.with_suffix(".seconds.json").read_text())
        else:
            train_seconds = _train(bundle, data, labels, args.steps, args)
            for suffix in (".pt", ".json"):
                shutil.copy(bundle / "models" / f"diffusion_model{suffix}", trained.with_suffix(suffix))
            atomic_write_json(trained.with_suffix(".seconds.json"), train_seconds)

        overrides = {"dataset_dir": str(data), "progress": False, "unet_channels": json.loads(args.unet_channels),
                     "unet_attention_levels": json.loads(args.unet_attention_levels.lower()),
                     "diffusion_weights": str(bundle / "models" / "diffusion_model.pt"),
                     "latent_info_file": str(bundle / "models" / "diffusion_model.json")}
        autoencoder, denoisers, _ = load_bundle_models(bundle, [*CONFIGS, "configs/inference.json", OVERLAY],
                                                       overrides)
        model, info = denoisers["rflow"]
        # like-for-like diversity band: same-class pairs of the autoencoder's reconstructions of the real volumes
        real = torch.cat([train, held])
        real_lesion = np.concatenate([train_lesion, held_lesion])
        real_msssim, _ = _msssim_matrix((reconstruct(autoencoder, real) + 1) / 2)
        real_subsets = seed_subsets(len(real), len(real) // 2, 200)
        real_within = [within_class_mean(real_msssim, s, real_lesion) for s in real_subsets]
        band_within = [float(np.percentile(real_within, 5)), float(np.percentile(real_within, 95))]
        logger.info("real within-class MS-SSIM band (reconstructions): %s", band_within)

        factor = audit_downsample_factor(train.shape[2:], 64)
        train_grid = to_audit_grid((train + 1) / 2, factor)
        seeds = list(range(1000, 1000 + args.seeds))
        subsets = seed_subsets(len(seeds), max(2, len(seeds) // 2), 200)
        requested = ["healthy", "lesion"] * (len(seeds) // 2) + ["healthy"] * (len(seeds) % 2)
        rows: list[dict[str, Any]] = []
        plans = [("uncond", None, parse_guidance_rows("1.0")[0])]
        plans += [(g["name"], requested, g) for g in parse_guidance_rows(args.guidance)]
        for name, classes, guidance in plans:
            volumes, seconds = _sample(autoencoder, model, info, seeds, classes, guidance, args.sampling_steps)
            stat = region_mean(volumes, mask)
            measured = ["lesion" if s > threshold else "healthy" for s in stat.tolist()]
            vol01 = (volumes + 1) / 2
            msssim, _ = _msssim_matrix(vol01)
            nn = shift_tolerant_ncc(to_audit_grid(vol01, factor), train_grid, max_shift=2)[0].max(1).values
            per_subset = {"msssim": [float(np.nanmean([msssim[i, j] for i in s for j in s if i < j]))
                                     for s in subsets],
                          "nn_ncc": [float(nn[list(s)].mean()) for s in subsets]}
            # same-class pairs: the class asked for, or in the unconditional row the class measured
            same_class = np.array([c == "lesion" for c in (classes or measured)])
            per_subset["msssim_within_class"] = [within_class_mean(msssim, s, same_class) for s in subsets]
            row = {"row": name, **({k: v for k, v in guidance.items() if k != "name"} if classes else {}),
                   "seconds_per_volume": seconds, "measured_lesion_fraction": measured.count("lesion") / len(seeds),
                   "statistic": [round(float(s), 4) for s in stat],
                   **{k: float(statistics.median(v)) for k, v in per_subset.items()}, "_subsets": per_subset}
            if classes:
                row["agreement"] = float(np.mean([r == m for r, m in zip(requested, measured)]))
                row["auc"] = class_auc(requested, stat.tolist())
                row["agreement_per_class"] = {c: float(np.mean([m == c for r, m in zip(requested, measured) if r == c]))
                                              for c in ("healthy", "lesion")}
            logger.info("%s: %s", name, {k: v for k, v in row.items() if k not in ("_subsets", "statistic")})
            rows.append(row)
    band = {k: [float(np.percentile(rows[0]["_subsets"][k], 5)), float(np.percentile(rows[0]["_subsets"][k], 95))]
            for k in ("msssim", "nn_ncc", "msssim_within_class")}
    for row in rows:
        row["inside_band"] = {k: bool(band[k][0] <= row[k] <= band[k][1]) for k in band}
        row["inside_real_within_class_band"] = bool(band_within[0] <= row["msssim_within_class"] <= band_within[1])
        row.pop("_subsets")
    result = {"rows": rows, "band_uncond": band, "threshold": threshold, "train_class_means": means,
              "band_real_within_class_msssim": band_within,
              "heldout_real_accuracy": held_acc, "lesion_region_voxels": int(mask.sum()),
              "heldout_reconstruction": recon_ceiling, "heldout_reconstruction_shipped_autoencoder": shipped_ceiling,
              "autoencoder_finetune": {"steps": args.ae_steps, "lr": args.ae_lr, "batch_size": args.ae_batch_size,
                                       "loss": "4 * L1 + quantization, Adam, from the shipped demo VQ-GAN",
                                       "l1_every_50_steps": ae_log, "seconds": ae_seconds},
              "train_seconds": train_seconds, "settings": vars(args), "machine": machine_info(),
              "wall_seconds": time.perf_counter() - tic,
              "command": "python bench/class_conditioning.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_json(Path(args.out), result)
    text = format_table(result)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    logger.info("results in %s\n%s", args.out, text)
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the rows."""
    lines = ["| row | agreement | healthy ok | lesion ok | AUC | MS-SSIM all pairs (uncond band) | "
             "MS-SSIM same class (uncond band) | same class vs real band | NN-NCC (uncond band) | s/volume |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    band, within = result["band_uncond"], result["band_real_within_class_msssim"]

    def cell(row: dict[str, Any], key: str, lo_hi: Sequence[float], inside: bool | None = None) -> str:
        inside = row["inside_band"][key] if inside is None else inside
        return f"{row[key]:.3f} ({lo_hi[0]:.3f}..{lo_hi[1]:.3f}{'' if inside else ', OUT'})"

    for row in result["rows"]:
        per = row.get("agreement_per_class", {})
        nan = float("nan")
        lines.append(
            f"| {row['row']} | {row.get('agreement', nan):.2f} | {per.get('healthy', nan):.2f} | "
            f"{per.get('lesion', nan):.2f} | {row.get('auc', nan):.2f} | {cell(row, 'msssim', band['msssim'])} | "
            f"{cell(row, 'msssim_within_class', band['msssim_within_class'])} | "
            f"{cell(row, 'msssim_within_class', within, row['inside_real_within_class_band'])} | "
            f"{cell(row, 'nn_ncc', band['nn_ncc'])} | "
            f"{row['seconds_per_volume']:.2f} |")
    rec, shipped, ft = (result["heldout_reconstruction"], result["heldout_reconstruction_shipped_autoencoder"],
                        result["autoencoder_finetune"])
    lines.append(f"\nheld-out real accuracy of the statistic: {result['heldout_real_accuracy']:.2f}; on the bench "
                 f"autoencoder's reconstructions of them (the ceiling): {rec['accuracy']:.2f}, AUC {rec['auc']:.2f} "
                 f"(shipped VQ-GAN: {shipped['accuracy']:.2f}, AUC {shipped['auc']:.2f}; fine-tuned "
                 f"{ft['steps']} steps in {ft['seconds']:.0f} s); lesion radius "
                 f"{result['settings']['lesion_radius_mm']:g} mm, contrast {result['settings']['lesion_contrast']:g}; "
                 f"uncond measured lesion fraction: {result['rows'][0]['measured_lesion_fraction']:.2f}; "
                 f"denoiser {result['settings']['steps']} steps in {result['train_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
