# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Small real-MRI demo set, derived offline from the ICBM 2009a T1 template shipped in nilearn's wheel."""

from __future__ import annotations

import logging
import math
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Affine, Spacing

from meddiff.sampling.writers import save_nifti

__all__ = ["ICBM_T1_FILE", "icbm_t1_path", "make_brain_demo"]

logger = logging.getLogger(__name__)

ICBM_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def icbm_t1_path() -> Path:
    """Path of the ICBM152 2009a T1 template inside the installed nilearn package (no download)."""
    try:
        path = Path(str(resources.files("nilearn.datasets.data") / ICBM_T1_FILE))
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the brain demo needs nilearn (pip install nilearn): it carries the template") from e
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from this nilearn installation")
    return path


def make_brain_demo(output_dir: str | Path, num_volumes: int = 8, spacing: float = 5.5, seed: int = 0) -> list[Path]:
    """Write ``num_volumes`` NIfTI variants of the template: resampled to ``spacing`` mm, each with a small
    random rigid motion and scaling, a smooth bias field, a gamma change and Rician-like noise, so the
    generative models see a (tiny) population rather than one image.

    Args:
        output_dir: folder to write ``brain_XX.nii.gz`` into.
        num_volumes: number of variants.
        spacing: isotropic voxel size in mm.
        seed: random seed of the variations.

    Returns:
        The written files.
    """
    src = nib.load(icbm_t1_path())
    image = MetaTensor(np.asarray(src.dataobj, dtype=np.float32)[None], affine=torch.as_tensor(src.affine))
    resampled = Spacing(pixdim=(spacing,) * 3, mode="bilinear")(image)
    affine = resampled.affine.numpy()
    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    written = []
    shape = resampled.shape[1:]
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    for i in range(num_volumes):
        moved = Affine(
            rotate_params=[math.radians(float(a)) for a in rng.uniform(-6, 6, 3)],
            scale_params=[float(v) for v in rng.uniform(0.95, 1.05, 3)],
            translate_params=[float(v) for v in rng.uniform(-1.5, 1.5, 3)],
            padding_mode="zeros",
            image_only=True,
        )(resampled.clone())
        volume = np.clip(np.asarray(moved[0]), 0, None)
        volume = volume / max(volume.max(), 1e-6)
        bias = np.exp(sum(c * g for c, g in zip(rng.uniform(-0.25, 0.25, 3), grids)))
        volume = volume ** rng.uniform(0.85, 1.15) * bias
        sigma = 0.02
        volume = np.hypot(volume + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
        written.append(save_nifti((volume * 1000).astype(np.float32), affine, out / f"brain_{i:02d}.nii.gz"))
    logger.info("wrote %d demo volumes (%s voxels, %.1f mm) to %s", num_volumes, tuple(shape), spacing, out)
    return written
