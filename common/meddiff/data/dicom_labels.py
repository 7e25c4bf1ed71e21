# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Labels from clinical DICOM: RT structure sets (RTSTRUCT) and segmentations (SEG) on the image grid.

A radiotherapy planning export holds the CT series and, beside it (same folder or a sibling series folder), an
RTSTRUCT whose ROIs outline the structures; research exports often hold a DICOM SEG instead. Both are read onto
the voxel grid of the image series exactly as :func:`~meddiff.data.read_dicom_series` (and so
:class:`~meddiff.data.LoadVolume`) returns it: the label array is indexed ``(X, Y, Z)`` = (Columns, Rows, slices in
position order along the slice normal) and its affine is the image's RAS affine, voxel for voxel.

* :func:`read_rtstruct`: each ROI named in ``label_names`` is rasterised per slice: every CLOSED_PLANAR contour is
  mapped from patient coordinates into the image's voxel indices and filled on the voxel centres with the even-odd
  rule, contours of one ROI on one slice combined by exclusive or (an inner contour cuts a hole). ROIs are painted
  in ``label_names`` order, a later one overwriting an earlier one where they overlap.
* :func:`read_dicom_seg`: read with ``highdicom`` (frames matched to the image slices by their source
  SOPInstanceUIDs, else placed by their plane positions), segments mapped to label values by ``label_names``
  (SegmentLabel -> value; default: the segment numbers).
* :func:`find_label_objects` lists the RTSTRUCT/SEG objects that reference an image series;
  :func:`dicom_label_to_nifti` writes the label volume as NIfTI (atomically) for a Decathlon-style datalist.

Every problem is one :class:`~meddiff.data.DataError` naming the label file (and the ROI or segment): an ROI missing
from the structure set (the available names are listed), an object referencing another series or frame of
reference (both UIDs named), a contour off the slice planes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage

from .errors import DataError
from .readers import DicomSeriesInfo, _candidate_files, dicom_series_info
from .segmentation import parse_label_names
from .writers import save_nifti

