# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""LoadVolume / LoadVolumed / NpyStackReader on real NIfTI and .npy files."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, NibabelReader, list_data_collate
from monai.transforms import Compose, EnsureChannelFirst, LoadImage

from meddiff.data import DataError, LoadVolume, LoadVolumed, NpyStackReader, find_user_error, verify_datalist
from meddiff.transforms import MaskAugmentation

from .conftest import SHAPE, make_affine, save_nifti


def test_data_error_message_and_pickle(tmp_path: Path) -> None:
    err = DataError(tmp_path / "x.nii.gz", "contains NaN or Inf voxels")
    assert isinstance(err, ValueError)
    assert str(err) == f"{tmp_path / 'x.nii.gz'}: contains NaN or Inf voxels"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == err.path


def _wrapped(error: BaseException) -> RuntimeError:
    """``error`` inside a wrapper, as MONAI's config resolver raises it (``RuntimeError(...) from error``)."""
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("Failed to instantiate component") from inner
    except RuntimeError as outer:
        return outer


def test_user_error_is_the_data_error_or_meddiffs_own_error_behind_a_wrapper(tmp_path: Path) -> None:
    data_error = DataError(tmp_path / "x.nii.gz", "not a volume")
    assert find_user_error(_wrapped(data_error)) is data_error
    try:
        MaskAugmentation("rigid")  # a bad setting: meddiff raises the ValueError naming it
    except ValueError as err:
        setting_error = err
    assert find_user_error(_wrapped(setting_error)) is setting_error
    assert find_user_error(_wrapped(ValueError("raised here, not by meddiff"))) is None
    assert find_user_error(None) is None


