# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Label maps for mask-conditioned generation, from NIfTI or clinical DICOM (SEG, RTSTRUCT), with provenance.

A *mask source* is one of

* a NIfTI label map (``.nii``/``.nii.gz``): read as stored (its grid, its RAS affine);
* a DICOM SEG file: read onto the grid of the image series it segments (:func:`~meddiff.data.read_dicom_seg`);
* an RTSTRUCT file: its ROIs rasterised onto the grid of the image series it outlines
  (:func:`~meddiff.data.read_rtstruct`; ``label_names`` required, it maps ROI names to label values);
* an image series folder holding its SEG or RTSTRUCT (one of them): the same, the folder being the image.

The grid of a DICOM label is always the grid of its referenced image series, never the SEG's own frames: a SEG
stores only the frames that hold a segment (highdicom's default), so its own geometry is a slab, not the field of
view the image was acquired (and the generated image is wanted) on. A SEG or RTSTRUCT file is therefore looked up
together with its image series: the series whose SeriesInstanceUID the object references, searched in the object's
folder, its subfolders, then the sibling folders (and theirs, :data:`SEARCH_DEPTH` levels deep). No image series:
one error naming the object and the series UID it references.

:func:`read_mask` returns ``(labels, affine, meta)``; ``meta`` names the source and the label file and holds the
label file's SHA-256, so a generated image records exactly which mask it was drawn from.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .dicom_labels import _kind, _references, read_dicom_seg, read_rtstruct
from .errors import DataError
from .readers import NIFTI_SUFFIXES, _candidate_files, dicom_series_info, non_image_kind
from .segmentation import check_label_values, parse_label_names

__all__ = ["SEARCH_DEPTH", "LoadDicomLabeld", "file_sha256", "find_masks", "load_mask_volume", "mask_case_name",
           "read_mask"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: folder levels searched below the object's folder and below its parent for the referenced image series
SEARCH_DEPTH = 3
_HEADER_TAGS = ["Modality", "SOPClassUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ReferencedSeriesSequence",
                "ReferencedFrameOfReferenceSequence"]
_SOURCE_KINDS = ("a NIfTI label map (.nii/.nii.gz), a DICOM SEG or RTSTRUCT file, or an image series folder "
                 "holding one")


def file_sha256(path: PathLike) -> str:
    """SHA-256 (hex) of a file's bytes.

    Args:
        path: the file.

    Returns:
        The 64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _header(path: Path) -> pydicom.Dataset | None:
    """The DICOM header (no pixels) of ``path``; ``None`` when it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception:  # not DICOM
        return None


def _walk(root: Path, depth: int) -> list[Path]:
    """``root`` and its non-hidden subfolders down to ``depth`` levels, breadth first."""
    out, level = [], [root]
    for _ in range(depth + 1):
        out.extend(level)
        level = sorted(p for d in level for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    return out


def find_masks(mask_dir: PathLike) -> list[Path]:
    """The mask sources in ``mask_dir``, sorted: NIfTI label maps directly in it, DICOM label objects below it.

    Every NIfTI file directly in ``mask_dir`` is a source. Below it (any depth, hidden folders skipped) every
    RTSTRUCT or SEG is one: as its folder when that folder also holds the image series and no other label object
    (a planning export), else as the file itself (e.g. ``case1/SEG/seg.dcm`` beside ``case1/CT/``).

    Args:
        mask_dir: the folder of masks.

    Returns:
        The sources (files and folders), each accepted by :func:`read_mask`.

    Raises:
        DataError: ``mask_dir`` is not a folder, or holds no mask source.
    """
    root = Path(mask_dir)
    if not root.is_dir():
        raise DataError(root, f"mask_dir is not a folder: give a folder of masks ({_SOURCE_KINDS})")
    sources = [p for p in sorted(root.iterdir()) if p.is_file() and _is_nifti(p)]
    for folder, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        labels, has_image = [], False
        for f in _candidate_files(Path(folder)):
            if _is_nifti(f):
                continue
            ds = _header(f)
            if ds is None:
                continue
            if _kind(ds) is not None:
                labels.append(f)
            elif non_image_kind(ds) is None:
                has_image = True
        if len(labels) == 1 and has_image:
            sources.append(Path(folder))
        else:
            sources.extend(labels)
    if not sources:
        raise DataError(root, f"mask_dir holds no mask: expected {_SOURCE_KINDS}")
    sources = sorted(sources)
    logger.info("%s: %d mask sources", root, len(sources))
    return sources


def mask_case_name(source: PathLike, mask_dir: PathLike | None = None) -> str:
    """A file-name stem for the images generated from ``source``: its path below ``mask_dir``, ``_``-joined.

    ``case1.nii.gz`` -> ``case1``; folder ``case1/`` -> ``case1``; ``case1/SEG/seg.dcm`` -> ``case1_SEG_seg``.

    Args:
        source: a mask source from :func:`find_masks`.
        mask_dir: the folder it was found in; ``None``: the source's own name only.

    Returns:
        The stem.
    """
    path = Path(source)
    parts = list(path.relative_to(mask_dir).parts) if mask_dir is not None else [path.name]
    if not parts or parts == ["."]:
        parts = [path.resolve().name]
    name = parts[-1]
    for suffix in (*NIFTI_SUFFIXES[::-1], ".dcm"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return "_".join([*parts[:-1], name])


def _find_image_series(obj: Path, ds: pydicom.Dataset) -> Path:
    """The folder of the image series a label object references (see the module docstring for where it looks)."""
    referenced = _references(ds)
    frames = {str(r.get("FrameOfReferenceUID", "")) for r in ds.get("ReferencedFrameOfReferenceSequence") or []}
    frames.add(str(ds.get("FrameOfReferenceUID", "") or ""))
    frames.discard("")
    searched: list[Path] = []
    for root in (obj.parent, obj.parent.parent):
        for folder in _walk(root, SEARCH_DEPTH):
            if folder in searched:
                continue
            searched.append(folder)
            for f in _candidate_files(folder):
                header = _header(f) if f != obj else None
                if header is None or non_image_kind(header) is not None:
                    continue
                series = str(header.get("SeriesInstanceUID", "") or "")
                frame = str(header.get("FrameOfReferenceUID", "") or "")
                if series in referenced or (not referenced and frame in frames):
                    logger.info("%s: image series %s found in %s", obj, series, folder)
                    return folder
                break  # a folder holds one image series: its first image decides
    what = f"series {', '.join(sorted(referenced))}" if referenced else f"frame of reference {', '.join(sorted(frames))}"
    raise DataError(obj, f"the image series it labels ({what}) is not beside it (searched {obj.parent} and "
                         f"{obj.parent.parent}, {SEARCH_DEPTH} folder levels deep): a DICOM label is read onto "
                         "its image's grid, so keep the image series folder next to it (or pass image=)")


def _read_nifti(path: Path, label_names: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise DataError(path, f"cannot be read as NIfTI (truncated or corrupt?): {type(e).__name__}: {e}") from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"a label map must be 3D (X, Y, Z), got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all():
            raise DataError(path, "label map has NaN or Inf voxels")
        if not np.equal(np.mod(data, 1), 0).all():
            raise DataError(path, "label map has non-integer values: is it an image rather than a mask?")
    if data.size and data.min() < 0:
        raise DataError(path, f"label map has negative values (min {data.min()})")
    top = int(data.max()) if data.size else 0
    if top > np.iinfo(np.uint16).max:
        raise DataError(path, f"label value {top} is above 65535")
    labels = data.astype(np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16)
    if label_names:
        try:
            names = parse_label_names(label_names)
        except ValueError as e:
            raise DataError(path, f"bad label_names: {e}") from e
        check_label_values(labels, {**names, "background": 0} if 0 not in names.values() else names, path)
    return labels, np.asarray(img.affine, dtype=np.float64)


def read_mask(
    source: PathLike, label_names: Mapping[str, Any] | None = None, image: PathLike | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a mask source (see the module docstring) as a label map with its affine and provenance.

    Args:
        source: a NIfTI label map, a DICOM SEG or RTSTRUCT file, or an image series folder holding one of them.
        label_names: ``{name: label value}``. RTSTRUCT: required (ROI name -> value). SEG: segment label -> value
            (default: the segment numbers). NIfTI: when given, every voxel value must be one of them.
        image: the image series folder of a SEG or RTSTRUCT file, instead of searching beside it.

    Returns:
        ``(labels, affine, meta)``: ``(X, Y, Z)`` uint8 (uint16 above 255) label values; the 4x4 RAS affine (a
        DICOM label's is its image series', as :class:`~meddiff.data.LoadVolume` reads that series); ``meta``
        with ``source``, ``kind`` (``"nifti"``, ``"seg"`` or ``"rtstruct"``), ``label_file`` and ``sha256`` (of the
        label file), ``image`` (the image series folder, DICOM only), ``label_names`` and ``shape``.

    Raises:
        DataError: one error naming the file: a missing source, anything not listed above, an RTSTRUCT without
            ``label_names``, a folder with no (or several) label objects, a DICOM label whose image series is not
            beside it; and the readers' own errors (values, ROIs, segments, series).
    """
    path = Path(source)
    if not path.exists():
        raise DataError(path, "mask source does not exist")
    image_dir: Path | None = Path(image) if image is not None else None
    if path.is_dir():
        objects = [f for f in _candidate_files(path) if not _is_nifti(f) and (h := _header(f)) is not None
                   and _kind(h) is not None]
        if len(objects) != 1:
            found = f": {', '.join(f.name for f in objects)}; pass one of the files" if objects else ""
            raise DataError(path, f"mask source folder holds {len(objects) or 'no'} RTSTRUCT/SEG objects{found} "
                                  f"(a mask source is {_SOURCE_KINDS})")
        label_file, image_dir = objects[0], image_dir or path
    else:
        label_file = path
    if _is_nifti(label_file):
        labels, affine = _read_nifti(label_file, label_names)
        kind = "nifti"
    else:
        header = _header(label_file)
        kind_dicom = _kind(header) if header is not None else None
        if kind_dicom is None:
            what = (f"a DICOM {header.get('Modality', '?')} object, not a SEG or RTSTRUCT" if header is not None
                    else "neither NIfTI nor DICOM")
            raise DataError(label_file, f"is not a mask: {what} (a mask source is {_SOURCE_KINDS})")
        if kind_dicom == "RTSTRUCT" and not label_names:
            raise DataError(label_file, "is an RTSTRUCT: pass label_names mapping its ROI names to label values, "
                                        "e.g. {'GTV': 1, 'Lung_L': 2}")
        if image_dir is None:
            image_dir = _find_image_series(label_file, header)
        info = dicom_series_info(image_dir)
        if kind_dicom == "RTSTRUCT":
            labels, affine = read_rtstruct(label_file, info, label_names)
        else:
            labels, affine = read_dicom_seg(label_file, info, label_names)
        kind = kind_dicom.lower()
    meta = {
        "source": str(path), "kind": kind, "label_file": str(label_file), "sha256": file_sha256(label_file),
        "image": str(image_dir) if image_dir is not None and kind != "nifti" else None,
        "label_names": dict(label_names) if label_names else None, "shape": list(labels.shape),
    }
    logger.info("%s: %s mask %s, values %s", path, kind, labels.shape, np.unique(labels).tolist())
    return labels, affine, meta


def load_mask_volume(source: PathLike, label_names: Mapping[str, Any] | None = None) -> tuple[MetaTensor, dict]:
    """:func:`read_mask` as a float32 ``MetaTensor`` ``(1, X, Y, Z)`` with its affine, as ``LoadVolume`` gives.

    Args:
        source: see :func:`read_mask`.
        label_names: see :func:`read_mask`.

    Returns:
        ``(label, meta)``: the tensor (``filename_or_obj`` = the source) and :func:`read_mask`'s ``meta``.
    """
    labels, affine, meta = read_mask(source, label_names)
    return _as_meta_tensor(labels, affine, source), meta


def _as_meta_tensor(labels: np.ndarray, affine: np.ndarray, source: PathLike) -> MetaTensor:
    affine_t = torch.as_tensor(affine, dtype=torch.float64)
    return MetaTensor(torch.from_numpy(labels.astype(np.float32))[None], affine=affine_t,
                      meta={"filename_or_obj": str(source), "original_affine": affine_t.clone(),
                            "spatial_shape": np.asarray(labels.shape), "space": "RAS",
                            "original_channel_dim": "no_channel"})


def _dicom_label_source(path: Path) -> bool:
    """Whether ``path`` is a DICOM SEG/RTSTRUCT file or a folder holding one (not NIfTI, not an image)."""
    if _is_nifti(path) or not path.exists():
        return False
    files = _candidate_files(path) if path.is_dir() else [path]
    return any((h := _header(f)) is not None and _kind(h) is not None for f in files if not _is_nifti(f))


class LoadDicomLabeld(MapTransform):
    """Read a datalist item's DICOM label (SEG or RTSTRUCT) onto its image's grid, before the pair is loaded.

    For training on clinical exports without a conversion step: ``{"image": "<CT folder>", "label": "<its
    RTSTRUCT or SEG file>"}`` or ``"label": "<the CT folder itself>"`` (holding the image series and one label
    object). The label becomes a ``(1, X, Y, Z)`` float32 ``MetaTensor`` on the grid and RAS affine of the image
    series (:func:`read_mask` with ``image=`` the image folder), which
    :class:`~meddiff.data.segmentation.LoadSegmentationPaird` then checks against the image as it checks a NIfTI
    label. Any other label (NIfTI, ``.npy``, an already loaded array) passes through unchanged.

    Example config entry (before the pair loader): ``{"_target_": "meddiff.data.masks.LoadDicomLabeld",
    "label_names": {"GTV": 1, "Lung_L": 2}}``.

    Args:
        label_key: key of the label path.
        image_key: key of the image path; when it is a folder, the DICOM label is read onto that series.
        label_names: ``{ROI or segment name: label value}``; required for an RTSTRUCT (see :func:`read_mask`).
    """

    def __init__(self, label_key: str = "label", image_key: str = "image",
                 label_names: Mapping[str, Any] | None = None) -> None:
        super().__init__([label_key], allow_missing_keys=True)
        self.label_key = label_key
        self.image_key = image_key
        self.label_names = dict(label_names) if label_names else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace a DICOM label path by its label map.

        Args:
            data: a datalist item.

        Returns:
            A copy, the label read when it is a DICOM label source.

        Raises:
            DataError: see :func:`read_mask` (e.g. an RTSTRUCT without ``label_names``, a missing ROI).
        """
        d = dict(data)
        source = d.get(self.label_key)
        if not isinstance(source, (str, os.PathLike)) or not _dicom_label_source(Path(source)):
            return d
        image = d.get(self.image_key)
        image_dir = Path(image) if isinstance(image, (str, os.PathLike)) and Path(image).is_dir() else None
        labels, affine, _ = read_mask(source, self.label_names, image=image_dir)
        d[self.label_key] = _as_meta_tensor(labels, affine, source)
        return d
