# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Write a 3D volume as a single-frame DICOM series (one file per slice), atomically.

Geometry: ``volume`` is indexed ``(X, Y, Z)`` like a MONAI/nibabel array and ``affine`` maps voxel
indices to RAS world coordinates (MONAI's convention). Each slice ``volume[:, :, k]`` becomes one file
whose pixel rows run along the array's second axis and columns along the first, so MONAI's ITKReader
(and ``PydicomReader`` with its default ``swap_ij``) read the array and affine back unchanged.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from ..utils.atomic import default_mode
from .errors import DataError

__all__ = ["write_dicom_series", "SOP_CLASS_UIDS"]

logger = logging.getLogger(__name__)

#: modality -> SOP class of the written instances
SOP_CLASS_UIDS: dict[str, str] = {"MR": MRImageStorage, "CT": CTImageStorage}

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SUPPORTED_DTYPES = (np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.uint8))


def _ds(values: Sequence[float] | np.ndarray) -> list[str]:
    """Format numbers as DICOM decimal strings (at most 16 characters each)."""
    return [format_number_as_ds(float(v) + 0.0) for v in values]  # + 0.0 turns -0.0 into 0.0


def _geometry(affine: np.ndarray, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split a RAS affine into LPS direction cosines, spacing and the LPS affine.

    Returns:
        ``(lps_affine, spacing, row_cosine, col_cosine)`` where ``spacing`` is ``(sx, sy, sz)``.

    Raises:
        DataError: the affine is not a finite 4x4 matrix with orthogonal axes.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(folder, f"cannot write DICOM: affine must be a finite 4x4 matrix, got {affine.tolist()}")
    lps = _RAS_TO_LPS @ affine
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise DataError(folder, f"cannot write DICOM: affine has a zero-length axis (spacing {spacing.tolist()})")
    unit = axes / spacing
    row_cos, col_cos, slice_dir = unit[:, 0], unit[:, 1], unit[:, 2]
    if abs(row_cos @ col_cos) > 1e-4:
        raise DataError(folder, "cannot write DICOM: the in-plane axes of the affine are not orthogonal")
    # DICOM slice stacks need slices stacked along the plane normal (no gantry tilt / shear)
    if abs(abs(np.cross(row_cos, col_cos) @ slice_dir) - 1.0) > 1e-4:
        raise DataError(folder, "cannot write DICOM: the slice axis of the affine is not normal to the slice plane")
    return lps, spacing, row_cos, col_cos


def _to_stored(
    volume: np.ndarray, slope: float, intercept: float, dtype: np.dtype, folder: Path
) -> tuple[np.ndarray, int]:
    """Convert real values to stored pixel values ``round((v - intercept) / slope)``, clipped to ``dtype``.

    Returns:
        The stored array and the number of clipped voxels.
    """
    stored = np.rint((volume.astype(np.float64) - intercept) / slope)
    info = np.iinfo(dtype)
    n_clipped = int(np.count_nonzero((stored < info.min) | (stored > info.max)))
    if n_clipped:
        logger.warning(
            "%s: %d voxels clipped to the %s range [%d, %d] (slope %g, intercept %g)",
            folder,
            n_clipped,
            dtype.name,
            info.min,
            info.max,
            slope,
            intercept,
        )
    return np.clip(stored, info.min, info.max).astype(dtype), n_clipped


def _check_destination(folder: Path) -> None:
    """Refuse to overwrite anything but a missing or empty folder."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(folder, "cannot write DICOM series: destination exists and is not an empty folder")


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    *,
    modality: str = "MR",
    series_description: str = "",
    patient_name: str = "SYNTHETIC^MEDDIFF",
    patient_id: str = "SYNTHETIC",
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    dtype: np.dtype | type | str = np.int16,
    image_type: Sequence[str] = ("DERIVED", "SECONDARY"),
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``volume`` as a DICOM series, one explicit-VR little-endian file per slice.

    Stored values are ``round((volume - rescale_intercept) / rescale_slope)`` clipped to ``dtype`` (a
    warning is logged when clipping happens); readers that apply RescaleSlope/RescaleIntercept get
    ``volume`` back within ``rescale_slope / 2``. The files go to a hidden temporary sibling folder that
    is renamed onto ``folder`` at the end, so a crash never leaves a partial series.

    Args:
        volume: real-valued array ``(X, Y, Z)``; slice ``k`` is ``volume[:, :, k]``.
        affine: 4x4 voxel-to-world matrix in MONAI's RAS convention (e.g. ``MetaTensor.affine``).
        folder: destination folder; must not exist or be empty.
        modality: ``"MR"`` (MR Image Storage) or ``"CT"`` (CT Image Storage).
        series_description: SeriesDescription.
        patient_name: PatientName.
        patient_id: PatientID.
        rescale_slope: RescaleSlope (> 0).
        rescale_intercept: RescaleIntercept.
        dtype: stored integer type, one of int16, uint16, uint8.
        image_type: ImageType values.
        extra: further attributes by DICOM keyword, set on every slice (e.g. ``{"KVP": "120"}``).

    Returns:
        The written files in slice order (``k = 0 .. Z-1``).

    Raises:
        DataError: bad volume/affine/arguments, or ``folder`` exists and is not empty.
    """
    folder = Path(folder)
    modality = modality.upper()
    dtype = np.dtype(dtype)
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise DataError(folder, f"cannot write DICOM: volume must be 3D (X, Y, Z), got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise DataError(folder, "cannot write DICOM: volume contains NaN or Inf voxels")
    if modality not in SOP_CLASS_UIDS:
        raise DataError(folder, f"cannot write DICOM: modality must be one of {sorted(SOP_CLASS_UIDS)}, got {modality}")
    if dtype not in _SUPPORTED_DTYPES:
        raise DataError(folder, f"cannot write DICOM: dtype must be one of {[d.name for d in _SUPPORTED_DTYPES]}")
    if not (np.isfinite(rescale_slope) and rescale_slope > 0 and np.isfinite(rescale_intercept)):
        raise DataError(folder, f"cannot write DICOM: bad rescale slope/intercept {rescale_slope}/{rescale_intercept}")
    unknown = [k for k in (extra or {}) if tag_for_keyword(k) is None]
    if unknown:
        raise DataError(folder, f"cannot write DICOM: unknown DICOM keywords in extra: {unknown}")
    lps, spacing, row_cos, col_cos = _geometry(affine, folder)
    _check_destination(folder)

    stored, _ = _to_stored(vol, float(rescale_slope), float(rescale_intercept), dtype, folder)
    normal = np.cross(row_cos, col_cos)
    n_x, n_y, n_z = vol.shape
    sop_class = SOP_CLASS_UIDS[modality]
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    real_min = float(stored.min()) * rescale_slope + rescale_intercept
    real_max = float(stored.max()) * rescale_slope + rescale_intercept
    digits = max(4, len(str(n_z)))  # zero-padded names sort in slice order
    names = [f"slice_{k + 1:0{digits}d}.dcm" for k in range(n_z)]

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for k in range(n_z):
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = FileDataset(str(tmp / names[k]), {}, file_meta=meta, preamble=b"\0" * 128)
            # patient / study / series
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.StudyInstanceUID = study_uid
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
            ds.StudyID = "1"
            ds.AccessionNumber = ""
            ds.ReferringPhysicianName = ""
            ds.Modality = modality
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 1
            ds.SeriesDescription = series_description
            ds.Manufacturer = "meddiff"
            ds.BurnedInAnnotation = "NO"
            # instance
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop_uid
            ds.ImageType = list(image_type)
            ds.InstanceNumber = k + 1
            # geometry (LPS)
            position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.ImagePositionPatient = _ds(position)
            ds.ImageOrientationPatient = _ds(np.concatenate([row_cos, col_cos]))
            ds.SliceLocation = _ds([position @ normal])[0]
            ds.PixelSpacing = _ds([spacing[1], spacing[0]])  # [between rows, between columns]
            ds.SliceThickness = _ds([spacing[2]])[0]
            ds.SpacingBetweenSlices = _ds([spacing[2]])[0]
            # pixels: rows follow the array's Y axis, columns its X axis
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = n_y, n_x
            ds.BitsAllocated = ds.BitsStored = dtype.itemsize * 8
            ds.HighBit = dtype.itemsize * 8 - 1
            ds.PixelRepresentation = 1 if dtype.kind == "i" else 0
            ds.RescaleSlope = _ds([rescale_slope])[0]
            ds.RescaleIntercept = _ds([rescale_intercept])[0]
            if modality == "CT":
                ds.RescaleType = "HU"
            ds.WindowCenter = _ds([(real_max + real_min) / 2])[0]
            ds.WindowWidth = _ds([max(real_max - real_min, 1.0)])[0]
            for keyword, value in (extra or {}).items():
                setattr(ds, keyword, value)
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype(dtype.newbyteorder("<")).tobytes()
            ds.save_as(tmp / names[k], enforce_file_format=True)
        _check_destination(folder)  # again: something may have appeared meanwhile
        if folder.exists():
            folder.rmdir()  # an empty folder; os.replace below puts the series in its place
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp's folder is owner-only
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d %s slices %s to %s", n_z, modality, vol.shape, folder)
    return [folder / name for name in names]