__all__ = ["dicom_label_to_nifti", "find_label_objects", "read_dicom_seg", "read_rtstruct"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: a contour whose points lie further apart than this (in slices) along the slice normal is not in a slice plane
PLANE_TOLERANCE_SLICES = 0.25

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------- common


def _image(image: PathLike | DicomSeriesInfo) -> tuple[DicomSeriesInfo, pydicom.Dataset]:
    """The checked image series and the header of its first file."""
    info = image if isinstance(image, DicomSeriesInfo) else dicom_series_info(image)
    header = pydicom.dcmread(info.files[0], stop_before_pixels=True, force=True)
    return info, header


def _read_object(path: PathLike, kinds: Sequence[str]) -> pydicom.Dataset:
    """Read a label object and check it is one of ``kinds`` (``"RTSTRUCT"``, ``"SEG"``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "label object does not exist" if not path.exists() else "is not a file")
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        raise DataError(path, f"cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
    kind = _kind(ds)
    if kind not in kinds:
        raise DataError(path, f"is not a DICOM {' or '.join(kinds)} (Modality {ds.get('Modality', '?')}, "
                              f"SOP class {ds.get('SOPClassUID', '?')})")
    return ds


def _kind(ds: pydicom.Dataset) -> str | None:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").upper()
    if sop_class == RT_STRUCTURE_SET_STORAGE or (modality == "RTSTRUCT" and not sop_class):
        return "RTSTRUCT"
    if sop_class == SEGMENTATION_STORAGE or (modality == "SEG" and not sop_class):
        return "SEG"
    return None


def _label_values(label_names: Mapping[str, Any], path: Path) -> dict[str, int]:
    """``{name: value}`` of the foreground labels (value 0, the background, is not an ROI)."""
    try:
        names = parse_label_names(label_names)
    except ValueError as e:
        raise DataError(path, f"bad label_names: {e}") from e
    return {name: value for name, value in names.items() if value != 0}


def _match(name: str, available: Mapping[str, Any]) -> str | None:
    """``name`` among ``available``: exact, else the one equal ignoring case and surrounding spaces."""
    if name in available:
        return name
    folded = [a for a in available if a.strip().casefold() == name.strip().casefold()]
    return folded[0] if len(folded) == 1 else None


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _label_array(shape: Sequence[int], values: Sequence[int]) -> np.ndarray:
    dtype = np.uint8 if max(values, default=0) <= np.iinfo(np.uint8).max else np.uint16
    return np.zeros(tuple(shape), dtype=dtype)


def _check_frame_of_reference(path: Path, what: str, uid: str, header: pydicom.Dataset, info: DicomSeriesInfo) -> None:
    image_for = str(header.get("FrameOfReferenceUID", "") or "")
    if uid and image_for and uid != image_for:
        raise DataError(path, f"{what} frame of reference {uid}, not the image series' {image_for} "
                              f"(series {info.series_instance_uid} in {info.folder}): it belongs to another scan")


# ------------------------------------------------------------------------------------------ RTSTRUCT


def _rtstruct_series_uids(ds: pydicom.Dataset) -> list[str]:
    """The SeriesInstanceUIDs a structure set references (RTReferencedSeriesSequence)."""
    uids = []
    for frame in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for study in frame.get("RTReferencedStudySequence") or []:
            for series in study.get("RTReferencedSeriesSequence") or []:
                if series.get("SeriesInstanceUID"):
                    uids.append(str(series.SeriesInstanceUID))
    return uids


def _fill_polygon(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of a closed polygon (voxel-index coordinates) on the voxel centres of an ``(X, Y)`` slice.

    A voxel centre ``(i, j)`` is inside when a ray from it towards ``+x`` crosses the polygon an odd number of
    times (edges half-open in ``y``, so a vertex on the ray is counted once).

    Returns:
        bool ``shape``.
    """
    out = np.zeros(shape, dtype=bool)
    x0, y0 = x, y
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    rows = np.arange(max(int(np.ceil(y.min())), 0), min(int(np.floor(y.max())), shape[1] - 1) + 1)
    for j in rows:
        crosses = (y0 > j) != (y1 > j)
        if not crosses.any():
            continue
        a0, b0, a1, b1 = x0[crosses], y0[crosses], x1[crosses], y1[crosses]
        xs = np.sort(a0 + (j - b0) * (a1 - a0) / (b1 - b0))
        starts = np.clip(np.ceil(xs[0::2]), 0, shape[0]).astype(int)
        stops = np.clip(np.ceil(xs[1::2]), 0, shape[0]).astype(int)
        for s, e in zip(starts, stops):
            out[s:e, j] ^= True
    return out


def read_rtstruct(
    rtstruct_path: PathLike, image: PathLike | DicomSeriesInfo, label_names: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise the ROIs of an RT structure set onto the voxel grid of the image series it outlines.

    Args:
        rtstruct_path: the RTSTRUCT file.
        image: the image series folder (it may also hold the RTSTRUCT and other non-image objects), or its
            :func:`~meddiff.data.dicom_series_info`.
        label_names: ``{ROI name: label value}`` (e.g. ``{"GTV": 1, "Lung_L": 2}``; a ``"background": 0`` entry is
            ignored); ROI names match exactly, else ignoring case and surrounding spaces.

    Returns:
        ``(labels, affine)``: ``(X, Y, Z)`` uint8 (uint16 above 255) label values on the grid of
        :func:`~meddiff.data.read_dicom_series`, and that 4x4 RAS affine.

    Raises:
        DataError: naming the RTSTRUCT: not a structure set; it references another series or frame of reference
            (both UIDs named); an ROI of ``label_names`` is missing (the available ROIs are listed); a contour is
            not in a slice plane of the image. Also the image series' own errors.
    """
    path = Path(rtstruct_path)
    ds = _read_object(path, ["RTSTRUCT"])
    values = _label_values(label_names, path)
    info, header = _image(image)
    referenced = _rtstruct_series_uids(ds)
    if referenced and info.series_instance_uid not in referenced:
        raise DataError(path, f"references series {', '.join(sorted(set(referenced)))}, not the image series "
                              f"{info.series_instance_uid} ({info.folder}): it outlines another scan")

    rois = {str(r.get("ROIName", "")): r for r in ds.get("StructureSetROISequence") or []}
    contours = {_as_int(c.get("ReferencedROINumber")): c for c in ds.get("ROIContourSequence") or []}
    lps_to_index = np.linalg.inv(_RAS_TO_LPS @ info.affine())
    matched = {name: _match(name, rois) for name in values}
    missing = [name for name, roi_name in matched.items() if roi_name is None]
    if missing:
        raise DataError(path, f"has no ROI{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
                              f"(from label_names); its ROIs are {', '.join(repr(r) for r in sorted(rois)) or 'none'}")
    for roi_name in matched.values():
        frame = str(rois[roi_name].get("ReferencedFrameOfReferenceUID", "") or "")
        _check_frame_of_reference(path, f"ROI '{roi_name}' is drawn in", frame, header, info)
    labels = _label_array(info.shape, list(values.values()))
    for name, value in values.items():
        roi_name = matched[name]
        roi = rois[roi_name]
        mask = _rasterise_roi(path, roi_name, contours.get(_as_int(roi.get("ROINumber"))), lps_to_index, info)
        if not mask.any():
            logger.warning("%s: ROI '%s' covers no voxel of %s", path, roi_name, info.folder)
        overlap = int((labels[mask] != 0).sum())
        if overlap:
            logger.info("%s: ROI '%s' overlaps earlier ROIs in %d voxels; it is painted over them", path, roi_name,
                        overlap)
        labels[mask] = value
    logger.info("%s: %d ROIs rasterised onto %s %s", path, len(values), info.folder, info.shape)
    return labels, info.affine()


def _rasterise_roi(path: Path, name: str, roi_contours: pydicom.Dataset | None, lps_to_index: np.ndarray,
                   info: DicomSeriesInfo) -> np.ndarray:
    """The voxels of one ROI: its closed planar contours filled per slice, combined by exclusive or."""
    mask = np.zeros(info.shape, dtype=bool)
    skipped: dict[str, int] = {}
    for n, contour in enumerate((roi_contours.get("ContourSequence") or []) if roi_contours is not None else []):
        kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR") or "CLOSED_PLANAR").upper()
        points = np.asarray([float(v) for v in contour.get("ContourData") or []], dtype=np.float64)
        if kind != "CLOSED_PLANAR" or points.size < 9 or points.size % 3:
            why = kind if kind != "CLOSED_PLANAR" else "with fewer than 3 points"
            skipped[why] = skipped.get(why, 0) + 1
            continue
        index = (lps_to_index @ np.c_[points.reshape(-1, 3), np.ones(points.size // 3)].T)[:3]
        z = index[2]
        if float(z.max() - z.min()) > PLANE_TOLERANCE_SLICES:
            raise DataError(path, f"ROI '{name}': contour {n + 1} is not in a slice plane of the image series "
                                  f"{info.series_instance_uid} (it spans {z.max() - z.min():.2f} slices along the "
                                  "slice normal)")
        k = int(np.rint(z.mean()))
        if not 0 <= k < info.shape[2]:
            skipped["outside the image"] = skipped.get("outside the image", 0) + 1
            continue
        mask[..., k] ^= _fill_polygon(index[0], index[1], info.shape[:2])
    if skipped:
        logger.warning("%s: ROI '%s': contours skipped: %s", path, name,
                       ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    return mask


# ------------------------------------------------------------------------------------------------ SEG


def _slice_uids(info: DicomSeriesInfo) -> list[str] | None:
    """SOPInstanceUID of each slice in position order; ``None`` for a multi-frame image."""
    if any(s.frame is not None for s in info.slices):
        return None
    uids = {}
    for f in info.files:
        uids[f] = str(pydicom.dcmread(f, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
                      .get("SOPInstanceUID", ""))
    return [uids[s.path] for s in info.slices]


def _unshear(labels: np.ndarray, info: DicomSeriesInfo) -> np.ndarray:
    """Shift each slice of a tilted-gantry series back onto the stack, as the image reader does (nearest)."""
    if not np.asarray(info.shear).any():
        return labels
    labels = np.array(labels)  # a writable copy
    iop = np.asarray(info.orientation)
    normal = np.cross(iop[:3], iop[3:])
    for k, s in enumerate(info.slices):
        offset = s.position - info.slices[0].position
        offset = offset - (offset @ normal) * normal
        shift = (offset @ iop[:3] / info.spacing[0], offset @ iop[3:] / info.spacing[1])
        labels[..., k] = ndimage.shift(labels[..., k], shift, order=0, mode="grid-constant", cval=0)
    return labels


def read_dicom_seg(
    seg_path: PathLike, image: PathLike | DicomSeriesInfo, label_names: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a DICOM SEG onto the voxel grid of the image series it segments, with ``highdicom``.

    Frames are matched to the image slices by their source SOPInstanceUIDs (how SEGs derived from single-frame
    slices reference them); a SEG without those references is placed by its plane positions (``highdicom``'s
    volume, resampled to the image grid by nearest neighbour). Fractional segments are thresholded at 0.5.

    Args:
        seg_path: the SEG file.
        image: the image series folder (it may also hold the SEG), or its :func:`~meddiff.data.dicom_series_info`.
        label_names: ``{SegmentLabel: label value}``; default: every segment, valued by its SegmentNumber.

    Returns:
        ``(labels, affine)`` as :func:`read_rtstruct` returns them.

    Raises:
        DataError: naming the SEG: not a segmentation, unreadable by highdicom, another series or frame of
            reference (both UIDs named), a segment of ``label_names`` missing (the available ones are listed).
    """
    import highdicom as hd  # imported here: only label reading needs it

    path = Path(seg_path)
    _read_object(path, ["SEG"])
    try:
        seg = hd.seg.segread(path)
    except Exception as e:
        raise DataError(path, f"cannot be read as a DICOM SEG by highdicom: {type(e).__name__}: {e}") from e
    info, header = _image(image)
    _check_frame_of_reference(path, "is in", str(seg.get("FrameOfReferenceUID", "") or ""), header, info)
    referenced = sorted({str(series) for _, series, _ in seg.get_source_image_uids()})
    if referenced and info.series_instance_uid not in referenced:
        raise DataError(path, f"segments series {', '.join(referenced)}, not the image series "
                              f"{info.series_instance_uid} ({info.folder}): it belongs to another scan")
    segments = {str(s.get("SegmentLabel", "")): int(s.SegmentNumber) for s in seg.SegmentSequence}
    if label_names is None:
        values = {name: number for name, number in segments.items()}
    else:
        values = _label_values(label_names, path)
    numbers = []
    for name in values:
        found = _match(name, segments)
        if found is None:
            raise DataError(path, f"has no segment '{name}' (from label_names); its segments are "
                                  f"{', '.join(f'{n}: {s!r}' for s, n in sorted(segments.items(), key=lambda x: x[1]))}")
        numbers.append(segments[found])

    uids = _slice_uids(info)
    stack: np.ndarray | None = None
    if uids is not None and any(
        "DerivationImageSequence" in frame for frame in seg.get("PerFrameFunctionalGroupsSequence") or []
    ):
        try:
            pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, combine_segments=False,
                                                       skip_overlap_checks=True)
            stack = np.moveaxis(np.asarray(pixels), (0, 1, 2), (2, 1, 0))  # (slices, rows, cols, S) -> (X, Y, Z, S)
            stack = np.stack([_unshear(stack[..., s], info) for s in range(stack.shape[-1])], axis=-1)
        except (KeyError, ValueError, IndexError, RuntimeError) as e:
            logger.info("%s: frames not matched by source instance (%s); placing them by position", path, e)
    if stack is None:
        stack = _seg_by_position(path, seg, numbers, info)
    labels = _label_array(info.shape, list(values.values()))
    for s, value in enumerate(values.values()):
        labels[stack[..., s] >= 0.5] = value
    logger.info("%s: %d segments read onto %s %s", path, len(values), info.folder, info.shape)
    return labels, info.affine()


def _seg_by_position(path: Path, seg: Any, numbers: Sequence[int], info: DicomSeriesInfo) -> np.ndarray:
    """SEG frames placed by their plane positions: highdicom's volume resampled to the image grid (nearest)."""
    try:
        volume = seg.get_volume(segment_numbers=list(numbers), combine_segments=False, skip_overlap_checks=True)
    except Exception as e:
        raise DataError(path, f"frames reference no slice of {info.folder} and do not form a regular volume "
                              f"(highdicom: {type(e).__name__}: {e})") from e
    array = np.asarray(volume.array, dtype=np.float32)
    # image voxel index -> patient LPS -> SEG voxel index
    matrix = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64)) @ _RAS_TO_LPS @ info.affine()
    out = np.zeros((*info.shape, len(numbers)), dtype=np.float32)
    for s in range(len(numbers)):
        channel = array[..., s] if array.ndim == 4 else array
        out[..., s] = ndimage.affine_transform(channel, matrix[:3, :3], offset=matrix[:3, 3], output_shape=info.shape,
                                               order=0, mode="grid-constant", cval=0.0)
    return out


