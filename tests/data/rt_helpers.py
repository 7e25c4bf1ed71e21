# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Clinical DICOM label objects for the tests: a synthetic CT, its RTSTRUCT (written here with pydicom: contours
placed from each slice's own DICOM header), its SEG (written with highdicom), an RTPLAN and an RTDOSE.

The RTSTRUCT writer does not use meddiff's geometry code: each contour point in voxel-index coordinates
``(x, y)`` of slice ``k`` goes to the patient position ``IPP_k + x * PixelSpacing[1] * row_cosine +
y * PixelSpacing[0] * column_cosine`` of that slice's file (DICOM PS3.3 C.7.6.2.1.1), so a reader that gets the
grid wrong cannot agree with it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from meddiff.data import write_dicom_series

RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"

SHAPE = (48, 40, 12)  # (X, Y, Z)
SPACING = (0.7, 0.8, 2.5)
SPHERE_CENTRE, SPHERE_RADIUS_MM = (32.0, 26.0, 6.0), 8.0
BOX = ((3.5, 16.5), (3.5, 14.5), (2, 9))  # x, y (voxel-index edges) and slices k0..k1 inclusive
HOLE = ((7.5, 11.5), (7.5, 10.5))


def ct_affine(oblique: bool = False) -> np.ndarray:
    """RAS affine of the synthetic CT: LPS-identity axial, or rotated 20 degrees about two axes."""
    rot = np.eye(3)
    if oblique:
        a, b = np.radians(20.0), np.radians(-12.0)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        rot = rz @ rx
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag(SPACING)
    affine[:3, 3] = [14.0, 30.5, -62.0]
    return affine


def source_masks() -> dict[str, np.ndarray]:
    """The two labels on the CT grid: a sphere (``Tumour``) and a box with a hole (``Ring``), bool ``(X, Y, Z)``."""
    i, j, k = np.indices(SHAPE).astype(np.float64)
    sx, sy, sz = SPACING
    ci, cj, ck = SPHERE_CENTRE
    sphere = ((i - ci) * sx) ** 2 + ((j - cj) * sy) ** 2 + ((k - ck) * sz) ** 2 < SPHERE_RADIUS_MM**2
    (x0, x1), (y0, y1), (k0, k1) = BOX
    (hx0, hx1), (hy0, hy1) = HOLE
    box = (i > x0) & (i < x1) & (j > y0) & (j < y1) & (k >= k0) & (k <= k1)
    box &= ~((i > hx0) & (i < hx1) & (j > hy0) & (j < hy1))
    return {"Tumour": sphere, "Ring": box}


def write_ct(folder: Path, oblique: bool = False, patient_id: str = "RT1") -> list[Path]:
    """The synthetic CT series (``SHAPE``, ``SPACING``) in ``folder``."""
    volume = np.full(SHAPE, -800.0, dtype=np.float32)
    masks = source_masks()
    volume[masks["Tumour"]] = 40.0
    volume[masks["Ring"]] = 300.0
    return write_dicom_series(volume, ct_affine(oblique), folder, modality="CT", patient_id=patient_id,
                              rescale_intercept=-1024.0, series_description="CT planning")


def _contours_index_space() -> dict[str, dict[int, list[np.ndarray]]]:
    """Per ROI, per slice, polygons ``(n, 2)`` in voxel-index ``(x, y)`` coordinates."""
    out: dict[str, dict[int, list[np.ndarray]]] = {"Tumour": {}, "Ring": {}}
    sx, sy, sz = SPACING
    ci, cj, ck = SPHERE_CENTRE
    t = np.linspace(0.0, 2 * np.pi, 180, endpoint=False)
    for k in range(SHAPE[2]):
        r2 = SPHERE_RADIUS_MM**2 - ((k - ck) * sz) ** 2
        if r2 > 0:
            r = np.sqrt(r2) / np.cos(np.pi / 180)  # circumscribed polygon: the circle's voxels stay inside
            out["Tumour"][k] = [np.c_[ci + r * np.cos(t) / sx, cj + r * np.sin(t) / sy]]
    (x0, x1), (y0, y1), (k0, k1) = BOX
    (hx0, hx1), (hy0, hy1) = HOLE
    for k in range(k0, k1 + 1):
        outer = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        hole = np.array([[hx0, hy0], [hx0, hy1], [hx1, hy1], [hx1, hy0]])  # the other way round, as TPSs write holes
        out["Ring"][k] = [outer, hole]
    return out


