# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Shared helpers for the data tests: tiny real volumes written to ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHAPE = (6, 5, 4)  # (X, Y, Z): small but every axis distinct


def make_affine(spacing=(0.8, 0.7, 2.5), origin=(12.5, -40.25, 7.75), flip_xy: bool = True) -> np.ndarray:
    """RAS affine with anisotropic spacing, a non-zero origin and (by default) x/y flipped (= LPS identity)."""
    sign = -1.0 if flip_xy else 1.0
    affine = np.diag([sign * spacing[0], sign * spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def ct_volume(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    """Integer-valued CT-like volume in HU."""
    return rng.integers(-1024, 2000, size=shape).astype(np.float32)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def assert_same_world(a: np.ndarray, aff_a: np.ndarray, b: np.ndarray, aff_b: np.ndarray, atol: float) -> None:
    """Assert that two (X, Y, Z) arrays hold the same values at the same world points.

    Their affines may differ by an axis flip/permutation (e.g. DICOM slices re-sorted along the normal).
    """
    index_map = np.linalg.inv(aff_a) @ aff_b  # b index -> a index
    np.testing.assert_allclose(index_map, np.round(index_map), atol=1e-4)
    index_map = np.round(index_map).astype(int)
    idx_b = np.indices(b.shape).reshape(3, -1)
    idx_a = index_map[:3, :3] @ idx_b + index_map[:3, 3:]
    np.testing.assert_allclose(b[tuple(idx_b)], a[tuple(idx_a)], atol=atol)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
