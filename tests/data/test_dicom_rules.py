# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The DICOM reading rules on series shaped like clinical ones: scanner jitter, gantry tilt, per-slice rescale,
signed/unsigned pixels, MONOCHROME1, compressed transfer syntaxes, and what is still rejected."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from meddiff.data import DataError, LoadVolume, dicom_series_info, write_dicom_series

from .conftest import make_affine

# a 20-slice 2D MR series like a GE scanner's: regular 6.99 mm slices whose stored positions are off by up to
# 0.05 mm (rounded by the scanner), so neighbouring gaps vary from about 6.9 to 7.07 mm
GE_JITTER = [0.0, -0.02, 0.03, -0.04, 0.02, 0.0, -0.03, 0.05, -0.02, 0.01, 0.0, -0.05, 0.03, 0.02, -0.03, 0.04, -0.01,
             0.0, 0.03, 0.0]


def _move_slices(files: list[Path], z: list[float], lateral: list[tuple[float, float]] | None = None) -> None:
    """Rewrite ImagePositionPatient of each slice file: z (LPS, mm) and an optional in-plane (x, y) shift."""
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        x, y = (float(v) for v in ds.ImagePositionPatient[:2])
        dx, dy = lateral[k] if lateral is not None else (0.0, 0.0)
        ds.ImagePositionPatient = [f"{x + dx:.3f}", f"{y + dy:.3f}", f"{z[k]:.3f}"]
        ds.SliceLocation = f"{z[k]:.3f}"
        ds.save_as(f)


