# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""A latent diffusion model trained on 64³ **crops** of larger volumes, sampled at 64³, 96×96×64 and 128×128×64.

``bench/sampling_sizes.py`` samples the shipped whole-head demo weights at larger sizes and finds tiled partial
brains: a model that only saw heads filling 64³ has no reason to make a larger field of view. This bench does
the experiment a larger ``spatial_size`` is meant for: a model trained on random 64³ crops of 128×128×64
volumes whose content is **locally stationary** (a crop looks alike wherever it falls), then sampled at the
crop size and larger, each size scored against real volumes of that size (centre crops of held-out real
volumes) with ``bench/sampling_sizes.py``'s metrics, in one run.

Data: two-phase tissue texture (bright fat-like and dark fibroglandular-like tissue, as in the breast
phantoms' glandular texture: a thresholded smooth Gaussian field with soft boundaries, a smooth multiplicative
bias field and Rician noise), periodic so that every crop has the same statistics. Anatomy (a brain) is not
locally stationary: a crop model without in-plane position cannot know where in the head it is, so it is the
wrong test for "sample a larger field of view" and the whole-head rows of ``sampling_sizes.md`` already show
what a model of non-stationary content does at a larger size.

Training (``--train``; otherwise the weights in ``--weights_dir`` are reused):

1. autoencoder: the MRI bundle's shipped demo VQ-GAN (``models/model_autoencoder.pt``) is brain-specific
   (reconstruction PSNR on the texture about 12 dB against 23 dB on its brains), so it is fine-tuned briefly on
   random 32³ crops of the training volumes (L1 + the VQ commitment loss, no adversarial term: a bench
   shortcut, not the bundle's ``train_autoencoder.json``); the PSNR before and after goes into the JSON.
2. denoiser: the bundle's ``train_diffusion.json`` definitions (demo widths of ``configs/demo_brain.json``,
   rectified flow, absolute depth position, its optimiser settings, EMA) trained by
   ``meddiff.engines.DiffusionTrainer``, whose cached whole-volume latents (4×32×32×16) are replaced by random
   4×16×16×16 latent crops (64³ in image space; the full depth, so the depth code is the training one).

Weights go to ``--weights_dir`` (default ``bench/outputs/sampling_sizes_crops``, ignored by git).

    OMP_NUM_THREADS=2 python bench/sampling_sizes_crops.py --train \\
        --out bench/results/sampling_sizes_crops.json --markdown bench/results/sampling_sizes_crops.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sampling import POOL_GRID, run_info, write_results  # noqa: E402
from bench.sampling_sizes import _parse_size, format_table, run_sizes_bench  # noqa: E402
from meddiff.engines import DiffusionTrainer  # noqa: E402
from meddiff.engines.sampler import ResumableSampler  # noqa: E402
from meddiff.engines.trainer import TrainerSettings  # noqa: E402
from meddiff.metrics import mmd_score, pooled_intensities  # noqa: E402
from meddiff.utils import atomic_torch_save, atomic_write_json  # noqa: E402

__all__ = [
    "CropDiffusionTrainer",
    "LatentCrops",
    "centre_crop",
    "finetune_autoencoder",
    "main",
    "make_texture_volume",
    "reconstruction_psnr",
    "texture_statistics",
]

logger = logging.getLogger("bench.sampling_sizes_crops")

CONFIGS = ["configs/common.json", "configs/train_autoencoder.json", "configs/train_diffusion.json",
           "configs/demo_brain.json"]


