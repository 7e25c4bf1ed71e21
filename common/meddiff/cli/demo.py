# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""`meddiff demo`: sample the generation bundles' shipped demo weights (seconds), or retrain them (``train=True``).

Both paths go through the bundle CLI (``python -m monai.bundle run``) with the bundle's demo overlay
(``configs/demo_brain.json``: 64^3 at 3 mm, VQ-GAN with 4x compression, pseudo-3D denoiser 16 * [1, 2, 4, 8]).
The MRI part also generates one image from a label map with the demo ControlNet (``inference_controlnet.json``)
and writes the pair with a PNG overlay mosaic.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from meddiff.cli.stages import (
    REPO_ROOT,
    TRAIN_OVERRIDES,
    check_shipped_weights,
    demo_train_stages,
    run_stages,
    trained_weights,
)
from meddiff.data.demo import make_brain_label_demo

__all__ = [
    "CONTROLNET_MASK_SEED",
    "CONTROLNET_OVERLAY",
    "CONTROLNET_SHIPPED",
    "CONTROLNET_STAGE",
    "CONTROLNET_TRAIN_OVERRIDES",
    "MRI_DATA_SPACING",
    "MRI_OVERLAY",
    "MRI_SHIPPED",
    "MRI_TRAIN_STAGES",
    "SAMPLE_STAGE",
    "run_demo",
    "run_mri_controlnet_demo",
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
#: files in ``bundles/mri_generative_diffusion/models`` the mask-conditioned demo needs (besides MRI_SHIPPED)
CONTROLNET_SHIPPED = ("model_controlnet.pt", "model_controlnet.json")
#: mask-conditioned sampling, merged after inference.json (and before the demo overlay)
CONTROLNET_OVERLAY = "configs/inference_controlnet.json"
#: one image per demo mask, the bundle's default sampler (10 rectified-flow steps)
CONTROLNET_STAGE: dict[str, dict[str, str]] = {"inference": {"num_samples_per_mask": "1", "progress": "false"}}
#: seed of the demo mask's volume: a variant the shipped ControlNet was not trained on (it saw seed 0's)
CONTROLNET_MASK_SEED = 1
#: the schedule the shipped demo ControlNet was trained with (bundles/mri_generative_diffusion/docs/README.md)
CONTROLNET_TRAIN_OVERRIDES: dict[str, str] = {
    "num_label_classes": "3", "max_steps": "1200", "batch_size": "4", "controlnet_lr": "0.0005", "warmup_steps": "100",
    "ema_start_step": "500", "ema_update_every": "1", "val_interval": "400", "ckpt_interval": "400"}


def run_mri_controlnet_demo(output_dir: str | Path, bundle_dir: str | Path,
                            weights: dict[str, str] | None = None) -> str:
    """Sample one image from one demo label map with the demo ControlNet; write the pair and an overlay mosaic.

    The mask is :func:`meddiff.data.demo.make_brain_label_demo`'s label map of a template variant the shipped
    ControlNet was not trained on. Output: ``<case>_000_image.nii.gz`` beside ``<case>_000_label.nii.gz`` (same
    affine), the image's PNG mosaic, ``<case>_000_overlay.png`` (label colours over the image), ``samples.json``.

    Args:
        output_dir: the folder to write into (the mask goes to ``output_dir/../controlnet_mask``).
        bundle_dir: the MRI bundle folder.
        weights: overrides of the weight keys (default: the shipped ``models/`` files of the demo overlay).

    Returns:
        The output folder.

    Raises:
        subprocess.CalledProcessError: the workflow failed (its output is above the error).
    """
    import nibabel as nib

    from meddiff.data.writers import save_overlay_mosaic_png

    out = Path(output_dir)
    mask_data = out.parent / "controlnet_mask"
    make_brain_label_demo(mask_data, num_volumes=1, spacing=MRI_DATA_SPACING, seed=CONTROLNET_MASK_SEED)
    run_stages(bundle_dir, CONTROLNET_STAGE, {"bundle_root": str(bundle_dir), "output_dir": str(out),
                                              "mask_dir": str(mask_data / "labelsTr"), **(weights or {})},
               overlays=[CONTROLNET_OVERLAY, MRI_OVERLAY])
    for image_file in sorted(out.glob("*_image.nii.gz")):
        label_file = image_file.with_name(image_file.name.replace("_image.nii.gz", "_label.nii.gz"))
        image = nib.load(image_file)
        save_overlay_mosaic_png(np.asarray(image.dataobj), np.asarray(nib.load(label_file).dataobj),
                                image_file.with_name(image_file.name.replace("_image.nii.gz", "_overlay.png")),
                                affine=image.affine)
    return str(out)


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
        # the label maps (dataset.json beside imagesTr/) train the ControlNet; stages 1-2 read imagesTr/ only
        make_brain_label_demo(data_dir, num_volumes=num_volumes, spacing=MRI_DATA_SPACING)
        weights = {**trained_weights(ckpt_dir), "controlnet_weights": str(ckpt_dir / "controlnet.pt"),
                   "controlnet_info_file": str(ckpt_dir / "controlnet.json")}
        train_common = {**TRAIN_OVERRIDES, **common, "dataset_dir": str(data_dir / "imagesTr"),
                        "ckpt_dir": str(ckpt_dir), **weights}
        run_stages(bundle_dir, MRI_TRAIN_STAGES, train_common, overlays=[MRI_OVERLAY])
        # stage 3 is merged over train_diffusion.json (its docs' command)
        run_stages(bundle_dir, {"train_diffusion": CONTROLNET_TRAIN_OVERRIDES},
                   {**train_common, "controlnet_datalist_file": str(data_dir / "dataset.json")},
                   overlays=["configs/train_controlnet.json", MRI_OVERLAY])
    else:
        check_shipped_weights(bundle_dir, MRI_SHIPPED + CONTROLNET_SHIPPED)
        run_stages(bundle_dir, SAMPLE_STAGE, common, overlays=[MRI_OVERLAY])
        weights = None
    toc = time.perf_counter()
    controlnet = run_mri_controlnet_demo(out / "controlnet", bundle_dir, weights)
    logger.info("MRI demo finished in %.0f s (mask-conditioned pair %.0f s): synthetic volumes (NIfTI + PNG mosaics) "
                "are in %s, an image generated from a label map (image + label NIfTI, overlay PNG) in %s",
                time.perf_counter() - tic, time.perf_counter() - toc, samples, controlnet)
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
    results = [run_mri_demo(str(out / "mri"), num_volumes, train=train), str(out / "mri" / "controlnet"),
               run_ct_demo(str(out / "ct"), num_volumes, train=train),
               run_breast_demo(out / "breast", train=train)]
    logger.info("demo finished in %.0f s. Synthetic MRI, an MRI generated from a label map (image + label NIfTI, "
                "overlay PNG), synthetic CT (NIfTI, PNG mosaics, CT also as DICOM) and breast "
                "segmentations of held-out phantoms (masks/, eval/summary.json; with training also the label-budget "
                "experiment) are in:\n  %s",
                time.perf_counter() - tic, "\n  ".join(results))
    return str(out)
