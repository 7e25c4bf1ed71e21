# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The CT demo: the whole CT pipeline at small size on real CT, from DICOM trees, through the bundle CLI."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from meddiff.cli.demo import DEMO_OVERRIDES, run_stages
from meddiff.data.demo import make_ct_demo

__all__ = ["CT_DEMO_OVERRIDES", "CT_STAGES", "run_ct_demo"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]

# 32^3 volumes of 5.5 mm (the whole head), 8x downsampling to 4^3 latents, small networks and short
# schedules: about 140 s of CPU time in single-threaded workflows, under 3 minutes on 2 CPU cores.
CT_DEMO_OVERRIDES: dict[str, str] = {
    **DEMO_OVERRIDES,  # the MRI demo's networks, except where CT's 8x downsampling differs
    "spatial_size": "[32,32,32]",
    "autoencoder_channels": "[8,16,32]",
    "discriminator_channels": "8",
    "discriminator_layers": "2",
    "log_interval": "50",
}
CT_STAGES: dict[str, dict[str, str]] = {
    # no adversarial phase: in a run this short it trades L1 for checkerboard artefacts
    "train_autoencoder": {"max_steps": "600", "autoencoder_lr": "0.001", "val_interval": "200", "ckpt_interval": "300"},
    "train_diffusion": {"max_steps": "400", "batch_size": "4", "ema_start_step": "100", "val_interval": "200",
                        "ckpt_interval": "200", "warmup_steps": "50", "diffusion_lr": "0.0005"},
    "inference": {"num_samples": "2", "num_inference_steps": "50", "write_dicom": "true"},
}


def run_ct_demo(output_dir: str = "demo_output/ct", num_volumes: int = 8, bundle: str | None = None) -> str:
    """Write the demo DICOM trees, train the VQ-GAN and the DDPM briefly, sample, and return the samples folder.

    The data are LIDC-IDRI-style trees (patient / study / series) of variants of a real head CT shipped
    with meddiff, each study with decoy chest-radiograph and report series that the bundle's CT series
    selection skips. Samples are int16 NIfTI in HU, lung and soft-tissue PNG mosaics and DICOM CT series
    marked synthetic.

    Args:
        output_dir: folder for data, checkpoints and samples (created).
        num_volumes: number of demo patients.
        bundle: bundle folder (default: the repository's ``bundles/ct_generative_diffusion``).

    Returns:
        The samples folder.

    Raises:
        subprocess.CalledProcessError: a workflow failed (its output is above the error).
    """
    out = Path(output_dir).resolve()
    bundle_dir = Path(bundle) if bundle else REPO_ROOT / "bundles" / "ct_generative_diffusion"
    data_dir = out / "data"
    tic = time.perf_counter()
    if not data_dir.is_dir():
        make_ct_demo(data_dir, num_volumes=num_volumes)
    common = {**CT_DEMO_OVERRIDES, "bundle_root": str(bundle_dir), "dataset_dir": str(data_dir),
              "ckpt_dir": str(out / "models"), "output_dir": str(out / "samples")}
    run_stages(bundle_dir, CT_STAGES, common)
    samples = out / "samples"
    logger.info("CT demo finished in %.0f s: synthetic CT (int16 NIfTI in HU, lung and soft-tissue PNG mosaics, "
                "DICOM series marked synthetic) are in %s", time.perf_counter() - tic, samples)
    return str(samples)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_ct_demo(*sys.argv[1:2])