def test_uncaught_wrapped_errors_end_the_output_with_the_cause() -> None:
    """The installed excepthook: the traceback, then the cause alone as the last line."""
    code = """
import meddiff.data
from meddiff.transforms import MaskAugmentation
try:
    MaskAugmentation("rigid")
except ValueError as err:
    raise RuntimeError("Failed to instantiate component") from err
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("ValueError: ") and "rigid" in lines[-1], lines[-3:]
    assert any(line.startswith("RuntimeError: Failed to instantiate component") for line in lines[:-1])


def test_nifti_matches_monai_and_nibabel(tmp_path: Path, rng: np.random.Generator) -> None:
    affine = make_affine()
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # plus an axis swap
    data = rng.normal(size=SHAPE).astype(np.float32)
    path = save_nifti(tmp_path / "vol.nii.gz", data, affine)

    img = LoadVolume()(path)
    ref = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True)(str(path))
    nii = nib.load(path)
    assert isinstance(img, MetaTensor) and img.dtype == torch.float32
    assert tuple(img.shape) == (1, *SHAPE)
    np.testing.assert_array_equal(img[0].numpy(), nii.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(img.numpy(), ref.numpy())
    np.testing.assert_allclose(img.affine.numpy(), nii.affine, atol=1e-6)
    np.testing.assert_allclose(img.affine.numpy(), ref.affine.numpy(), atol=1e-6)
    assert img.meta["filename_or_obj"] == str(path)
    assert str(img.meta["space"]) == "RAS"


def test_nifti_scaled_int_and_single_frame_4d(tmp_path: Path, rng: np.random.Generator) -> None:
    raw = rng.integers(0, 1000, size=SHAPE).astype(np.int16)
    nii = nib.Nifti1Image(raw, make_affine())
    nii.header.set_slope_inter(0.5, -10.0)
    nib.save(nii, tmp_path / "scaled.nii")
    img = LoadVolume()(tmp_path / "scaled.nii")
    assert img.dtype == torch.float32
    np.testing.assert_allclose(img[0].numpy(), raw * 0.5 - 10.0)

    path = save_nifti(tmp_path / "t1.nii.gz", raw[..., None].astype(np.float32), make_affine())
    assert tuple(LoadVolume()(path).shape) == (1, *SHAPE)  # (X, Y, Z, 1): one time point is fine


def test_npy_stack_reader(tmp_path: Path, rng: np.random.Generator) -> None:
    stack = rng.integers(0, 255, size=(4, 6, 5)).astype(np.uint8)  # MRNet: (slices, H, W)
    np.save(tmp_path / "knee.npy", stack)
    spacing = (0.6, 0.6, 3.0)

    img = LoadVolume(npy_spacing=spacing)(tmp_path / "knee.npy")
    assert tuple(img.shape) == (1, 6, 5, 4) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[0].numpy(), np.moveaxis(stack, 0, -1))
    np.testing.assert_allclose(img.affine.numpy(), np.diag([*spacing, 1.0]))
    np.testing.assert_allclose(img.pixdim.numpy(), spacing)

    # plain MONAI usage: LoadImage + EnsureChannelFirst; same geometry as a NIfTI with that affine
    raw = LoadImage(reader=NpyStackReader(spacing=spacing), image_only=True)(str(tmp_path / "knee.npy"))
    assert tuple(raw.shape) == (6, 5, 4)
    assert np.isnan(raw.meta["original_channel_dim"])
    np.testing.assert_array_equal(raw.meta["spatial_shape"], (6, 5, 4))
    chan = EnsureChannelFirst()(raw)
    save_nifti(tmp_path / "same.nii", np.moveaxis(stack, 0, -1), np.diag([*spacing, 1.0]))
    ref = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True)(str(tmp_path / "same.nii"))
    np.testing.assert_allclose(chan.affine.numpy(), ref.affine.numpy())
    np.testing.assert_array_equal(chan.numpy(), ref.numpy())

    # another slice axis
    np.save(tmp_path / "last.npy", np.moveaxis(stack, 0, -1))
    other = LoadImage(reader=NpyStackReader(slice_axis=2), image_only=True)(str(tmp_path / "last.npy"))
    np.testing.assert_array_equal(other.numpy(), np.moveaxis(stack, 0, -1))
    with pytest.raises(ValueError, match="spacing"):
        NpyStackReader(spacing=(1.0, 0.0, 1.0))


def test_load_volumed_compose_bundle_config_and_collate(tmp_path: Path, rng: np.random.Generator) -> None:
    save_nifti(tmp_path / "a.nii.gz", rng.normal(size=SHAPE).astype(np.float32), make_affine())
    np.save(tmp_path / "b.npy", rng.normal(size=(SHAPE[2], SHAPE[0], SHAPE[1])).astype(np.float32))
    config = {
        "transforms": {
            "_target_": "Compose",
            "transforms": [{"_target_": "meddiff.data.LoadVolumed", "keys": ["image"], "npy_spacing": [1, 1, 3]}],
        }
    }
    transforms = ConfigParser(config).get_parsed_content("transforms")
    assert isinstance(transforms, Compose)
    a = transforms({"image": str(tmp_path / "a.nii.gz"), "label": 1})
    b = transforms({"image": str(tmp_path / "b.npy"), "label": 0})
    assert a["label"] == 1 and tuple(a["image"].shape) == (1, *SHAPE)
    np.testing.assert_allclose(b["image"].affine.numpy(), np.diag([1.0, 1.0, 3.0, 1.0]))
    batch = list_data_collate([a, b])  # NIfTI and .npy meta differ, MONAI keeps the common keys
    assert tuple(batch["image"].shape) == (2, 1, *SHAPE)

    missing = LoadVolumed(keys=["image", "mask"], allow_missing_keys=True)({"image": str(tmp_path / "a.nii.gz")})
    assert "mask" not in missing
    with pytest.raises(KeyError):
        LoadVolumed(keys=["image", "mask"])({"image": str(tmp_path / "a.nii.gz")})


def test_verify_datalist(tmp_path: Path, rng: np.random.Generator) -> None:
    good = save_nifti(tmp_path / "good.nii.gz", rng.normal(size=SHAPE).astype(np.float32), make_affine())
    bad = save_nifti(tmp_path / "flat.nii.gz", rng.normal(size=SHAPE[:2]).astype(np.float32), make_affine())
    verify_datalist([{"image": str(good)}, {"image": good}])
    with pytest.raises(DataError, match=r"flat\.nii\.gz: is not a 3D volume"):
        verify_datalist([{"image": str(good)}, {"image": str(bad)}])
    with pytest.raises(DataError, match=r"gone\.nii\.gz: does not exist"):
        verify_datalist([{"image": str(tmp_path / "gone.nii.gz")}])
    with pytest.raises(DataError, match="has no 'image' entry"):
        verify_datalist([{"label": str(good)}])
    with pytest.raises(DataError, match="cannot be loaded: RuntimeError: boom"):
        verify_datalist([{"seg": str(good)}], key="seg", loader=lambda p: (_ for _ in ()).throw(RuntimeError("boom")))
