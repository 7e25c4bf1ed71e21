# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Pick the CT volume of each patient in LIDC-IDRI-style DICOM trees (patient / study / series folders).

A study often holds more than the CT scan: chest X-rays (CR/DX), segmentations (SEG), structured reports
(SR), scouts, or a second CT reconstruction. :func:`select_ct_series` applies one documented rule, reading
only DICOM headers (``stop_before_pixels``):

1. A series (one folder; a folder holding several image series is an error if any of them is CT) is a
   *candidate* when its Modality is ``CT``, it is CT Image Storage (single-frame slices) or Enhanced /
   Legacy Converted Enhanced CT Image Storage (one multi-frame file, each frame a slice), not a
   localizer/scout (ImageType ``LOCALIZER``), has ImagePositionPatient/ImageOrientationPatient (for
   multi-frame files, in the functional groups), is axial (slice normal within about 25 degrees of the
   patient's head-foot axis, ``|normal_z| >= 0.9``) and has at least ``min_slices`` slices.
   Non-image objects in a series folder (RTSTRUCT, SEG, RTPLAN, RTDOSE, SR, PR...; see
   :func:`~meddiff.data.readers.non_image_kind`), as in every radiotherapy planning export, are named in
   the log and never counted as a second series; a folder holding only such objects is not a candidate.
2. The candidate with the **most slices** wins; ties go to the thinner SliceThickness, then the lower
   SeriesNumber, then the folder name, so the choice is deterministic.
3. Every other series is logged (INFO) with the reason it was skipped. A patient without a candidate is a
   :class:`~meddiff.data.DataError` naming the folder and listing each series with its reason.

The chosen series is not fully checked here: :func:`~meddiff.data.dicom_series_info` (run by
:class:`~meddiff.data.LoadVolume` when a datalist is verified, or here with ``check=True``) rejects
truncated files, missing or duplicated slice positions and inconsistent spacing, naming the file
(the reading rules are in :func:`~meddiff.data.dicom_series_info`).

:func:`find_ct_volumes` is the datalist's view of a whole data folder: DICOM series are grouped into
patients by PatientID within each top-level entry of the folder, one series is selected per patient,
and NIfTI files are taken as they are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

from .datalist import find_volumes
from .errors import DataError
from .readers import (
    NIFTI_SUFFIXES,
    _candidate_files,
    _frame_value,
    _has_suffix,
    _log_objects,
    dicom_series_info,
    frame_geometry,
    is_multiframe,
    non_image_kind,
)

__all__ = ["CTSeriesSummary", "find_ct_volumes", "select_ct_series", "summarize_dicom_folder"]

logger = logging.getLogger(__name__)

#: minimum |z| of the slice normal for a series to count as axial (about 25 degrees of tilt)
AXIAL_MIN_COSINE = 0.9


@dataclass
class CTSeriesSummary:
    """Header summary of one DICOM series folder, enough to choose between series.

    Attributes:
        folder: the series folder.
        series_instance_uid: SeriesInstanceUID.
        modality: Modality (e.g. ``"CT"``, ``"CR"``, ``"SEG"``, ``"SR"``).
        num_files: number of DICOM files (instances) of the series.
        num_slices: number of slices (frames of a multi-frame file; else ``num_files``).
        patient_id: PatientID of the first file (may be empty).
        series_description: SeriesDescription (may be empty).
        series_number: SeriesNumber, or a large number when absent.
        slice_thickness: SliceThickness in mm, or ``inf`` when absent.
        reason: why the series is not a candidate, ``None`` for a candidate.
    """

    folder: Path
    series_instance_uid: str
    modality: str
    num_files: int
    patient_id: str
    series_description: str
    series_number: int
    slice_thickness: float
    reason: str | None = None
    num_slices: int = 0

    def __post_init__(self) -> None:
        self.num_slices = self.num_slices or self.num_files

    def describe(self) -> str:
        """One-line description for logs and error messages."""
        files = f"{self.num_files} file{'s' if self.num_files != 1 else ''}"
        if self.num_slices != self.num_files:
            files += f", {self.num_slices} frames"
        text = f"{self.folder} ({self.modality or '?'}, {files}"
        return text + (f", '{self.series_description}')" if self.series_description else ")")


def _read_header(path: Path) -> pydicom.Dataset:
    """Read the header of one DICOM file (no pixel data).

    Raises:
        DataError: the file is unreadable or not DICOM.
    """
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # no preamble
    except Exception as e:
        raise DataError(path, f"cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if "SOPClassUID" not in ds and "Modality" not in ds:
        raise DataError(path, "cannot be read (truncated or corrupt?): no SOPClassUID or Modality in the header")
    return ds


def _as_int(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _as_float(value: object, default: float) -> float:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return result if np.isfinite(result) else default


_ENHANCED_CT = (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)


def _num_slices(first: pydicom.Dataset, num_files: int) -> int:
    """Slices of a series: the frames of a multi-frame file, else one per file."""
    return _as_int(first.get("NumberOfFrames", 1) or 1, 1) if num_files == 1 and is_multiframe(first) else num_files


def _reason(first: pydicom.Dataset, num_files: int, min_slices: int) -> str | None:
    """Why a single-series folder is not a CT candidate (``None``: it is one). See the module docstring."""
    modality = str(first.get("Modality", "")).upper()
    if modality != "CT":
        return f"modality {modality or 'missing'}, not CT"
    frames = _as_int(first.get("NumberOfFrames", 1) or 1, 1)
    sop_class = str(first.get("SOPClassUID", ""))
    if sop_class in _ENHANCED_CT:
        if num_files != 1:
            return f"{num_files} multi-frame Enhanced CT files in one folder (expected one file per series)"
    elif is_multiframe(first) or sop_class not in ("", CTImageStorage):
        return (f"not CT Image Storage or Enhanced CT Image Storage (SOP class {first.get('SOPClassUID', '?')}, "
                f"{frames} frames)")
    image_type = first.get("ImageType") or []
    image_type = [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]
    if "LOCALIZER" in image_type:
        return "localizer/scout image (ImageType LOCALIZER)"
    try:
        _, iop, _ = frame_geometry(Path(str(first.filename or "?")), first)
    except DataError as e:
        return e.problem
    normal = np.cross(iop[:3], iop[3:])
    if abs(normal[2]) < AXIAL_MIN_COSINE:
        return f"not axial (slice normal {np.round(normal, 3).tolist()})"
    num_slices = _num_slices(first, num_files)
    if num_slices < min_slices:
        return f"only {num_slices} slices (fewer than min_slices={min_slices})"
    return None


def summarize_dicom_folder(folder: str | os.PathLike, min_slices: int = 16) -> CTSeriesSummary | None:
    """Summarise the DICOM series held directly in ``folder`` from its headers.

    Args:
        folder: a folder holding the files of one DICOM series (not recursive).
        min_slices: fewest slices for a CT candidate.

    Returns:
        The summary (``reason`` says why it is not a CT candidate, if it is not), or ``None`` when the
        folder holds no DICOM files.

    Raises:
        DataError: a file is unreadable, or the folder mixes several image series one of which is CT (non-image
            objects such as RTSTRUCT, SEG, RTPLAN, RTDOSE, SR or PR beside them are named in the log and skipped).
    """
    folder = Path(folder)
    files = _candidate_files(folder)
    if not files:
        return None
    by_series: dict[str, list[pydicom.Dataset]] = {}
    objects: dict[str, list[pydicom.Dataset]] = {}  # RTSTRUCT, SEG, RTPLAN, RTDOSE, SR, PR...: not image series
    for f in files:
        ds = _read_header(f)
        group = objects if non_image_kind(ds) is not None else by_series
        group.setdefault(str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>")), []).append(ds)
    objects_only = not by_series
    if objects_only:  # only non-image objects (an RTSTRUCT or SR folder): summarised as before, never CT
        by_series, objects = objects, {}
    if objects:
        _log_objects(folder, [(Path(str(ds.filename)), str(non_image_kind(ds))) for dss in objects.values()
                              for ds in dss])
    firsts = {uid: dss[0] for uid, dss in by_series.items()}
    if len(by_series) > 1:
        listing = "; ".join(
            f"{uid} ({ds.get('Modality', '?')}, '{ds.get('SeriesDescription', '')}', {len(by_series[uid])} files)"
            for uid, ds in sorted(firsts.items())
        )
        if any(str(ds.get("Modality", "")).upper() == "CT" for ds in firsts.values()):
            raise DataError(folder, f"contains {len(by_series)} DICOM series, put each in its own folder: {listing}")
        uid = sorted(by_series)[0]
        reason: str | None = f"holds {len(by_series)} series, none of them CT: {listing}"
        if objects_only:
            kinds = sorted({str(non_image_kind(ds)) for ds in firsts.values()})
            reason = f"holds only non-image DICOM objects ({', '.join(kinds)}), no image series: {listing}"
    else:
        uid = next(iter(by_series))
        reason = None
    first, num_files = firsts[uid], len(by_series[uid])
    return CTSeriesSummary(
        folder=folder,
        series_instance_uid=uid,
        modality=str(first.get("Modality", "")).upper(),
        num_files=num_files,
        patient_id=str(first.get("PatientID", "") or "").strip(),
        series_description=str(first.get("SeriesDescription", "") or ""),
        series_number=_as_int(first.get("SeriesNumber"), 1 << 30),
        slice_thickness=_as_float(
            first.get("SliceThickness") or _frame_value(first, 0, "PixelMeasuresSequence", "SliceThickness"),
            float("inf"),
        ),
        reason=reason if reason is not None else _reason(first, num_files, min_slices),
        num_slices=_num_slices(first, num_files),
    )


def _choose(patient_dir: Path, series: Sequence[CTSeriesSummary], patient_id: str = "") -> CTSeriesSummary:
    """Apply the selection rule to the series of one patient, logging every skipped series.

    Raises:
        DataError: no CT candidate (names ``patient_dir`` and lists each series with its reason).
    """
    who = f"patient {patient_id}" if patient_id else "patient"
    candidates = [s for s in series if s.reason is None]
    if not candidates:
        listing = "; ".join(f"{s.describe()}: {s.reason}" for s in series) or "no DICOM series found"
        raise DataError(patient_dir, f"{who} has no usable axial CT series: {listing}")
    chosen = min(candidates, key=lambda s: (-s.num_slices, s.slice_thickness, s.series_number, str(s.folder)))
    logger.info("%s (%s): using CT series %s", patient_dir, who, chosen.describe())
    for s in series:
        if s is not chosen:
            reason = s.reason or f"not chosen: {chosen.folder.name} has more slices (or thinner ones)"
            logger.info("%s (%s): skipping %s: %s", patient_dir, who, s.describe(), reason)
    return chosen


def _series_folders(root: Path) -> list[Path]:
    """DICOM series folders under ``root`` (``root`` itself included), sorted."""
    return [p for p in find_volumes(root, skip_objects=False) if p.is_dir()]


def select_ct_series(patient_dir: str | os.PathLike, min_slices: int = 16, check: bool = False) -> Path:
    """Choose the CT series of one patient: the axial CT series with the most slices (see the module docstring).

    Args:
        patient_dir: folder holding one patient's series (any depth, e.g. ``patient/study/series``).
        min_slices: fewest slices for a series to be a candidate (scouts and thick slabs have fewer).
        check: also run the full slice checks of :func:`~meddiff.data.dicom_series_info` on the chosen
            series (truncated files, missing or duplicated positions, uneven spacing).

    Returns:
        The folder of the chosen series.

    Raises:
        DataError: ``patient_dir`` is missing, holds no CT candidate (only CR/SEG/SR, scouts...), a file is
            unreadable, a folder mixes several series, or (with ``check``) the chosen series is bad.
    """
    root = Path(patient_dir)
    summaries = [s for s in (summarize_dicom_folder(f, min_slices) for f in _series_folders(root)) if s is not None]
    ids = sorted({s.patient_id for s in summaries})
    chosen = _choose(root, summaries, ids[0] if len(ids) == 1 else "")
    if check:
        dicom_series_info(chosen.folder)
    return chosen.folder


def find_ct_volumes(data_dir: str | os.PathLike, min_slices: int = 16) -> list[Path]:
    """The CT volumes under ``data_dir``: one DICOM series per patient, plus every NIfTI file.

    DICOM series folders (see :func:`~meddiff.data.find_volumes`) are grouped into patients by PatientID
    within each top-level entry of ``data_dir`` (the LIDC-IDRI layout has one folder per patient; a
    folder of anonymised patients sharing one PatientID still gives one patient per folder), and each
    patient's series is chosen by :func:`select_ct_series`'s rule. ``.npy`` files are ignored with a
    warning. Use as a datalist's ``volume_finder``.

    Args:
        data_dir: the folder to search.
        min_slices: fewest slices for a CT series to be a candidate.

    Returns:
        The chosen series folders and the NIfTI files, sorted.

    Raises:
        DataError: ``data_dir`` is missing, a patient has no usable CT series (the error names the
            patient's folder), a file is unreadable, or a folder mixes several series.
    """
    root = Path(data_dir)
    found = find_volumes(root, skip_objects=False)  # folders of RTSTRUCT/SEG/SR objects are listed as skipped
    volumes = [p for p in found if p.is_file() and _has_suffix(p, NIFTI_SUFFIXES)]
    for p in found:
        if p.is_file() and p not in volumes:
            logger.warning("%s: not a CT input (only NIfTI files and DICOM series are), ignored", p)
    patients: dict[tuple[str, str], list[CTSeriesSummary]] = {}
    for folder in (p for p in found if p.is_dir()):
        summary = summarize_dicom_folder(folder, min_slices)
        if summary is None:
            continue
        rel = folder.relative_to(root).parts
        patients.setdefault((rel[0] if rel else "", summary.patient_id), []).append(summary)
    tops = [top for top, _ in patients]
    for (top, patient_id), series in sorted(patients.items()):
        if top and tops.count(top) == 1:
            folder = root / top  # the patient's own top-level folder (LIDC-IDRI layout)
        else:
            folder = Path(os.path.commonpath([str(s.folder) for s in series]))
        volumes.append(_choose(folder, series, patient_id).folder)
    logger.info("%s: %d CT volumes (%d patients with DICOM, %d NIfTI files)", root, len(volumes), len(patients),
                len(volumes) - len(patients))
    return sorted(volumes)