def make_texture_volume(
    shape: Sequence[int], seed: int, correlation: float = 3.0, bias: float = 0.1, noise: float = 0.02
) -> torch.Tensor:
    """One two-phase tissue-texture volume, periodic (locally stationary), intensities in [-1, 1].

    Args:
        shape: ``(H, W, D)`` voxels.
        seed: random seed (the same seed gives the same volume).
        correlation: smoothing of the Gaussian field in voxels (the size of the tissue structures).
        bias: standard deviation of the log bias field (smoothed by 16 voxels).
        noise: Rician noise level, as a fraction of the [0, 1] range.

    Returns:
        ``(1, H, W, D)`` float32 tensor.

    Raises:
        ValueError: ``shape`` is not three positive sizes.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (H, W, D), got {tuple(shape)}.")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), correlation, mode="wrap")
    field = (field - field.mean()) / max(float(field.std()), 1e-6)
    tissue = 0.3 + 0.55 / (1.0 + np.exp(-4.0 * (field - rng.uniform(-0.5, 0.5))))  # glandular 0.3 .. fat 0.85
    log_bias = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 16.0, mode="wrap")
    tissue = tissue * np.exp(bias * (log_bias - log_bias.mean()) / max(float(log_bias.std()), 1e-6))
    tissue = np.hypot(tissue + rng.normal(0.0, noise, shape), rng.normal(0.0, noise, shape))
    return torch.from_numpy(np.clip(tissue, 0.0, 1.0) * 2.0 - 1.0).float()[None]


def centre_crop(volumes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centre ``size`` of ``volumes`` (N, C, H, W, D).

    Raises:
        ValueError: ``size`` is larger than the volumes.
    """
    if any(s > v for s, v in zip(size, volumes.shape[2:])):
        raise ValueError(f"crop {tuple(size)} is larger than the volumes {tuple(volumes.shape[2:])}.")
    starts = [(v - s) // 2 for s, v in zip(size, volumes.shape[2:])]
    return volumes[(..., *[slice(a, a + s) for a, s in zip(starts, size)])]


#: radial frequency bands of :func:`texture_statistics`, cycles per voxel
FREQUENCY_BANDS = (0.0, 0.03, 0.06, 0.1, 0.15, 0.25, 0.9)


def _radial_power(volumes: torch.Tensor) -> list[float]:
    x = volumes[:, 0].double()
    power = torch.fft.fftn(x - x.mean(dim=(1, 2, 3), keepdim=True), dim=(1, 2, 3)).abs() ** 2
    freqs = [torch.fft.fftfreq(n, dtype=torch.float64) for n in x.shape[1:]]
    radius = (freqs[0][:, None, None] ** 2 + freqs[1][None, :, None] ** 2 + freqs[2][None, None, :] ** 2).sqrt()
    masks = [(radius > 0) & (radius >= lo) & (radius < hi) for lo, hi in zip(FREQUENCY_BANDS[:-1], FREQUENCY_BANDS[1:])]
    return [float(power[:, m].mean()) if m.any() else float("nan") for m in masks]


def texture_statistics(samples: torch.Tensor, heldout: torch.Tensor) -> dict[str, Any]:
    """Contrast and spatial spectrum of samples against real volumes of the same size.

    Args:
        samples: (N, 1, H, W, D) in [-1, 1].
        heldout: (M, 1, H, W, D) in [-1, 1].

    Returns:
        ``std`` / ``real_std`` (mean per-volume standard deviation) and ``power_ratio``: the samples' mean power
        over the real volumes' per radial frequency band (``FREQUENCY_BANDS``, cycles per voxel, the zero
        frequency left out; 1 = same; NaN for a band with no frequency at this size).
    """
    ratio = [a / max(b, 1e-30) for a, b in zip(_radial_power(samples), _radial_power(heldout))]
    return {"std": float(samples.flatten(1).std(1).mean()), "real_std": float(heldout.flatten(1).std(1).mean()),
            "power_ratio": ratio, "frequency_bands": list(FREQUENCY_BANDS)}


def format_texture_table(result: Mapping[str, Any]) -> str:
    """Markdown: per size, real-vs-real intensity MMD, contrast and the power ratio per frequency band."""
    bands = FREQUENCY_BANDS
    heads = [f"power {lo:g}–{hi:g}" for lo, hi in zip(bands[:-1], bands[1:])]
    lines = ["| spatial_size | real-vs-real intensity MMD | std | real std | " + " | ".join(heads) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in heads) + " |"]
    for row in result["rows"]:
        extra = row["extra"]
        lines.append(f"| {'×'.join(map(str, row['spatial_size']))} | {row['real']['intensity_mmd']:.4g} | "
                     f"{extra['std']:.3f} | {extra['real_std']:.3f} | "
                     + " | ".join(f"{v:.2f}" for v in extra["power_ratio"]) + " |")
    lines += ["", "power: the samples' mean spectral power over the real volumes' per radial frequency band "
              "(cycles per voxel; 1 = same)."]
    return "\n".join(lines)