def contours_from_mask(mask: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Per slice ``k``, the closed outlines of the bool ``(X, Y, Z)`` ``mask`` as polygons in voxel-index ``(x, y)``.

    Outlines are the 0.5 iso-lines of each slice (marching squares, ``contourpy``): they pass half-way between
    inside and outside voxel centres, as contours drawn on a planning system do; holes come as their own polygons.
    """
    import contourpy

    out: dict[int, list[np.ndarray]] = {}
    for k in range(mask.shape[2]):
        plane = np.pad(mask[..., k].astype(np.float64), 1)  # padded, so outlines touching the border close
        if not plane.any():
            continue
        lines = contourpy.contour_generator(z=plane, line_type="Separate").lines(0.5)
        out[k] = [line[:, ::-1] - 1.0 for line in lines if len(line) >= 3]  # (row, column) -> (x, y), unpadded
    return out


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _object(path: Path, sop_class: str, modality: str, ct: pydicom.Dataset) -> FileDataset:
    """A new instance in the CT's patient and study."""
    sop_uid = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=_file_meta(sop_class, sop_uid), preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop_uid, modality
    ds.PatientName, ds.PatientID = ct.PatientName, ct.PatientID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ct.StudyInstanceUID, generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 900, 1
    now = datetime.datetime.now()
    ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
    ds.Manufacturer = "test"
    return ds


def write_rtstruct(path: Path, ct_files: Sequence[Path], rois: Mapping[str, dict[int, list[np.ndarray]]] | None = None,
                   series_uid: str | None = None, frame_uid: str | None = None) -> Path:
    """An RTSTRUCT outlining ``rois`` (default: the sphere and the ring) on the CT slices ``ct_files`` (slice order).

    Args:
        path: the file to write.
        ct_files: the CT files, ``ct_files[k]`` holding slice ``k``.
        rois: ``{name: {k: [polygon (n, 2) in voxel-index (x, y)]}}``.
        series_uid: the referenced series (default: the CT's; another UID simulates a foreign structure set).
        frame_uid: the ROIs' frame of reference (default: the CT's).
    """
    cts = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files]
    first = cts[0]
    ds = _object(path, RT_STRUCT, "RTSTRUCT", first)
    ds.StructureSetLabel = "PLAN"
    ds.StructureSetDate, ds.StructureSetTime = ds.SeriesDate, ds.SeriesTime
    frame_uid = frame_uid or first.FrameOfReferenceUID
    images = DicomSequence([Dataset() for _ in cts])
    for item, ct in zip(images, cts):
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ct.SOPClassUID, ct.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = series_uid or first.SeriesInstanceUID
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_COMPONENT, first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, (name, per_slice) in enumerate((rois or _contours_index_space()).items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame_uid, name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        contours = DicomSequence()
        for k, polygons in sorted(per_slice.items()):
            ct = cts[k]
            ipp = np.asarray(ct.ImagePositionPatient, dtype=float)
            iop = np.asarray(ct.ImageOrientationPatient, dtype=float)
            d_row, d_col = (float(v) for v in ct.PixelSpacing)  # between rows, between columns
            for poly in polygons:
                points = ipp + np.outer(poly[:, 0] * d_col, iop[:3]) + np.outer(poly[:, 1] * d_row, iop[3:])
                contour = Dataset()
                ref = Dataset()
                ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ct.SOPClassUID, ct.SOPInstanceUID
                contour.ContourImageSequence = DicomSequence([ref])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour.ContourData = [f"{v:.4f}" for v in points.reshape(-1)]
                contours.append(contour)
        item = Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, [255, 0, 0]
        item.ContourSequence = contours
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        ds.RTROIObservationsSequence.append(observation)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_seg(path: Path, ct_files: Sequence[Path], masks: Mapping[str, np.ndarray] | None = None) -> Path:
    """A binary DICOM SEG of ``masks`` (default: :func:`source_masks`) on the CT, written with highdicom."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    cts = [pydicom.dcmread(f) for f in ct_files]
    masks = masks if masks is not None else source_masks()
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Neoplasm if name == "Tumour" else codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n, name in enumerate(masks, start=1)
    ]
    # (X, Y, Z) per segment -> (frames = slices, rows = Y, columns = X, segments), frames in ct_files order
    pixels = np.stack([np.transpose(m, (2, 1, 0)) for m in masks.values()], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=cts, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=901,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def write_rtplan(path: Path, ct_file: Path) -> Path:
    """A minimal RTPLAN (no pixel data) in the CT's study."""
    ct = pydicom.dcmread(ct_file, stop_before_pixels=True)
    ds = _object(path, RT_PLAN, "RTPLAN", ct)
    ds.RTPlanLabel, ds.RTPlanGeometry = "PLAN1", "PATIENT"
    ds.FrameOfReferenceUID = ct.FrameOfReferenceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rtdose(path: Path, ct_file: Path) -> Path:
    """A small multi-frame RTDOSE grid (it has pixel data, like a real one) in the CT's study."""
    ct = pydicom.dcmread(ct_file, stop_before_pixels=True)
    ds = _object(path, RT_DOSE, "RTDOSE", ct)
    dose = np.arange(4 * 6 * 5, dtype=np.uint32).reshape(4, 6, 5)
    ds.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = dose.shape
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit, ds.PixelRepresentation = 31, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = ct.ImagePositionPatient, ct.ImageOrientationPatient
    ds.PixelSpacing = ["3.0", "3.0"]
    ds.GridFrameOffsetVector = [0.0, 3.0, 6.0, 9.0]
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType, ds.DoseGridScaling = "GY", "PHYSICAL", "PLAN", "0.001"
    ds.PixelData = dose.astype("<u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
