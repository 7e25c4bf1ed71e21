# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""`meddiff demo`: the whole MRI pipeline at small size on real MRI, through the bundle CLI."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from meddiff.data.demo import make_brain_demo

__all__ = ["run_demo", "DEMO_OVERRIDES"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]

# Small networks and short schedules so the demo finishes in minutes on 2 CPU cores.
DEMO_OVERRIDES: dict[str, str] = {
    "pixdim": "[5.5,5.5,5.5]",
    "spatial_size": "[32,40,32]",
    "autoencoder_channels": "[32,64]",
    "autoencoder_res_layers": "1",
    "codebook_size": "256",
    "embedding_dim": "4",
    "discriminator_channels": "16",
    "unet_channels": "[32,64]",
    "unet_attention_levels": "[false,true]",
    "unet_res_blocks": "1",
    "unet_head_channels": "16",
    "num_workers": "0",
    "log_interval": "25",
}
STAGES = {
    # the GAN phase needs far more steps than a demo has to help; the tests exercise it
    "train_autoencoder": {"max_steps": "300", "adversarial_start_step": "1000000", "autoencoder_lr": "0.001",
                          "val_interval": "100", "ckpt_interval": "300"},
    "train_diffusion": {"max_steps": "600", "batch_size": "4", "ema_start_step": "200", "val_interval": "200",
                        "ckpt_interval": "300", "warmup_steps": "50", "diffusion_lr": "0.0005"},
    "inference": {"num_samples": "2", "num_inference_steps": "50"},
}


def _bundle_command(bundle: Path, stage: str, overrides: dict[str, str]) -> list[str]:
    configs = ["configs/common.json", "configs/train_autoencoder.json"]
    if stage != "train_autoencoder":
        configs.append(f"configs/{stage}.json")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs).replace(" ", "")]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    return cmd


def run_demo(output_dir: str = "demo_output", num_volumes: int = 8, bundle: str | None = None) -> str:
    """Build the demo data, train the VQ-GAN and the DDPM briefly, sample, and return the samples folder.

    Args:
        output_dir: folder for data, checkpoints and samples (created).
        num_volumes: number of demo MRI volumes derived from the ICBM 2009a template.
        bundle: bundle folder (default: the repository's ``bundles/mri_generative_diffusion``).
    """
    out = Path(output_dir).resolve()
    bundle_dir = Path(bundle) if bundle else REPO_ROOT / "bundles" / "mri_generative_diffusion"
    data_dir = out / "data"
    make_brain_demo(data_dir, num_volumes=num_volumes)
    common = {**DEMO_OVERRIDES, "bundle_root": str(bundle_dir), "dataset_dir": str(data_dir),
              "ckpt_dir": str(out / "models"), "output_dir": str(out / "samples")}
    tic = time.perf_counter()
    for stage, stage_overrides in STAGES.items():
        cmd = _bundle_command(bundle_dir, stage, {**common, **stage_overrides})
        logger.info("running %s:\n  (cd %s && %s)", stage, bundle_dir, shlex.join(cmd))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run(cmd, cwd=bundle_dir, check=True, env=env)
    samples = out / "samples"
    logger.info("demo finished in %.0f s: synthetic volumes (NIfTI + PNG mosaics) are in %s",
                time.perf_counter() - tic, samples)
    return str(samples)
