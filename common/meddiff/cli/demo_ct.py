# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The CT demo: sample the CT bundle's shipped demo weights, or retrain them on DICOM trees of a real head CT."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from meddiff.cli.stages import (
    REPO_ROOT,
    TRAIN_OVERRIDES,
    check_shipped_weights,
    demo_train_stages,
    run_stages,
    trained_weights,
)
from meddiff.data.demo import make_ct_demo

__all__ = ["CT_OVERLAY", "CT_SAMPLE_STAGE", "CT_SHIPPED", "CT_TRAIN_STAGES", "run_ct_demo"]

logger = logging.getLogger(__name__)

#: geometry (64^3 at 3 mm, the whole head) and network sizes (4x compression) of the shipped demo weights
CT_OVERLAY = "configs/demo_head_ct.json"
#: files in ``bundles/ct_generative_diffusion/models`` the sampling demo needs
CT_SHIPPED = ("model_autoencoder.pt", "model.pt", "model.json")
#: sampling: two volumes, also written as DICOM series marked synthetic, with the bundle's default sampler (10
#: rectified-flow steps, bench/README.md)
CT_SAMPLE_STAGE: dict[str, dict[str, str]] = {"inference": {"num_samples": "2", "write_dicom": "true",
                                                            "progress": "false"}}
#: the schedules the shipped CT weights were trained with (bundles/ct_generative_diffusion/docs/README.md)
CT_TRAIN_STAGES = demo_train_stages(3000, CT_SAMPLE_STAGE)


def run_ct_demo(output_dir: str = "demo_output/ct", num_volumes: int = 8, bundle: str | None = None,
                train: bool = False) -> str:
    """Sample the CT bundle's shipped demo weights, or (``train``) write the demo DICOM trees, retrain and sample.

    The training data are LIDC-IDRI-style trees (patient / study / series) of variants of a real head CT shipped
    with meddiff, each study with decoy chest-radiograph and report series that the bundle's CT series selection
    skips. Samples are int16 NIfTI in HU, lung and soft-tissue PNG mosaics and DICOM CT series marked synthetic.

    Args:
        output_dir: folder for the samples (and, when training, the data and checkpoints); created.
        num_volumes: number of demo patients (training only).
        bundle: bundle folder (default: the repository's ``bundles/ct_generative_diffusion``).
        train: retrain the VQ-GAN and the denoiser first instead of using the shipped weights.

    Returns:
        The samples folder.

    Raises:
        FileNotFoundError: sampling without the shipped weights in the bundle.
        subprocess.CalledProcessError: a workflow failed (its output is above the error).
    """
    out = Path(output_dir).resolve()
    bundle_dir = Path(bundle) if bundle else REPO_ROOT / "bundles" / "ct_generative_diffusion"
    samples = out / "samples"
    tic = time.perf_counter()
    common = {"bundle_root": str(bundle_dir), "output_dir": str(samples)}
    if train:
        data_dir, ckpt_dir = out / "data", out / "models"
        if not data_dir.is_dir():
            make_ct_demo(data_dir, num_volumes=num_volumes)
        run_stages(bundle_dir, CT_TRAIN_STAGES, {**TRAIN_OVERRIDES, **common, "dataset_dir": str(data_dir),
                                                 "ckpt_dir": str(ckpt_dir), **trained_weights(ckpt_dir)},
                   overlays=[CT_OVERLAY])
    else:
        check_shipped_weights(bundle_dir, CT_SHIPPED)
        run_stages(bundle_dir, CT_SAMPLE_STAGE, common, overlays=[CT_OVERLAY])
    logger.info("CT demo finished in %.0f s: synthetic CT (int16 NIfTI in HU, lung and soft-tissue PNG mosaics, "
                "DICOM series marked synthetic) are in %s", time.perf_counter() - tic, samples)
    return str(samples)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_ct_demo(*sys.argv[1:2])