def _random_crop(volume: torch.Tensor, size: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    starts = [int(torch.randint(0, v - s + 1, (1,), generator=generator)) for s, v in zip(size, volume.shape[1:])]
    return volume[(slice(None), *[slice(a, a + s) for a, s in zip(starts, size)])]


class LatentCrops(Dataset):
    """Random crops of cached latents: item ``i`` is a fresh random ``crop`` of latent ``i % len(latents)``.

    Offsets come from torch's global RNG, which the trainer seeds and checkpoints.

    Args:
        latents: ``(C, h, w, d)`` latents.
        crop: crop size ``(h', w', d')`` in latent voxels.
        crops_per_latent: items per latent in one epoch.

    Raises:
        ValueError: no latents, or a crop larger than a latent.
    """

    def __init__(self, latents: Sequence[torch.Tensor], crop: Sequence[int], crops_per_latent: int = 32) -> None:
        if not latents:
            raise ValueError("LatentCrops needs at least one latent.")
        for z in latents:
            if any(c > s for c, s in zip(crop, z.shape[1:])):
                raise ValueError(f"latent crop {tuple(crop)} is larger than a latent {tuple(z.shape[1:])}.")
        self.latents = list(latents)
        self.crop = [int(c) for c in crop]
        self.crops_per_latent = int(crops_per_latent)

    def __len__(self) -> int:
        return len(self.latents) * self.crops_per_latent

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": _random_crop(self.latents[i % len(self.latents)], self.crop)}


class CropDiffusionTrainer(DiffusionTrainer):
    """``DiffusionTrainer`` on random latent crops: whole volumes are encoded and scaled once (scale factor from
    the whole latents, as the trainer does), then every batch holds random ``latent_crop`` crops of them.

    Args:
        latent_crop: crop size in latent voxels ``(h, w, d)``.
        crops_per_latent: crops per latent in one epoch.
        **kwargs: :class:`meddiff.engines.DiffusionTrainer` arguments (no validation loader).
    """

    def __init__(self, latent_crop: Sequence[int], crops_per_latent: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.latent_crop = [int(c) for c in latent_crop]
        self.crops_per_latent = int(crops_per_latent)

    def setup(self) -> None:
        """Cache the whole latents (``DiffusionTrainer.setup``), then batch random crops of them."""
        super().setup()
        whole = self.train_loader.dataset.latents
        crops = LatentCrops(whole, self.latent_crop, self.crops_per_latent)
        self.train_loader = DataLoader(crops, batch_size=self.train_loader.batch_size,
                                       sampler=ResumableSampler(crops, shuffle=True, seed=0))
        self.latent_shape = [int(whole[0].shape[0]), *self.latent_crop]
        logger.info("training on random latent crops %s of %d latents %s", self.latent_shape, len(whole),
                    list(whole[0].shape))


def reconstruction_psnr(autoencoder: nn.Module, volumes: torch.Tensor) -> float:
    """Mean PSNR (dB, range [-1, 1]) of the autoencoder's reconstructions of ``volumes`` (N, 1, H, W, D)."""
    autoencoder.eval()
    values = []
    with torch.no_grad():
        for v in volumes:
            r = autoencoder.decode_stage_2_outputs(autoencoder.encode_stage_2_inputs(v[None])).clamp(-1, 1)
            values.append(10 * np.log10(4.0 / max(float(((r - v[None]) ** 2).mean()), 1e-12)))
    return float(np.mean(values))


def finetune_autoencoder(
    autoencoder: nn.Module,
    volumes: torch.Tensor,
    steps: int,
    crop: Sequence[int] = (32, 32, 32),
    batch_size: int = 2,
    lr: float = 2e-4,
    seed: int = 0,
) -> list[float]:
    """Fine-tune a VQ-VAE on random crops of ``volumes`` (N, 1, H, W, D): L1 + its quantisation loss, Adam.

    Args:
        autoencoder: MONAI ``VQVAE`` (``forward`` returns ``(reconstruction, quantisation loss)``).
        volumes: training volumes in [-1, 1].
        steps: optimisation steps.
        crop: crop size.
        batch_size: crops per step.
        lr: Adam learning rate.
        seed: seed of the crop draws.

    Returns:
        The loss of every 50th step.
    """
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    autoencoder.train()
    losses = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(volumes), (batch_size,), generator=g)
        x = torch.stack([_random_crop(volumes[int(i)], crop, g) for i in idx])
        reconstruction, quantisation_loss = autoencoder(x)
        loss = (reconstruction - x).abs().mean() + quantisation_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            losses.append(loss.item())
            logger.info("autoencoder step %d/%d loss %.4f", step, steps, losses[-1])
    autoencoder.eval()
    return losses


def _parser(bundle: Path, overrides: Mapping[str, Any]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / c) for c in CONFIGS])
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser


def train(
    bundle: Path,
    weights_dir: Path,
    volumes: torch.Tensor,
    crop: Sequence[int],
    autoencoder_steps: int,
    diffusion_steps: int,
    batch_size: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune the autoencoder and train the denoiser on crops; weights and the recipe into ``weights_dir``.

    Returns:
        The training recipe and its measurements (JSON-ready).
    """
    from meddiff.networks import load_pretrained

    torch.manual_seed(seed)
    weights_dir.mkdir(parents=True, exist_ok=True)
    cfg = _parser(bundle, {"spatial_size": list(crop), "ckpt_dir": str(weights_dir), "progress": False})
    autoencoder = load_pretrained(cfg.get_parsed_content("autoencoder_def", lazy=False),
                                  bundle / "models" / "model_autoencoder.pt")
    heldout = torch.stack([make_texture_volume(volumes.shape[2:], 10_000 + i) for i in range(2)])
    psnr_before = reconstruction_psnr(autoencoder, heldout)
    tic = time.perf_counter()
    ae_losses = finetune_autoencoder(autoencoder, volumes, autoencoder_steps, seed=seed)
    ae_seconds = time.perf_counter() - tic
    psnr_after = reconstruction_psnr(autoencoder, heldout)
    logger.info("autoencoder PSNR on held-out texture %.2f dB -> %.2f dB (%.0f s)", psnr_before, psnr_after,
                ae_seconds)
    atomic_torch_save(autoencoder.state_dict(), weights_dir / "model_autoencoder.pt")

    compression = 2 ** len(cfg.get_parsed_content("autoencoder_channels"))
    model = cfg.get_parsed_content("diffusion_def", lazy=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg.get_parsed_content("diffusion_lr")))
    warmup = int(cfg.get_parsed_content("warmup_steps"))
    lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    loader = DataLoader([{"image": v} for v in volumes], batch_size=batch_size)
    settings = TrainerSettings(device="cpu", max_steps=diffusion_steps, ckpt_dir=weights_dir,
                               val_interval=diffusion_steps, ckpt_interval=diffusion_steps, keep_last=1,
                               log_interval=100, resume=False, progress=False)
    keys = ("loss", "ema_decay", "ema_update_every", "ema_start_step", "grad_clip")
    trainer = CropDiffusionTrainer(
        latent_crop=[c // compression for c in crop], autoencoder=autoencoder, diffusion_model=model,
        optimizer=optimizer, inferer=cfg.get_parsed_content("inferer"),
        prepare_batch=cfg.get_parsed_content("prepare_batch"), train_loader=loader, settings=settings,
        lr_scheduler=lr_scheduler, name="model", **{k: cfg.get_parsed_content(k) for k in keys})
    tic = time.perf_counter()
    trainer.run()
    diffusion_seconds = time.perf_counter() - tic
    return {
        "data": {"generator": "bench.sampling_sizes_crops.make_texture_volume", "num_volumes": len(volumes),
                 "volume_size": list(volumes.shape[2:]), "seeds": f"{seed}..{seed + len(volumes) - 1}"},
        "autoencoder": {"init": "bundles/mri_generative_diffusion/models/model_autoencoder.pt",
                        "recipe": "L1 + VQ commitment loss, Adam, random 32^3 crops, batch 2, lr 2e-4",
                        "steps": autoencoder_steps, "seconds": ae_seconds, "losses_every_50": ae_losses,
                        "psnr_heldout_before_db": psnr_before, "psnr_heldout_after_db": psnr_after},
        "diffusion": {"trainer": "meddiff.engines.DiffusionTrainer on random latent crops (CropDiffusionTrainer)",
                      "configs": CONFIGS, "image_crop": list(crop), "latent_crop": trainer.latent_shape,
                      "steps": diffusion_steps, "batch_size": batch_size, "seconds": diffusion_seconds,
                      "objective": str(cfg.get_parsed_content("objective")),
                      "lr": float(cfg.get_parsed_content("diffusion_lr")), "warmup_steps": warmup,
                      "unet_channels": list(cfg.get_parsed_content("unet_channels")),
                      "unet_depth_position": bool(cfg.get_parsed_content("unet_depth_position")),
                      **{k: cfg.get_parsed_content(k) for k in keys}},
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: (``--train``) train on crops, then sample every size and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="bundles/mri_generative_diffusion")
    parser.add_argument("--weights_dir", default="bench/outputs/sampling_sizes_crops")
    parser.add_argument("--train", action="store_true", help="train the models (else reuse --weights_dir)")
    parser.add_argument("--volume_size", type=_parse_size, default=(128, 128, 64), help="H,W,D of the real volumes")
    parser.add_argument("--crop", type=_parse_size, default=(64, 64, 64), help="training crop H,W,D")
    parser.add_argument("--num_train", type=int, default=8, help="training volumes")
    parser.add_argument("--num_heldout", type=int, default=8, help="held-out volumes")
    parser.add_argument("--autoencoder_steps", type=int, default=1000)
    parser.add_argument("--diffusion_steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", type=_parse_size, default=[(64, 64, 64), (96, 96, 64), (128, 128, 64)],
                        help="H,W,D sizes; the first is the baseline (the crop size)")
    parser.add_argument("--method", default="rflow")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first_seed", type=int, default=1000)
    parser.add_argument("--sample_batch_size", type=int, default=4)
    parser.add_argument("--out", default="bench/results/sampling_sizes_crops.json")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from meddiff.networks import load_pretrained

    tic = time.perf_counter()
    bundle, weights_dir = Path(args.bundle).resolve(), Path(args.weights_dir)
    if not args.train and not (weights_dir / "model.pt").is_file():
        raise FileNotFoundError(f"{weights_dir / 'model.pt'} is missing: run with --train first.")
    train_volumes = torch.stack([make_texture_volume(args.volume_size, i) for i in range(args.num_train)])
    heldout = torch.stack([make_texture_volume(args.volume_size, 1000 + i) for i in range(args.num_heldout)])
    recipe_file = weights_dir / "recipe.json"
    if args.train:
        recipe = train(bundle, weights_dir, train_volumes, args.crop, args.autoencoder_steps, args.diffusion_steps,
                       args.batch_size)
        atomic_write_json(recipe_file, recipe)
    recipe = json.loads(recipe_file.read_text())
    cfg = _parser(bundle, {"spatial_size": list(args.crop), "ckpt_dir": str(weights_dir), "progress": False})
    autoencoder = load_pretrained(cfg.get_parsed_content("autoencoder_def", lazy=False),
                                  weights_dir / "model_autoencoder.pt").eval()
    model = load_pretrained(cfg.get_parsed_content("diffusion_def", lazy=False), weights_dir / "model.pt").eval()
    info = json.loads((weights_dir / "model.json").read_text())
    references = {tuple(size): (centre_crop(heldout, size), centre_crop(train_volumes, size)) for size in args.sizes}
    result = run_sizes_bench(
        autoencoder, model, info, references, seeds=range(args.first_seed, args.first_seed + args.seeds),
        method=args.method, steps=args.steps,
        num_train_timesteps=int(cfg.get_parsed_content("num_train_timesteps")),
        schedule=str(cfg.get_parsed_content("noise_schedule")), compression=2 ** len(cfg["autoencoder_channels"]),
        sample_batch_size=args.sample_batch_size, extra_metrics=texture_statistics)
    for row in result["rows"]:  # real against real at that size: the floor of the intensity MMD
        held, trained = references[tuple(row["spatial_size"])]
        row["real"]["intensity_mmd"] = mmd_score(pooled_intensities((trained + 1) / 2, POOL_GRID),
                                                 pooled_intensities((held + 1) / 2, POOL_GRID))["value"]
    result["training"] = recipe
    result["autoencoder_psnr_heldout_db"] = {
        "x".join(map(str, s)): reconstruction_psnr(autoencoder, references[tuple(s)][0]) for s in args.sizes}
    result.update(run_info("bench/sampling_sizes_crops.py", argv, tic))
    result["torch_threads"] = torch.get_num_threads()
    table = format_table(result) + "\n\n" + format_texture_table(result)
    write_results(result, table, args.out, args.markdown, logger)
    return result


if __name__ == "__main__":
    main()
