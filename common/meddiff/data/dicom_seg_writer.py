# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Write a label map as a DICOM SEG (binary, one segment per label) that references a DICOM image series.

Made for the synthetic image + label pairs of mask-conditioned sampling: the image is written as a DICOM series
(:func:`~meddiff.data.write_dicom_series`, marked synthetic) and its label map as a SEG referencing that series'
instances frame by frame, so a viewer or PACS shows the labels on the image and
:func:`~meddiff.data.read_dicom_seg` reads them back onto the series' grid voxel for voxel. The SEG is marked
derived and synthetic (SeriesDescription, ContentLabel ``SYNTHETIC``, ContentDescription).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from ..utils.atomic import atomic_path
from .errors import DataError
from .readers import DicomSeriesInfo, dicom_series_info
from .segmentation import parse_label_names

__all__ = ["SEG_SERIES_DESCRIPTION", "default_label_names", "labels_on_series_grid", "write_dicom_seg"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: SeriesDescription of a written SEG (DICOM LO, at most 64 characters)
SEG_SERIES_DESCRIPTION = "SYNTHETIC - labels of a synthetic image - NOT FOR DIAGNOSIS"
#: ContentLabel (DICOM CS: upper case, at most 16 characters)
SEG_CONTENT_LABEL = "SYNTHETIC"
#: ContentDescription (DICOM LO, at most 64 characters)
SEG_CONTENT_DESCRIPTION = "Labels a SYNTHETIC image was generated from; not for diagnosis"


def default_label_names(labels: np.ndarray) -> dict[str, int]:
    """``{"label_<v>": v}`` for ``v = 1 .. labels.max()``: segment ``v`` holds label value ``v``."""
    top = int(np.max(labels)) if np.size(labels) else 0
    return {f"label_{v}": v for v in range(1, top + 1)}


def labels_on_series_grid(
    labels: np.ndarray, affine: np.ndarray | None, info: DicomSeriesInfo, what: PathLike = "labels"
) -> np.ndarray:
    """Bring ``labels`` on the grid ``affine`` onto the grid of :func:`~meddiff.data.read_dicom_series`.

    Both grids must hold the same voxels, their axes at most permuted or reversed (the DICOM reader orders slices
    along the slice normal, so a volume written with its slice axis against the normal reads back reversed).

    Args:
        labels: ``(X, Y, Z)`` integer label map.
        affine: its 4x4 RAS affine; ``None``: it is already on the series' grid.
        info: the series, from :func:`~meddiff.data.dicom_series_info`.
        what: the label source, for messages.

    Returns:
        ``(X, Y, Z)`` on the series' grid.

    Raises:
        DataError: the grids differ (another shape, spacing, orientation or origin).
    """
    if affine is None:
        if tuple(labels.shape) != tuple(info.shape):
            raise DataError(what, f"label map shape {tuple(labels.shape)} is not the shape {tuple(info.shape)} of "
                                  f"the image series {info.folder}")
        return labels
    target = info.affine()
    # series voxel index -> label voxel index: a signed permutation plus an integer shift when the grids agree
    matrix = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ target
    rot = np.rint(matrix[:3, :3])
    shift = np.rint(matrix[:3, 3])
    size = np.asarray(labels.shape)
    ok = (np.allclose(matrix[:3, :3], rot, atol=1e-3) and np.allclose(matrix[:3, 3], shift, atol=1e-2)
          and (np.abs(rot).sum(axis=0) == 1).all() and (np.abs(rot).sum(axis=1) == 1).all())
    if ok:
        perm = np.abs(rot).argmax(axis=0)  # series axis a <- label axis perm[a]
        if tuple(size[perm]) != tuple(info.shape):
            ok = False
    if not ok:
        raise DataError(what, f"label map grid (shape {tuple(labels.shape)}, affine {np.round(affine, 4).tolist()}) "
                              f"is not the grid of the image series {info.folder} (shape {tuple(info.shape)}, "
                              f"affine {np.round(target, 4).tolist()})")
    out = np.transpose(labels, perm)
    flips = [a for a in range(3) if rot[perm[a], a] < 0]
    out = np.flip(out, axis=flips) if flips else out
    start = np.array([shift[perm[a]] if rot[perm[a], a] > 0 else size[perm[a]] - 1 - shift[perm[a]]
                      for a in range(3)])
    if start.any():
        raise DataError(what, f"label map grid is shifted by {start.tolist()} voxels from the image series "
                              f"{info.folder}")
    return np.ascontiguousarray(out)


def write_dicom_seg(
    series_dir: PathLike | DicomSeriesInfo,
    labels: np.ndarray,
    label_names: Mapping[str, Any] | None,
    out_path: PathLike,
    affine: np.ndarray | None = None,
    *,
    series_description: str = SEG_SERIES_DESCRIPTION,
    algorithm_type: str = "MANUAL",
) -> Path:
    """Write ``labels`` as a binary DICOM SEG referencing the single-frame image series in ``series_dir``.

    One segment per entry of ``label_names`` (``{SegmentLabel: label value}``, background 0 left out), numbered
    ``1..N`` in value order; a segment whose label is absent from this map is written empty. Frames reference
    the series' slices (SOPInstanceUID), so :func:`~meddiff.data.read_dicom_seg` with the same ``label_names``
    (or, when the values are ``1..N``, with none) returns ``labels`` on the series' grid. Patient, study and frame
    of reference are the series'; the SEG is a new series marked SYNTHETIC. Written to a temporary sibling file,
    then renamed onto ``out_path``.

    Args:
        series_dir: the image series folder (it may hold other objects, e.g. an earlier SEG), or its
            :func:`~meddiff.data.dicom_series_info`.
        labels: ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) non-negative integer label map.
        label_names: ``{name: value}`` (MONAI Label or ``channel_def`` form); ``None``: :func:`default_label_names`.
        out_path: the SEG file to write (e.g. ``<series_dir>/seg.dcm``).
        affine: the 4x4 RAS affine of ``labels``; ``None``: ``labels`` is on the grid of
            :func:`~meddiff.data.read_dicom_series` already. With an affine, axes reversed or permuted relative to
            the series are put right; any other difference is an error.
        series_description: SeriesDescription of the SEG; must say SYNTHETIC.
        algorithm_type: SegmentAlgorithmType of every segment (``"MANUAL"``: the label map was drawn, not
            computed from this image).

    Returns:
        ``out_path``.

    Raises:
        DataError: naming the series folder or ``out_path``: a multi-frame or tilted series, labels off the series'
            grid, non-integer or undeclared label values, bad ``label_names``.
        ValueError: a ``series_description`` that does not say SYNTHETIC or is longer than 64 characters.
    """
    import highdicom as hd  # imported here: only SEG output needs it
    from pydicom.sr.codedict import codes

    if "SYNTHETIC" not in series_description.upper() or len(series_description) > 64:
        raise ValueError(f"series_description must contain 'SYNTHETIC' and be at most 64 characters, got "
                         f"{series_description!r}")
    out = Path(out_path)
    info = series_dir if isinstance(series_dir, DicomSeriesInfo) else dicom_series_info(series_dir)
    if any(s.frame is not None for s in info.slices):
        raise DataError(info.folder, "cannot write a DICOM SEG for it: a multi-frame image; only single-frame series "
                                     "(as meddiff writes them) are supported")
    if np.asarray(info.shear).any():
        raise DataError(info.folder, "cannot write a DICOM SEG for it: a tilted (sheared) slice stack")
    array = np.asarray(labels)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise DataError(out, f"cannot write DICOM SEG: label map must be 3D (X, Y, Z), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all() or not np.equal(np.mod(array, 1), 0).all():
            raise DataError(out, "cannot write DICOM SEG: label map has non-integer values (an image, not a mask?)")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise DataError(out, f"cannot write DICOM SEG: negative label value {int(array.min())}")
    try:
        names = parse_label_names(label_names) if label_names else default_label_names(array)
    except ValueError as e:
        raise DataError(out, f"cannot write DICOM SEG: bad label_names: {e}") from e
    names = dict(sorted(((k, v) for k, v in names.items() if v != 0), key=lambda kv: kv[1]))
    undeclared = sorted(set(np.unique(array).tolist()) - set(names.values()) - {0})
    if undeclared:
        raise DataError(out, f"cannot write DICOM SEG: label values {undeclared} are not in label_names {names}")
    if not names:
        raise DataError(out, "cannot write DICOM SEG: no foreground label (label_names and the map hold only 0)")
    array = labels_on_series_grid(array, affine, info, out)

    # label value -> segment number 1..N, frames (slices in series order, rows = Y, columns = X)
    lut = np.zeros(int(max(array.max(), max(names.values()))) + 1, dtype=np.uint16)
    for number, value in enumerate(names.values(), start=1):
        lut[value] = number
    pixels = np.ascontiguousarray(np.transpose(lut[array], (2, 1, 0)))
    pixels = pixels.astype(np.uint8 if len(names) < 256 else np.uint16)
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True, force=True) for s in info.slices]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=algorithm_type,
        )
        for number, name in enumerate(names, start=1)
    ]
    first = sources[0]
    series_number = int(first.get("SeriesNumber", 1) or 1) + 1000
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=series_number,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="meddiff",
            manufacturer_model_name="meddiff", software_versions=_version(), device_serial_number="0",
            content_label=SEG_CONTENT_LABEL, content_description=SEG_CONTENT_DESCRIPTION,
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise DataError(out, f"cannot write DICOM SEG for {info.folder}: highdicom: {type(e).__name__}: {e}") from e
    seg.SeriesDescription = series_description
    with atomic_path(out) as tmp:
        seg.save_as(tmp)
    logger.info("%s: DICOM SEG with %d segments (%s) on %s", out, len(names), ", ".join(names), info.folder)
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("meddiff")
    except Exception:  # not installed (a bundle's copy of meddiff)
        return "unknown"
