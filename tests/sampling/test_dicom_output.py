# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""DicomSeriesOutput: synthetic CT series read back by pydicom, ITK and MONAI with the same geometry and values."""

from __future__ import annotations

from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
import torch
from monai.data import ITKReader, PydicomReader
from monai.transforms import LoadImage

from meddiff.data import DataError, LoadVolume
from meddiff.sampling import SYNTHETIC_STATEMENT, DicomSeriesOutput, affine_from_geometry

SHAPE = (7, 6, 5)


@pytest.fixture
def hu() -> torch.Tensor:
    """(1, X, Y, Z) integer HU values spanning the CT window."""
    rng = np.random.default_rng(0)
    return torch.as_tensor(rng.integers(-1024, 1025, size=(1, *SHAPE)).astype(np.float32))


def _oblique(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    """RAS affine rotated 20 degrees about the head-foot axis."""
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


# right-handed voxel axes (the sampler's RAS among them); DICOM readers re-sort left-handed stacks along
# the slice normal, which flips the array (tested in tests/data/test_dicom.py)
@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_write_then_read_keeps_geometry_and_values(tmp_path: Path, hu: torch.Tensor, orientation: str) -> None:
    spacing, origin = (0.7, 0.9, 2.5), (-12.5, 30.25, -80.0)
    if orientation == "oblique":
        affine = _oblique(spacing, origin)
    else:
        affine = affine_from_geometry(spacing, orientation, origin=origin)
    files = DicomSeriesOutput()(hu, affine, tmp_path / "sample_000")
    folder = tmp_path / "sample_000_dicom"
    assert [f.parent for f in files] == [folder] * SHAPE[2] and sorted(folder.iterdir()) == files
    expected = hu[0].numpy()

    # pydicom: values and consistent per-slice geometry (LPS)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    slices = [pydicom.dcmread(f) for f in files]
    stack = np.stack([ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices], -1)
    np.testing.assert_array_equal(stack, expected)
    for k, ds in enumerate(slices):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], lps[:3, :3] @ [0, 0, k] + lps[:3, 3],
                                   atol=1e-4)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                   np.concatenate([lps[:3, 0] / 0.7, lps[:3, 1] / 0.9]), atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.9, 0.7])
        assert float(ds.SliceThickness) == pytest.approx(2.5)

    # ITK: origin = first slice, spacing, direction
    image = itk.imread(str(folder))
    np.testing.assert_array_equal(itk.array_from_image(image).T, expected)
    np.testing.assert_allclose(np.asarray(image.GetOrigin()), lps[:3, 3], atol=1e-4)
    np.testing.assert_allclose(np.asarray(image.GetSpacing()), [0.7, 0.9, 2.5], atol=1e-6)
    np.testing.assert_allclose(itk.array_from_matrix(image.GetDirection()), lps[:3, :3] / [0.7, 0.9, 2.5], atol=1e-6)

    # MONAI's readers and meddiff's loader give back the array and the RAS affine
    for reader in (ITKReader(), PydicomReader()):
        loaded = LoadImage(reader=reader, image_only=True)(str(folder))
        np.testing.assert_allclose(loaded.numpy(), expected, atol=1e-3)
        np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-4)
    loaded = LoadVolume()(folder)
    np.testing.assert_allclose(loaded[0].numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-4)


def test_headers_mark_the_series_synthetic(tmp_path: Path, hu: torch.Tensor) -> None:
    affine = affine_from_geometry((1.0, 1.0, 2.0), "RAS", spatial_size=SHAPE)
    write = DicomSeriesOutput()
    first = [pydicom.dcmread(f) for f in write(hu, affine, tmp_path / "sample_000")]
    second = [pydicom.dcmread(f) for f in write(hu, affine, tmp_path / "sample_001")]
    ds = first[0]
    assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.RescaleType == "HU"
    assert list(ds.ImageType)[:1] == ["DERIVED"]
    assert "SYNTHETIC" in str(ds.PatientName) and ds.PatientID == "SYNTHETIC-sample_000"
    assert second[0].PatientID == "SYNTHETIC-sample_001"
    assert "SYNTHETIC" in ds.SeriesDescription and "NOT FOR DIAGNOSIS" in ds.SeriesDescription
    assert ds.ImageComments == SYNTHETIC_STATEMENT
    # fresh UIDs: one study/series/frame of reference per volume, one SOP instance per slice
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({getattr(d, key) for d in first}) == 1 and getattr(ds, key) != getattr(second[0], key)
    assert len({d.SOPInstanceUID for d in first + second}) == 2 * SHAPE[2]
    assert [d.InstanceNumber for d in first] == list(range(1, SHAPE[2] + 1))


def test_rerun_replaces_the_series_atomically(tmp_path: Path, hu: torch.Tensor) -> None:
    affine = affine_from_geometry((1.0, 1.0, 2.0), "RAS")
    old = DicomSeriesOutput()(hu, affine, tmp_path / "s")
    old_uid = pydicom.dcmread(old[0]).SeriesInstanceUID
    new = DicomSeriesOutput()(hu - 5, affine, tmp_path / "s")
    assert new == old and pydicom.dcmread(new[0]).SeriesInstanceUID != old_uid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_dicom"]  # no staging folders left
    with pytest.raises(DataError, match=r"s_dicom: cannot write DICOM series: destination exists"):
        DicomSeriesOutput(overwrite=False)(hu, affine, tmp_path / "s")
    with pytest.raises(DataError, match=r"bad_dicom: cannot write DICOM: volume contains NaN"):
        DicomSeriesOutput()(torch.full((1, *SHAPE), float("nan")), affine, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s_dicom"]


def test_descriptions_must_say_synthetic() -> None:
    with pytest.raises(ValueError, match="series_description must contain 'SYNTHETIC'"):
        DicomSeriesOutput(series_description="CHEST CT")
    with pytest.raises(ValueError, match="not for diagnosis"):
        DicomSeriesOutput(series_description="SYNTHETIC CHEST CT")
    with pytest.raises(ValueError, match="patient_name"):
        DicomSeriesOutput(patient_name="DOE^JOHN")
    with pytest.raises(ValueError, match="at most 64"):
        DicomSeriesOutput(series_description="SYNTHETIC - NOT FOR DIAGNOSIS " + "x" * 40)