def _itk(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    image = itk.imread(str(folder))
    lps = np.eye(4)
    lps[:3, :3] = itk.array_from_matrix(image.GetDirection()) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return itk.array_from_image(image).T.astype(np.float64), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_ge_series_with_rounded_positions_is_read_like_itk(tmp_path: Path, rng, caplog) -> None:
    z = -60.0 + 6.99 * np.arange(20) + np.asarray(GE_JITTER)
    gaps = np.diff(z)
    assert np.abs(gaps / np.median(gaps) - 1).max() > 0.01  # beyond the 1 % of the median gap once required
    vol = rng.integers(0, 3000, size=(8, 6, 20)).astype(np.float32)
    files = write_dicom_series(vol, make_affine((0.9, 0.8, 7.0)), tmp_path / "ge", modality="MR")
    _move_slices(files, list(z))

    with caplog.at_level(logging.WARNING, logger="meddiff.data.readers"):
        img = LoadVolume()(tmp_path / "ge")
    info = dicom_series_info(tmp_path / "ge")
    assert info.spacing[2] == pytest.approx((z[-1] - z[0]) / 19)
    assert 0.001 * info.spacing[2] < info.max_deviation < 0.01 * info.spacing[2] and not info.resampled
    assert "uneven slice positions: largest deviation from the regular 6.99 mm grid is 0.05 mm (0.72 % of the " \
           "spacing) at slice_0008.dcm; slices used as they are (within 1 %)" in caplog.text
    np.testing.assert_array_equal(img[0].numpy(), vol)  # slices used as they are
    data, affine = _itk(tmp_path / "ge")
    np.testing.assert_allclose(img.affine.numpy(), affine, atol=1e-4)
    np.testing.assert_array_equal(img[0].numpy(), data)


def test_uneven_positions_are_interpolated_onto_the_grid(tmp_path: Path, caplog) -> None:
    z = 5.0 * np.arange(7) + np.array([0.0, 0.15, -0.1, 0.12, -0.15, 0.08, 0.0])  # up to 3 % of the spacing
    x = np.arange(6)[:, None, None]
    vol = (10.0 * z[None, None, :] + 3.0 * x + np.zeros((6, 5, 1))).astype(np.float32)  # linear in z: exact
    files = write_dicom_series(vol, make_affine((1.0, 1.0, 5.0), origin=(0.0, 0.0, 0.0)), tmp_path / "s",
                               modality="CT", rescale_slope=0.1, rescale_intercept=-1000.0)
    _move_slices(files, list(z))

    with caplog.at_level(logging.WARNING, logger="meddiff.data.readers"):
        img = LoadVolume()(tmp_path / "s")
    assert "is 0.15 mm (3.00 % of the spacing) at slice_0002.dcm; slices interpolated onto the grid" in caplog.text
    grid = 5.0 * np.arange(7)
    np.testing.assert_allclose(img[0].numpy(), 10.0 * grid[None, None, :] + 3.0 * x + np.zeros((6, 5, 1)), atol=0.051)
    _, affine = _itk(tmp_path / "s")  # ITK puts the slices on the same grid (without interpolating them)
    np.testing.assert_allclose(img.affine.numpy(), affine, atol=1e-4)


@pytest.mark.parametrize(
    "z, problem",
    [
        ([0.0, 3.0, 6.0, 10.5, 13.5, 16.5], r"4.5 mm between slice_0003.dcm and slice_0004.dcm, 1.50 x the median gap"
                                             r" 3 mm \(missing slice\?\)"),
        ([0.0, 3.0, 6.0, 7.4, 10.4, 13.4], r"1.4 mm between slice_0003.dcm and slice_0004.dcm, only 0.47 x the median"
                                            r" gap 3 mm \(an extra or overlapping slice"),
        # three slices, one missing: the median is no reference, the distance from the regular grid is
        ([0.0, 3.0, 9.0], r"slice_0002.dcm is 1.5 mm \(33 % of the 4.5 mm spacing\) off the regular grid from the "
                          r"first to the last slice \(missing slice\?\)"),
    ],
)
def test_real_gaps_are_still_rejected(tmp_path: Path, rng, z: list[float], problem: str) -> None:
    files = write_dicom_series(rng.normal(size=(6, 5, len(z))).astype(np.float32), make_affine(), tmp_path / "s")
    _move_slices(files, z)
    with pytest.raises(DataError, match=rf"s: inconsistent slice spacing: {problem}"):
        LoadVolume()(tmp_path / "s")


def test_gantry_tilt_shear_is_undone(tmp_path: Path, caplog) -> None:
    # a tilted CT: slice k is shifted by one pixel (1 mm) along the column direction per 2 mm slice step
    xx, yy = np.meshgrid(np.arange(6), np.arange(14), indexing="ij")
    anatomy = (100 * xx + 7 * yy).astype(np.float32)  # world-fixed in-plane pattern
    n = 5
    slices = [anatomy[:, np.clip(np.arange(14) + k, 0, 13)] + 1000 * k for k in range(n)]  # sampled where it sits
    files = write_dicom_series(np.stack(slices, -1), make_affine((1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)),
                               tmp_path / "tilt", modality="CT", extra={"GantryDetectorTilt": 26.57})
    _move_slices(files, [2.0 * k for k in range(n)], [(0.0, float(k)) for k in range(n)])

    with caplog.at_level(logging.WARNING, logger="meddiff.data.readers"):
        img = LoadVolume()(tmp_path / "tilt")
    assert "sheared by a 26.57 degree gantry tilt (GantryDetectorTilt 26.57)" in caplog.text
    np.testing.assert_allclose(img.affine.numpy(), make_affine((1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)), atol=1e-6)
    out = img[0].numpy()
    for k in range(n):  # every slice back on the same in-plane grid; rows shifted in from outside are filled
        np.testing.assert_allclose(out[:, k:14, k], anatomy[:, k:] + 1000 * k, atol=1e-3)
        assert np.all(out[:, :k, k] == out.min())


def test_a_slice_off_the_stack_is_rejected(tmp_path: Path, rng) -> None:
    files = write_dicom_series(rng.normal(size=(6, 5, 5)).astype(np.float32), make_affine(), tmp_path / "s")
    _move_slices(files, [7.75 + 2.5 * k for k in range(5)], [(0.0, 0.0)] * 2 + [(3.0, 0.0)] + [(0.0, 0.0)] * 2)
    with pytest.raises(DataError, match=r"s: slices do not form one stack: slice_0003.dcm is shifted in-plane"):
        LoadVolume()(tmp_path / "s")


def test_per_slice_rescale_signed_unsigned_and_monochrome1(tmp_path: Path, rng) -> None:
    hu = rng.integers(-1024, 2000, size=(6, 5, 4)).astype(np.float32)
    signed = write_dicom_series(hu, make_affine(), tmp_path / "int16", modality="CT", dtype=np.int16)
    write_dicom_series(hu, make_affine(), tmp_path / "uint16", modality="CT", dtype=np.uint16,
                       rescale_intercept=-1024.0)
    assert pydicom.dcmread(signed[0]).PixelRepresentation == 1
    assert pydicom.dcmread(tmp_path / "uint16" / signed[0].name).PixelRepresentation == 0
    np.testing.assert_array_equal(LoadVolume()(tmp_path / "int16")[0].numpy(), hu)
    np.testing.assert_array_equal(LoadVolume()(tmp_path / "uint16")[0].numpy(), hu)

    # each slice its own slope and intercept (stored values kept): real values follow per slice
    stored = np.stack([pydicom.dcmread(f).pixel_array.T for f in signed], -1).astype(np.float64)
    for k, f in enumerate(signed):
        ds = pydicom.dcmread(f)
        ds.RescaleSlope, ds.RescaleIntercept = f"{0.5 * (k + 1)}", f"{-100 * k}"
        ds.save_as(f)
    want = stored * (0.5 * (np.arange(4) + 1)) - 100 * np.arange(4)
    np.testing.assert_allclose(LoadVolume()(tmp_path / "int16")[0].numpy(), want, atol=1e-3)

    # MONOCHROME1: higher stored values are darker; read inverted so that higher is brighter
    for f in sorted((tmp_path / "uint16").iterdir()):
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(f)
    np.testing.assert_allclose(LoadVolume()(tmp_path / "uint16")[0].numpy(), (65535 - (hu + 1024)) - 1024)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
def test_compressed_series_reads_like_the_uncompressed_one(tmp_path: Path, rng, syntax) -> None:
    hu = rng.integers(-1024, 2000, size=(40, 36, 4)).astype(np.float32)  # JPEG 2000 needs 32+ pixels a side
    files = write_dicom_series(hu, make_affine(), tmp_path / "raw", modality="CT")
    (tmp_path / "packed").mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax)
        ds.save_as(tmp_path / "packed" / f.name)
    assert pydicom.dcmread(tmp_path / "packed" / files[0].name).file_meta.TransferSyntaxUID == syntax
    img = LoadVolume()(tmp_path / "packed")
    np.testing.assert_array_equal(img[0].numpy(), hu)
    np.testing.assert_array_equal(img.affine.numpy(), LoadVolume()(tmp_path / "raw").affine.numpy())


def test_colour_image_is_rejected(tmp_path: Path) -> None:
    path = get_testdata_file("SC_rgb_small_odd.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's SC_rgb_small_odd.dcm is not installed")
    (tmp_path / "rgb").mkdir()
    shutil.copy(path, tmp_path / "rgb" / "IM1")
    with pytest.raises(DataError, match=r"IM1: is a colour image \(RGB, SamplesPerPixel 3\)"):
        LoadVolume()(tmp_path / "rgb")


def test_files_without_preamble_or_file_meta(tmp_path: Path, rng) -> None:
    hu = rng.integers(-1024, 2000, size=(6, 5, 4)).astype(np.float32)
    files = write_dicom_series(hu, make_affine(), tmp_path / "s", modality="CT", rescale_intercept=-1024.0)
    for f in files:  # bare implicit-VR datasets, as old archives hold them
        bare = pydicom.Dataset()
        bare.update(pydicom.dcmread(f))
        pydicom.dcmwrite(f, bare, implicit_vr=True, little_endian=True)
    assert not pydicom.dcmread(files[0], force=True).file_meta.get("TransferSyntaxUID")
    np.testing.assert_array_equal(LoadVolume()(tmp_path / "s")[0].numpy(), hu)
