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

__all__ = ["DEMO_OVERRIDES", "STAGES", "run_demo", "run_mri_demo", "run_stages"]

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
    "unet_attention_levels": "[False,True]",
    "unet_res_blocks": "1",
    "unet_head_channels": "16",
    "num_workers": "0",
    "log_interval": "25",
}
STAGES = {
    # the GAN phase needs far more steps than a demo has to help; the tests exercise it
    "train_autoencoder": {"max_steps": "300", "adversarial_start_step": "1000000", "autoencoder_lr": "0.001",
                          "val_interval": "100", "ckpt_interval": "300"},
    "train_diffusion": {"max_steps": "400", "batch_size": "4", "ema_start_step": "100", "val_interval": "200",
                        "ckpt_interval": "200", "warmup_steps": "50", "diffusion_lr": "0.0005"},
    "inference": {"num_samples": "2", "num_inference_steps": "50"},
}


def run_stages(bundle_dir: Path, stages: dict[str, dict[str, str]], overrides: dict[str, str]) -> None:
    """Run the generation bundle's workflows in order through ``python -m monai.bundle run``.

    Each stage is merged over ``train_autoencoder.json`` as the bundle docs describe; every command
    is logged so it can be rerun by hand.

    Raises:
        subprocess.CalledProcessError: a workflow failed (its output is above the error).
    """
    for stage, stage_overrides in stages.items():
        configs = ["configs/common.json", "configs/train_autoencoder.json"]
        if stage != "train_autoencoder":
            configs.append(f"configs/{stage}.json")
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs).replace(" ", "")]
        for key, value in {**overrides, **stage_overrides}.items():
            cmd += [f"--{key}", value]
        logger.info("running %s:\n  (cd %s && %s)", stage, bundle_dir, shlex.join(cmd))
        # one thread: the demo's tensors are tiny, and on a busy 2-core machine OpenMP threads mostly wait
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run(cmd, cwd=bundle_dir, check=True, env=env)


def run_mri_demo(output_dir: str = "demo_output/mri", num_volumes: int = 8, bundle: str | None = None) -> str:
    """Build the MRI demo data, train the VQ-GAN and the DDPM briefly, sample, and return the samples folder.

    Args:
        output_dir: folder for data, checkpoints and samples (created).
        num_volumes: number of demo MRI volumes derived from the ICBM 2009a template.
        bundle: bundle folder (default: the repository's ``bundles/mri_generative_diffusion``).
    """
    out = Path(output_dir).resolve()
    bundle_dir = Path(bundle) if bundle else REPO_ROOT / "bundles" / "mri_generative_diffusion"
    data_dir = out / "data"
    tic = time.perf_counter()
    make_brain_demo(data_dir, num_volumes=num_volumes)
    run_stages(bundle_dir, STAGES, {**DEMO_OVERRIDES, "bundle_root": str(bundle_dir), "dataset_dir": str(data_dir),
                                    "ckpt_dir": str(out / "models"), "output_dir": str(out / "samples")})
    samples = out / "samples"
    logger.info("MRI demo finished in %.0f s: synthetic volumes (NIfTI + PNG mosaics) are in %s",
                time.perf_counter() - tic, samples)
    return str(samples)


def run_demo(output_dir: str = "demo_output", num_volumes: int = 8) -> str:
    """The MRI and CT generation pipelines on real data, then the breast label-budget experiment on phantoms.

    Args:
        output_dir: folder for the demos (``mri/``, ``ct/`` and ``breast/`` inside).
        num_volumes: volumes per demo data set.

    Returns:
        The demo folder.
    """
    from meddiff.cli.demo_breast import run_breast_demo
    from meddiff.cli.demo_ct import run_ct_demo

    tic = time.perf_counter()
    out = Path(output_dir).resolve()
    results = [run_mri_demo(str(out / "mri"), num_volumes), run_ct_demo(str(out / "ct"), num_volumes),
               run_breast_demo(out / "breast")]
    logger.info("demo finished in %.0f s. Synthetic MRI and CT (NIfTI, PNG mosaics, CT also as DICOM) and the "
                "breast phantom experiment (summary.csv, dice_vs_budget.png) are in:\n  %s",
                time.perf_counter() - tic, "\n  ".join(results))
    return str(out)
