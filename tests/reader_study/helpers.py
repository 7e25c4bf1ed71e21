# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Small real NIfTI volumes for reader-study tests: 'real' smooth ellipsoids, 'synthetic' noisier ones."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["make_folders", "write_volume"]

SHAPE = (32, 32, 16)


def write_volume(path: Path, data: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 2.5)) -> Path:
    """Write ``data`` as NIfTI with an RAS affine of the given voxel size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


def _phantom(rng: np.random.Generator, shape: tuple[int, int, int], ct: bool, noise: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radii = rng.uniform(0.6, 0.85, 3)[:, None, None, None]
    inside = ((grid / radii) ** 2).sum(0) < 1
    if ct:
        vol = np.where(inside, 40.0, -1000.0) + rng.normal(0, noise * 100, shape)
    else:
        vol = np.where(inside, 600.0, 0.0) + np.abs(rng.normal(0, noise * 100, shape))
    return vol


def make_folders(root: Path, n_real: int = 4, n_syn: int = 4, ct: bool = False, seed: int = 0,
                 shape: tuple[int, int, int] = SHAPE) -> tuple[Path, Path]:
    """Write ``root/real/*.nii.gz`` and ``root/synthetic/*.nii.gz``; returns the two folders."""
    rng = np.random.default_rng(seed)
    for i in range(n_real):
        write_volume(root / "real" / f"patient_{i:02d}.nii.gz", _phantom(rng, shape, ct, 0.1))
    for i in range(n_syn):
        write_volume(root / "synthetic" / f"sample_{i:02d}.nii.gz", _phantom(rng, shape, ct, 0.4))
    return root / "real", root / "synthetic"
