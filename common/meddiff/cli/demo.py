# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""`meddiff demo`: sample the generation bundles' shipped demo weights (seconds), or retrain them (``train=True``).

Both paths go through the bundle CLI (``python -m monai.bundle run``) with the bundle's demo overlay
(``configs/demo_brain.json``: 64^3 at 3 mm, VQ-GAN with 4x compression, pseudo-3D denoiser 16 * [1, 2, 4, 8]).
"""

from __future__ import annotations

import logging
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
from meddiff.data.demo import make_brain_demo

__all__ = [
    "MRI_DATA_SPACING",
    "MRI_OVERLAY",
    "MRI_SHIPPED",
    "MRI_TRAIN_STAGES",
    "SAMPLE_STAGE",
    "run_demo",
    "run_mri_demo",
]

logger = logging.getLogger(__name__)

#: geometry and network sizes of the shipped demo weights, appended after each workflow's configs
MRI_OVERLAY = "configs/demo_brain.json"
#: files in ``bundles/mri_generative_diffusion/models`` the sampling demo needs
MRI_SHIPPED = ("model_autoencoder.pt", "model.pt", "model.json")
#: voxel size of the demo data (mm): the ICBM 2009a head fills 64^3
MRI_DATA_SPACING = 3.0
#: sampling: two volumes with the bundle's default sampler (10 rectified-flow steps, bench/README.md)
SAMPLE_STAGE: dict[str, dict[str, str]] = {"inference": {"num_samples": "2", "progress": "false"}}
#: the schedules the shipped MRI weights were trained with (bundles/mri_generative_diffusion/docs/README.md)
MRI_TRAIN_STAGES = demo_train_stages(4000, SAMPLE_STAGE)


def run_mri_demo(output_dir: str = "demo_output/mri", num_volumes: int = 8, bundle: str | None = None,
                 train: bool = False) -> str:
    """Sample the MRI bundle's shipped demo weights, or (``train``) make the demo data, retrain and sample.

    Args:
        output_dir: folder for the samples (and, when training, the data and checkpoints); created.
        num_volumes: number of demo MRI volumes derived from the ICBM 2009a template (training only).
        bundle: bundle folder (default: the repository's ``bundles/mri_generative_diffusion``).
        train: retrain the VQ-GAN and the denoiser first (tens of minutes on a CPU) instead of using the shipped
            weights.

    Returns:
        The samples folder.

    Raises:
        FileNotFoundError: sampling without the shipped weights in the bundle.
        subprocess.CalledProcessError: a workflow failed (its output is above the error).
    """
    out = Path(output_dir).resolve()
    bundle_dir = Path(bundle) if bundle else REPO_ROOT / "bundles" / "mri_generative_diffusion"
    samples = out / "samples"
    tic = time.perf_counter()
    common = {"bundle_root": str(bundle_dir), "output_dir": str(samples)}
    if train:
        data_dir, ckpt_dir = out / "data", out / "models"
        make_brain_demo(data_dir, num_volumes=num_volumes, spacing=MRI_DATA_SPACING)
        run_stages(bundle_dir, MRI_TRAIN_STAGES, {**TRAIN_OVERRIDES, **common, "dataset_dir": str(data_dir),
                                                  "ckpt_dir": str(ckpt_dir), **trained_weights(ckpt_dir)},
                   overlays=[MRI_OVERLAY])
    else:
        check_shipped_weights(bundle_dir, MRI_SHIPPED)
        run_stages(bundle_dir, SAMPLE_STAGE, common, overlays=[MRI_OVERLAY])
    logger.info("MRI demo finished in %.0f s: synthetic volumes (NIfTI + PNG mosaics) are in %s",
                time.perf_counter() - tic, samples)
    return str(samples)


def run_demo(output_dir: str = "demo_output", num_volumes: int = 8, train: bool = False) -> str:
    """The MRI and CT generation bundles and the breast segmentation bundle: shipped demo weights, or retrained.

    Args:
        output_dir: folder for the demos (``mri/``, ``ct/`` and ``breast/`` inside).
        num_volumes: volumes per demo data set (training only).
        train: retrain every demo model (and run the breast label-budget experiment) instead of using the shipped
            weights.

    Returns:
        The demo folder.
    """
    from meddiff.cli.demo_breast import run_breast_demo
    from meddiff.cli.demo_ct import run_ct_demo

    tic = time.perf_counter()
    out = Path(output_dir).resolve()
    results = [run_mri_demo(str(out / "mri"), num_volumes, train=train),
               run_ct_demo(str(out / "ct"), num_volumes, train=train),
               run_breast_demo(out / "breast", train=train)]
    logger.info("demo finished in %.0f s. Synthetic MRI and CT (NIfTI, PNG mosaics, CT also as DICOM) and breast "
                "segmentations of held-out phantoms (masks/, eval/summary.json; with training also the label-budget "
                "experiment) are in:\n  %s",
                time.perf_counter() - tic, "\n  ".join(results))
    return str(out)
