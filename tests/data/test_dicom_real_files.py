# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Real DICOM files from pydicom's test data (and the pydicom-data package): decoding and geometry.

Compressed files are checked voxel for voxel against their uncompressed twins, volumes against ITK. Files
are only used when they are on disk (``download=False``): nothing is fetched at test time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import MPEG2MPML

from meddiff.data import (
    DataError,
    LoadVolume,
    dicom_pixels,
    dicom_series_info,
    select_ct_series,
    summarize_dicom_folder,
)

from .conftest import assert_same_world


def _testfile(name: str) -> Path:
    """A pydicom test file that is on disk, else skip (pydicom-data holds the larger ones)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data; nothing is downloaded at test time)")
    return Path(path)


def _testdir(*parts: str) -> Path:
    folder = _testfile("CT_small.dcm").parent.joinpath(*parts)
    if not folder.is_dir():
        pytest.skip(f"pydicom's test folder {folder} is not installed")
    return folder


def _pydicom_values(path: Path) -> np.ndarray:
    """(frames, X, Y) real values straight from pydicom (stored values x RescaleSlope + RescaleIntercept)."""
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.reshape(int(ds.get("NumberOfFrames", 1) or 1), ds.Rows, ds.Columns)
    return np.swapaxes(stored * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0)), 1, 2)


def _itk_affine(image) -> np.ndarray:
    """RAS affine of an ITK image (as MONAI's ITKReader builds it)."""
    lps = np.eye(4)
    lps[:3, :3] = itk.array_from_matrix(image.GetDirection()) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# (compressed file, its uncompressed twin): the twin was made by decoding the compressed file
TWINS = [
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE, signed 16-bit MR
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
    ("693_J2KR.dcm", "693_UNCR.dcm"),  # CT, signed, BitsStored 14, JPEG 2000 lossless
    ("693_J2KI.dcm", "693_UNCI.dcm"),  # CT, JPEG 2000 lossy
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # MR, unsigned 12-bit, RescaleSlope 3.77
    ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),  # NM, JPEG 2000 lossy
    ("emri_small_RLE.dcm", "emri_small.dcm"),  # Enhanced MR, 10 frames, RLE
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # Enhanced MR, JPEG 2000 lossless
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),  # Enhanced MR, JPEG-LS lossless
]


@pytest.mark.parametrize("compressed, uncompressed", TWINS)
def test_compressed_file_decodes_to_its_uncompressed_twin(compressed: str, uncompressed: str) -> None:
    got = dicom_pixels(_testfile(compressed))
    want = _pydicom_values(_testfile(uncompressed))
    assert pydicom.dcmread(_testfile(compressed)).file_meta.TransferSyntaxUID.is_compressed
    assert got.shape == want.shape and got.dtype == np.float32
    assert float(np.ptp(want)) > 100  # a real image, not a blank
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize(
    "name, syntax",
    [
        ("JPEG-LL.dcm", "1.2.840.10008.1.2.4.70"),  # JPEG lossless, process 14
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", "1.2.840.10008.1.2.4.70"),
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),  # JPEG extended 12-bit (baseline's decoder)
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),  # deflated
    ],
)
def test_other_transfer_syntaxes_decode_like_pydicom(name: str, syntax: str) -> None:
    path = _testfile(name)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    got = dicom_pixels(path)
    np.testing.assert_array_equal(got, _pydicom_values(path).astype(np.float32))
    assert float(np.ptp(got)) > 0


def test_monochrome1_is_inverted_within_the_stored_range() -> None:
    path = _testfile("RG1_UNCR.dcm")  # computed radiography, MONOCHROME1, unsigned, BitsStored 15
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.PixelRepresentation == 0
    got = dicom_pixels(path)[0]
    np.testing.assert_array_equal(got, (2**ds.BitsStored - 1) - ds.pixel_array.T.astype(np.float32))
    np.testing.assert_array_equal(got, dicom_pixels(_testfile("RG1_J2KR.dcm"))[0])  # its JPEG 2000 twin


def test_real_ct_series_matches_itk() -> None:
    folder = _testdir("dicomdirtests", "98892001", "CT5N")  # 5 real CT headers (pixels downsampled to 16x16)
    img = LoadVolume()(folder)
    itk_image = itk.imread(str(folder))
    assert tuple(img.shape) == (1, 16, 16, 5) and img.meta["modality"] == "CT"
    np.testing.assert_allclose(img.affine.numpy(), _itk_affine(itk_image), atol=1e-4)
    np.testing.assert_array_equal(img[0].numpy(), itk.array_from_image(itk_image).T)


