# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Bad files: each raises DataError whose message names the file and the problem."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff.data import DataError, LoadVolume, LoadVolumed

from .conftest import SHAPE, make_affine, save_nifti


def _good(path: Path) -> Path:
    return save_nifti(path, np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), make_affine())


def _truncated_nii(d: Path) -> Path:
    path = _good(d / "cut.nii")
    path.write_bytes(path.read_bytes()[:-200])  # header intact, data cut
    return path


def _truncated_nii_gz(d: Path) -> Path:
    path = _good(d / "cut.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _random_bytes(d: Path) -> Path:
    path = d / "noise.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    return path


def _two_d(d: Path) -> Path:
    return save_nifti(d / "flat.nii.gz", np.ones(SHAPE[:2], np.float32), make_affine())


def _four_d(d: Path) -> Path:
    return save_nifti(d / "fmri.nii.gz", np.ones((*SHAPE, 3), np.float32), make_affine())


def _one_slice(d: Path) -> Path:
    return save_nifti(d / "slab.nii.gz", np.ones((*SHAPE[:2], 1), np.float32), make_affine())


def _with(value: float, name: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        data = np.ones(SHAPE, np.float32)
        data[1, 2, 3] = data[0, 0, 0] = value
        return save_nifti(d / name, data, make_affine())

    return make


def _npy_2d(d: Path) -> Path:
    np.save(d / "slice.npy", np.ones(SHAPE[:2], np.float32))
    return d / "slice.npy"


def _npy_pickle(d: Path) -> Path:
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return d / "objects.npy"


def _unsupported(d: Path) -> Path:
    (d / "photo.png").write_bytes(b"\x89PNG")
    return d / "photo.png"


CASES = {
    "truncated .nii": (_truncated_nii, r"cannot be read \(truncated or corrupt\?\)"),
    "truncated .nii.gz": (_truncated_nii_gz, r"cannot be read \(truncated or corrupt\?\)"),
    "random bytes .nii.gz": (_random_bytes, r"cannot be read \(truncated or corrupt\?\)"),
    "2D NIfTI": (_two_d, r"is not a 3D volume \(shape \(6, 5\)\)"),
    "4D NIfTI": (_four_d, r"is not a 3D volume \(shape \(6, 5, 4, 3\)\)"),
    "one slice": (_one_slice, r"is not a 3D volume \(shape \(6, 5, 1\)\)"),
    "NaN": (_with(np.nan, "nan.nii.gz"), r"contains 2 NaN/Inf voxels \(2 NaN, 0 Inf\)"),
    "Inf": (_with(-np.inf, "inf.nii"), r"contains 2 NaN/Inf voxels \(0 NaN, 2 Inf\)"),
    "2D npy": (_npy_2d, r"is not a 3D volume"),
    "pickled npy": (_npy_pickle, r"cannot be read"),
    "unsupported": (_unsupported, r"unsupported file type"),
    "missing": (lambda d: d / "gone.nii.gz", r"does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_raises_data_error_naming_it(tmp_path: Path, case: str) -> None:
    make, problem = CASES[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        LoadVolume()(path)
    assert str(err.value).startswith(f"{path}: ")
    assert err.value.path == str(path)
    assert re.search(problem, err.value.problem), err.value.problem
    # the dict transform raises the same error
    with pytest.raises(DataError, match=re.escape(path.name)):
        LoadVolumed(keys="image")({"image": str(path)})


def test_nibabel_reads_the_good_file(tmp_path: Path) -> None:
    # sanity check of the fixtures: the untouched file is fine
    path = _good(tmp_path / "ok.nii.gz")
    assert nib.load(path).shape == SHAPE
    assert tuple(LoadVolume()(path).shape) == (1, *SHAPE)