# ------------------------------------------------------------------------------------------ discovery


def _references(ds: pydicom.Dataset) -> set[str]:
    """SeriesInstanceUIDs a label object references (RTSTRUCT or SEG)."""
    uids = set(_rtstruct_series_uids(ds))
    uids |= {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence") or [] if "SeriesInstanceUID" in s}
    return uids


def find_label_objects(image_dir: PathLike, search_dir: PathLike | None = None) -> list[Path]:
    """The RTSTRUCT and SEG files that reference the image series in ``image_dir``.

    Searches ``image_dir`` itself (a planning export often puts everything in one folder) and, recursively,
    ``search_dir`` (default: the parent of ``image_dir``, i.e. the sibling series folders of a study). An object
    that references no series is kept when it shares the image's frame of reference.

    Args:
        image_dir: the image series folder.
        search_dir: folder to search beside it.

    Returns:
        The label objects, sorted.

    Raises:
        DataError: see :func:`~meddiff.data.dicom_series_info` for the image series.
    """
    info, header = _image(image_dir)
    image_for = str(header.get("FrameOfReferenceUID", "") or "")
    root = Path(search_dir) if search_dir is not None else Path(image_dir).parent
    folders = {Path(image_dir)} | {Path(d) for d, _, _ in os.walk(root)}
    found = []
    tags = ["Modality", "SOPClassUID", "FrameOfReferenceUID", "ReferencedSeriesSequence",
            "ReferencedFrameOfReferenceSequence"]
    for folder in sorted(folders):
        if any(part.startswith(".") for part in folder.parts[len(root.parts):]):
            continue
        for f in _candidate_files(folder):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
            except Exception:  # not DICOM: nothing to find here
                continue
            if _kind(ds) is None:
                continue
            refs = _references(ds)
            frames = {str(r.get("FrameOfReferenceUID", "")) for r in ds.get("ReferencedFrameOfReferenceSequence") or []}
            frames.add(str(ds.get("FrameOfReferenceUID", "") or ""))
            if info.series_instance_uid in refs or (not refs and image_for and image_for in frames):
                found.append(f)
    logger.info("%s: label objects: %s", image_dir, ", ".join(str(f) for f in found) or "none")
    return sorted(found)


def dicom_label_to_nifti(
    image_dir: PathLike,
    label_obj: PathLike | None,
    label_names: Mapping[str, Any] | None,
    out_path: PathLike,
) -> Path:
    """Write the label volume of an RTSTRUCT or SEG as NIfTI on the image grid, for a labelled datalist.

    The NIfTI file has the image's grid and RAS affine, as :class:`~meddiff.data.LoadVolume` reads the image
    series, so ``{"image": image_dir, "label": out_path}`` is a pair that
    :class:`~meddiff.data.segmentation.LoadSegmentationPaird` accepts. Written atomically.

    Args:
        image_dir: the image series folder.
        label_obj: the RTSTRUCT or SEG file; ``None``: the one :func:`find_label_objects` finds.
        label_names: ``{ROI or segment name: label value}`` (required for an RTSTRUCT).
        out_path: destination ``.nii.gz`` (or ``.nii``).

    Returns:
        ``out_path``.

    Raises:
        DataError: no label object (or several) when ``label_obj`` is ``None``; an RTSTRUCT without
            ``label_names``; see :func:`read_rtstruct` and :func:`read_dicom_seg`.
    """
    info = dicom_series_info(image_dir)
    if label_obj is None:
        found = find_label_objects(image_dir)
        if len(found) != 1:
            raise DataError(image_dir, f"{'no' if not found else len(found)} RTSTRUCT/SEG objects reference series "
                                       f"{info.series_instance_uid}{': ' + ', '.join(map(str, found)) if found else ''}"
                                       "; pass label_obj")
        label_obj = found[0]
    header = _read_object(label_obj, ["RTSTRUCT", "SEG"])
    if _kind(header) == "RTSTRUCT":
        if not label_names:
            raise DataError(label_obj, "is an RTSTRUCT: pass label_names, e.g. {'GTV': 1}, to map its ROIs to labels")
        labels, affine = read_rtstruct(label_obj, info, label_names)
    else:
        labels, affine = read_dicom_seg(label_obj, info, label_names)
    out = save_nifti(labels, affine, out_path, dtype=labels.dtype.type, description=f"labels from {_kind(header)}")
    logger.info("%s: wrote the labels of %s", out, label_obj)
    return out