def test_enhanced_ct_multiframe_file_matches_itk(tmp_path: Path) -> None:
    path = _testfile("eCT_Supplemental.dcm")  # Enhanced CT Image Storage, 2 frames, positions per frame
    info = dicom_series_info(path)
    assert info.shape == (512, 512, 2) and info.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    assert [s.frame for s in info.slices] == [1, 0]  # frame 2 lies first along the slice normal
    img = LoadVolume()(path)
    assert img.meta["modality"] == "CT"
    assert float(img.min()) == -1024.0  # shared RescaleIntercept applied
    itk_image = itk.imread(str(path))
    assert_same_world(
        itk.array_from_image(itk_image).T, _itk_affine(itk_image), img[0].numpy(), img.affine.numpy(), atol=0
    )
    # the folder holding it reads the same
    (tmp_path / "ect").mkdir()
    shutil.copy(path, tmp_path / "ect" / "IM0001")
    np.testing.assert_array_equal(LoadVolume()(tmp_path / "ect").numpy(), img.numpy())


def _add_frame_geometry(ds: Dataset, spacing_z: float, slopes: list[float]) -> None:
    """Give a stripped Enhanced MR file the functional groups a scanner writes (positions, orientation, rescale)."""
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    measures.PixelSpacing = [0.9, 0.8]
    measures.SliceThickness = spacing_z
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(int(ds.NumberOfFrames)):
        frame, position, rescale = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [10.0 + spacing_z * k, -20.0, 30.0]  # +x: against the normal (-x)
        rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = slopes[k], -5.0, "US"
        frame.PlanePositionSequence = Sequence([position])
        frame.PixelValueTransformationSequence = Sequence([rescale])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
                                  "emri_small_jpeg_ls_lossless.dcm"])
def test_enhanced_mr_multiframe_volume(name: str, tmp_path: Path) -> None:
    source = _testfile(name)
    with pytest.raises(DataError, match=rf"{name}: is a multi-frame DICOM \(10 frames\) without per-frame positions"):
        LoadVolume()(source)  # pydicom's copy has its functional groups stripped

    ds = pydicom.dcmread(source)
    slopes = [1.0 + 0.25 * k for k in range(10)]
    _add_frame_geometry(ds, 1.5, slopes)
    ds.save_as(tmp_path / name)  # header only: the (compressed) pixel data is the real one
    img = LoadVolume()(tmp_path / name)

    raw = _pydicom_values(_testfile("emri_small.dcm"))  # (frames, X, Y)
    want = np.stack([raw[k] * slopes[k] - 5.0 for k in range(10)], axis=-1)[..., ::-1]  # re-sorted along -x
    np.testing.assert_allclose(img[0].numpy(), want, rtol=1e-6)
    itk_image = itk.imread(str(tmp_path / name))
    itk_affine = _itk_affine(itk_image)
    # ITK applies the first frame's rescale (slope 1) to every frame; the geometry must agree
    np.testing.assert_allclose(np.abs(np.linalg.det(itk_affine[:3, :3])), 0.8 * 0.9 * 1.5, rtol=1e-5)
    assert_same_world(
        np.stack([raw[k] - 5.0 for k in range(10)], axis=-1)[..., ::-1], img.affine.numpy(),
        itk.array_from_image(itk_image).T.astype(np.float64), itk_affine, atol=0,
    )


def test_real_broken_series_are_rejected_naming_the_files() -> None:
    with pytest.raises(DataError, match=r"CT2: inconsistent slice spacing: 202.5 mm between 17106 and 17136, "
                                        r"162.00 x the median gap 1.25 mm \(missing slice\?\)"):
        LoadVolume()(_testdir("dicomdirtests", "77654033", "CT2"))
    with pytest.raises(DataError, match=r"CT2N: slices have different ImageOrientationPatient \(6293, 6924\)"):
        LoadVolume()(_testdir("dicomdirtests", "98892001", "CT2N"))
    with pytest.raises(DataError, match=r"MR2: contains 3 DICOM series"):
        LoadVolume()(_testdir("dicomdirtests", "98892003", "MR2"))


def test_unsupported_transfer_syntax_is_named(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testfile("MR_small.dcm"))
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    (tmp_path / "s").mkdir()
    ds.save_as(tmp_path / "s" / "IM1")
    with pytest.raises(DataError, match=r"IM1: pixel data is compressed as MPEG2 Main Profile / Main Level "
                                        r"\(1.2.840.10008.1.2.4.100\), which is not supported"):
        LoadVolume()(tmp_path / "s")
    with pytest.raises(DataError, match="MPEG2 Main Profile"):
        dicom_pixels(tmp_path / "s" / "IM1")


def test_enhanced_ct_file_is_a_ct_series_candidate(tmp_path: Path) -> None:
    series = tmp_path / "LIDC-0001" / "study" / "enhanced"
    series.mkdir(parents=True)
    shutil.copy(_testfile("eCT_Supplemental.dcm"), series / "IM0001")
    summary = summarize_dicom_folder(series, min_slices=2)
    assert (summary.modality, summary.num_files, summary.num_slices, summary.reason) == ("CT", 1, 2, None)
    assert summary.slice_thickness == 10.0  # from the shared PixelMeasuresSequence
    assert summarize_dicom_folder(series).reason == "only 2 slices (fewer than min_slices=16)"
    assert select_ct_series(tmp_path / "LIDC-0001", min_slices=2, check=True) == series
