# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""DICOM series: write_dicom_series -> LoadVolume / pydicom / ITK round trips and header checks."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
import torch
from monai.data import PydicomReader
from monai.transforms import LoadImage
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from meddiff.data import DataError, LoadVolume, dicom_series_info, inspect_dicom_series, write_dicom_series

from .conftest import SHAPE, assert_same_world, ct_volume, make_affine

SLOPE, INTERCEPT = 2.0, -1024.0


def _pydicom_volume(files: list[Path]) -> np.ndarray:
    """(X, Y, Z) real values straight from pydicom, slices in the given order."""
    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        slices.append(ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(slices, axis=-1)


def _itk_geometry(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    image = itk.imread(str(folder))
    return (
        itk.array_from_image(image).T.astype(np.float64),  # (X, Y, Z)
        np.asarray(image.GetOrigin()),
        np.asarray(image.GetSpacing()),
        itk.array_from_matrix(image.GetDirection()),
    )


def test_ct_round_trip_loadvolume_pydicom_itk(tmp_path: Path, rng: np.random.Generator) -> None:
    vol, affine = ct_volume(rng), make_affine()
    files = write_dicom_series(
        vol, affine, tmp_path / "ct", modality="CT", rescale_slope=SLOPE, rescale_intercept=INTERCEPT
    )
    assert len(files) == SHAPE[2] and all(f.parent == tmp_path / "ct" for f in files)

    # LoadVolume: same array (within rescale precision) and affine
    img = LoadVolume()(tmp_path / "ct")
    assert tuple(img.shape) == (1, *SHAPE) and img.dtype == torch.float32
    np.testing.assert_allclose(img[0].numpy(), vol, atol=SLOPE / 2)
    np.testing.assert_allclose(img.affine.numpy(), affine, atol=1e-5)
    assert img.meta["modality"] == "CT"

    # pydicom, straight from the files
    assert inspect_dicom_series(tmp_path / "ct") == files
    np.testing.assert_allclose(_pydicom_volume(files), img[0].numpy(), atol=1e-3)

    # ITK: origin = first slice (LPS), spacing, direction
    data, origin, spacing, direction = _itk_geometry(tmp_path / "ct")
    np.testing.assert_allclose(data, img[0].numpy(), atol=1e-3)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    np.testing.assert_allclose(origin, lps[:3, 3], atol=1e-5)
    np.testing.assert_allclose(spacing, [0.8, 0.7, 2.5], atol=1e-6)
    np.testing.assert_allclose(direction, lps[:3, :3] / spacing, atol=1e-6)

    # MONAI's PydicomReader agrees too
    ref = LoadImage(reader=PydicomReader(), image_only=True)(str(tmp_path / "ct"))
    np.testing.assert_allclose(ref.numpy(), img[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(ref.affine.numpy(), img.affine.numpy(), atol=1e-5)


def test_written_headers(tmp_path: Path, rng: np.random.Generator) -> None:
    files = write_dicom_series(
        ct_volume(rng),
        make_affine(),
        tmp_path / "mr",
        series_description="T1 synthetic",
        extra={"MagneticFieldStrength": 3},
    )
    headers = [pydicom.dcmread(f) for f in files]
    first = headers[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == first.file_meta.MediaStorageSOPClassUID == MRImageStorage
    assert first.Modality == "MR" and first.SeriesDescription == "T1 synthetic"
    assert str(first.PatientName) == "SYNTHETIC^MEDDIFF" and first.PatientID == "SYNTHETIC"
    assert list(first.ImageType) == ["DERIVED", "SECONDARY"] and float(first.MagneticFieldStrength) == 3
    assert (first.Rows, first.Columns) == (SHAPE[1], SHAPE[0])
    assert [float(v) for v in first.PixelSpacing] == [0.7, 0.8]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 2.5
    assert [h.InstanceNumber for h in headers] == list(range(1, SHAPE[2] + 1))
    assert len({h.SOPInstanceUID for h in headers}) == SHAPE[2]
    assert len({h.SeriesInstanceUID for h in headers}) == len({h.StudyInstanceUID for h in headers}) == 1
    assert [float(h.ImagePositionPatient[2]) for h in headers] == pytest.approx([7.75 + 2.5 * k for k in range(4)])

    ct = write_dicom_series(ct_volume(rng), make_affine(), tmp_path / "ct", modality="CT")
    assert pydicom.dcmread(ct[0]).SOPClassUID == CTImageStorage
    info = dicom_series_info(tmp_path / "ct")
    assert info.modality == "CT" and info.shape == SHAPE and info.spacing == pytest.approx((0.8, 0.7, 2.5))


def test_oblique_series_with_slices_against_the_normal(tmp_path: Path, rng: np.random.Generator) -> None:
    # rotated axes, and the slice axis pointing against row x column: readers re-sort the slices
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q[:, 2] = -np.cross(q[:, 0], q[:, 1])
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag([0.9, 1.2, 3.0])
    affine[:3, 3] = [-30.0, 15.5, 100.0]
    vol = rng.integers(0, 4000, size=SHAPE).astype(np.float32)
    write_dicom_series(vol, affine, tmp_path / "obl", modality="MR")

    img = LoadVolume()(tmp_path / "obl")
    assert tuple(img.shape) == (1, *SHAPE)
    assert_same_world(vol, affine, img[0].numpy(), img.affine.numpy(), atol=1e-3)
    np.testing.assert_allclose(img[0].numpy(), vol[:, :, ::-1], atol=1e-3)  # re-sorted along the normal
    data, origin, spacing, direction = _itk_geometry(tmp_path / "obl")
    itk_affine = np.eye(4)
    itk_affine[:3, :3] = direction @ np.diag(spacing)
    itk_affine[:3, 3] = origin
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ itk_affine, img.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(data, img[0].numpy(), atol=1e-3)


def test_shuffled_files_read_in_position_order(tmp_path: Path, rng: np.random.Generator) -> None:
    vol, affine = ct_volume(rng, shape=(6, 5, 7)), make_affine()
    written = write_dicom_series(
        vol, affine, tmp_path / "src", modality="CT", rescale_slope=SLOPE, rescale_intercept=INTERCEPT
    )
    # random file names and scrambled InstanceNumbers: only the positions give the order
    folder = tmp_path / "shuffled"
    folder.mkdir()
    names = [f"{n:08x}" for n in random.Random(3).sample(range(16**8), len(written))]
    numbers = random.Random(4).sample(range(1, len(written) + 1), len(written))
    for src, name, number in zip(written, names, numbers):
        ds = pydicom.dcmread(src)
        ds.InstanceNumber = number
        ds.save_as(folder / name)
    assert sorted(p.name for p in folder.iterdir()) != names  # file name order is not slice order

    ordered = inspect_dicom_series(folder)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in ordered]
    assert z == sorted(z) and len(z) == 7
    img = LoadVolume()(folder)
    np.testing.assert_allclose(img[0].numpy(), vol, atol=SLOPE / 2)
    np.testing.assert_allclose(img.affine.numpy(), affine, atol=1e-5)


def test_junk_beside_series_is_ignored(tmp_path: Path, rng: np.random.Generator) -> None:
    files = write_dicom_series(ct_volume(rng), make_affine(), tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("scanner notes")
    (tmp_path / "s" / "meta.json").write_text("{}")
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\0\1\2")
    (tmp_path / "s" / "DICOMDIR").write_bytes(b"not really")
    assert inspect_dicom_series(tmp_path / "s") == files
    assert tuple(LoadVolume()(tmp_path / "s").shape) == (1, *SHAPE)


def test_writer_is_atomic_and_refuses_overwrite(tmp_path: Path, rng: np.random.Generator, caplog) -> None:
    vol = ct_volume(rng)
    (tmp_path / "empty").mkdir()
    write_dicom_series(vol, make_affine(), tmp_path / "empty")  # an empty folder may be filled
    with pytest.raises(DataError, match=r"empty: cannot write DICOM series: destination exists"):
        write_dicom_series(vol, make_affine(), tmp_path / "empty")
    with pytest.raises(DataError, match="unknown DICOM keywords"):
        write_dicom_series(vol, make_affine(), tmp_path / "x", extra={"NotAKeyword": 1})
    with pytest.raises(DataError, match="must be 3D"):
        write_dicom_series(vol[..., 0], make_affine(), tmp_path / "x")
    sheared = make_affine()
    sheared[0, 2] = 1.0
    with pytest.raises(DataError, match="not normal to the slice plane"):
        write_dicom_series(vol, sheared, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temp folders left behind

    with caplog.at_level(logging.WARNING, logger="meddiff.data.dicom_writer"):
        write_dicom_series(np.full(SHAPE, 1e6, dtype=np.float32), make_affine(), tmp_path / "clip")
    assert "clipped" in caplog.text


@pytest.fixture
def series(tmp_path: Path, rng: np.random.Generator) -> Path:
    write_dicom_series(ct_volume(rng, shape=(6, 5, 5)), make_affine(), tmp_path / "series", modality="CT")
    return tmp_path / "series"


def _slices(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def test_truncated_dicom_file(series: Path) -> None:
    victim = _slices(series)[2]
    victim.write_bytes(victim.read_bytes()[:-21])
    with pytest.raises(DataError, match=rf"{victim.name}: cannot be read \(truncated or corrupt\?\).*PixelData"):
        LoadVolume()(series)
    victim.write_bytes(victim.read_bytes()[:100])  # cut inside the preamble
    with pytest.raises(DataError, match=rf"{victim.name}: cannot be read \(truncated or corrupt\?\)"):
        inspect_dicom_series(series)


def test_two_series_in_one_folder(series: Path, rng: np.random.Generator, tmp_path: Path) -> None:
    other = write_dicom_series(ct_volume(rng), make_affine(), tmp_path / "other", series_description="T2 axial")
    for f in other:
        shutil.copy(f, series / f"mr_{f.name}")
    with pytest.raises(DataError) as err:
        LoadVolume()(series)
    msg = str(err.value)
    assert msg.startswith(f"{series}: contains 2 DICOM series")
    uids = {pydicom.dcmread(f).SeriesInstanceUID for f in (_slices(series)[0], other[0])}
    assert all(uid in msg for uid in uids) and "T2 axial" in msg and "(CT," in msg and "(MR," in msg


def test_duplicated_slice_position(series: Path) -> None:
    ds = pydicom.dcmread(_slices(series)[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(series / "copy.dcm")
    with pytest.raises(DataError, match=rf"{series.name}: duplicated slice position 10.25 mm") as err:
        LoadVolume()(series)
    assert "slice_0002.dcm" in str(err.value) and "copy.dcm" in str(err.value)


def test_missing_slice_gap(series: Path) -> None:
    _slices(series)[2].unlink()
    with pytest.raises(DataError, match=rf"{series.name}: inconsistent slice spacing: 5 mm .*missing slice"):
        LoadVolume()(series)


def test_single_slice_and_empty_and_missing_folders(series: Path, tmp_path: Path) -> None:
    for f in _slices(series)[1:]:
        f.unlink()
    with pytest.raises(DataError, match=rf"{series.name}: has only 1 slice .*not a 3D volume"):
        LoadVolume()(series)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: contains no DICOM files"):
        LoadVolume()(tmp_path / "empty")
    with pytest.raises(DataError, match=r"nowhere: folder does not exist"):
        inspect_dicom_series(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "IM0001").write_bytes(np.random.default_rng(1).bytes(600))
    with pytest.raises(DataError, match=r"IM0001: cannot be read"):
        LoadVolume()(tmp_path / "junk")
    with pytest.raises(DataError, match="single DICOM file"):
        LoadVolume()(_slices(series)[0])
