# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Loading 3D volumes (NIfTI, DICOM series, MRNet-style ``.npy`` stacks) with clear errors for bad files.

All loaders return what MONAI's own readers return: a channel-first ``MetaTensor`` ``(1, X, Y, Z)``
whose ``affine`` maps voxel indices to RAS world coordinates (``meta["space"] == "RAS"``).

* NIfTI (``.nii``, ``.nii.gz``): MONAI ``NibabelReader``; array and affine exactly as nibabel stores them.
* DICOM series (a folder of single-frame slices, or one Enhanced MR/CT multi-frame file): checked by
  :func:`dicom_series_info` and read by :func:`read_dicom_series` with pydicom and its pixel-data plugins
  (native, deflated, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000), per-slice
  RescaleSlope/Intercept applied, MONOCHROME1 inverted, slices ordered along the slice normal
  ``row x column`` of ImageOrientationPatient and placed by their positions (the reading rules are in
  :func:`dicom_series_info`); the affine is the one MONAI's ``ITKReader`` gives.
* ``.npy`` (MRNet): :class:`NpyStackReader`, ``(slices, H, W)`` -> ``(H, W, slices)`` with
  ``affine = diag(spacing)``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.data.image_reader import ImageReader
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform, Transform
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from scipy import ndimage

from .errors import DataError

__all__ = [
    "NpyStackReader",
    "DicomSlice",
    "DicomSeriesInfo",
    "check_pixel_decoder",
    "dicom_pixels",
    "dicom_series_info",
    "frame_geometry",
    "inspect_dicom_series",
    "is_multiframe",
    "non_image_kind",
    "read_dicom_series",
    "LoadVolume",
    "LoadVolumed",
    "verify_datalist",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NPY_SUFFIXES = (".npy",)
# files in a DICOM folder that are obviously not slices of the series
_NON_DICOM_NAMES = {"dicomdir", "thumbs.db", "desktop.ini"}
_NON_DICOM_SUFFIXES = {
    ".json", ".txt", ".md", ".csv", ".tsv", ".xml", ".html", ".htm", ".pdf", ".log", ".ini", ".yaml", ".yml",
    ".py", ".sh", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".nii", ".gz", ".npy", ".npz",
    ".zip", ".tar", ".mat", ".h5", ".nrrd", ".mha", ".mhd",
}  # fmt: skip


def _has_suffix(path: PathLike, suffixes: Iterable[str]) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in suffixes)


# --------------------------------------------------------------------------------------------- npy


class NpyStackReader(ImageReader):
    """MONAI reader for MRNet-style ``.npy`` stacks shaped ``(slices, H, W)``.

    The slice axis is moved last, so the data is ``(H, W, slices)``, and the affine is
    ``diag(spacing)`` (RAS, origin 0), i.e. what ``NibabelReader`` returns for a NIfTI file with that
    affine. Arrays that are not 3D are returned unchanged (for the caller to reject). Works with
    ``LoadImage(reader=NpyStackReader(spacing=...))`` and ``EnsureChannelFirst``.

    Args:
        spacing: voxel size ``(x, y, z)`` in mm of the returned ``(H, W, slices)`` array.
        slice_axis: axis of the stored array that indexes slices.
        mmap_mode: passed to ``numpy.load`` (e.g. ``"r"`` to memory-map large stacks).
    """

    def __init__(
        self, spacing: Sequence[float] = (1.0, 1.0, 1.0), slice_axis: int = 0, mmap_mode: str | None = None
    ) -> None:
        super().__init__()
        spacing = tuple(float(s) for s in ensure_tuple(spacing))
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive numbers (x, y, z), got {spacing}")
        self.spacing = spacing
        self.slice_axis = int(slice_axis)
        self.mmap_mode = mmap_mode

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Return True if every file name ends with ``.npy``.

        Args:
            filename: a file name or a sequence of them.

        Returns:
            Whether this reader handles all of them.
        """
        return all(_has_suffix(f, NPY_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> np.ndarray | list[np.ndarray]:
        """Load one or several ``.npy`` files (no pickles).

        Args:
            data: a file name or a sequence of them.
            kwargs: extra arguments for ``numpy.load``.

        Returns:
            An array, or a list of arrays for several files.
        """
        kwargs = {"mmap_mode": self.mmap_mode, **kwargs}
        arrays = [np.load(f"{name}", allow_pickle=False, **kwargs) for name in ensure_tuple(data)]
        return arrays if len(arrays) > 1 else arrays[0]

    def get_data(self, img: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, dict]:
        """Reorder to ``(H, W, slices)`` and build the metadata (several arrays are stacked as channels).

        Args:
            img: an array from :meth:`read`, or a list of them.

        Returns:
            ``(data, meta)`` with ``affine``, ``original_affine``, ``spatial_shape``, ``space``,
            ``spacing`` and ``original_channel_dim`` set like MONAI's readers do.

        Raises:
            ValueError: several arrays of different shapes.
        """
        arrays = [img] if isinstance(img, np.ndarray) else list(img)
        out = [np.moveaxis(np.asarray(a), self.slice_axis, -1) if np.ndim(a) == 3 else np.asarray(a) for a in arrays]
        if len({a.shape for a in out}) > 1:
            raise ValueError(f"cannot stack .npy arrays of different shapes {[a.shape for a in out]}")
        affine = np.diag([*self.spacing, 1.0])
        meta: dict = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(out[0].shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),  # "no_channel"
            "spacing": np.asarray(self.spacing),
        }
        if len(out) == 1:
            return out[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(out, axis=0), meta


# ------------------------------------------------------------------------------------------- dicom

#: reading rules for slice positions (see :func:`dicom_series_info` and the bundles' docs)
MISSING_SLICE_RATIO = 1.5  # a gap >= 1.5 x the median gap: a slice is missing
EXTRA_SLICE_RATIO = 0.5  # a gap <= 0.5 x the median gap: an extra, overlapping or duplicated slice
DUPLICATE_GAP_MM = 1e-3  # two slices closer than this along the normal share one position
JITTER_WARN_FRACTION = 1e-3  # a slice further than this fraction of the spacing off the regular grid: warning
JITTER_RESAMPLE_FRACTION = 0.01  # further than this: slices are interpolated onto the grid from their positions
MAX_DEVIATION_FRACTION = 0.2  # further than this: not jitter but uneven spacing (e.g. a missing slice), error
TILT_MIN_SHEAR = 1e-3  # in-plane shift per mm along the normal above which the stack is sheared (gantry tilt)
OFF_LINE_FRACTION = 0.1  # a slice off the stack's line by more than this fraction of a pixel: not one stack

_FUNCTIONAL_GROUPS = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")


@dataclass
class DicomSlice:
    """One 2D slice of a DICOM series: a single-frame file, or one frame of a multi-frame file.

    Attributes:
        path: the file.
        frame: frame index in a multi-frame file (``None`` for a single-frame file).
        position: ImagePositionPatient (LPS, mm).
        slope: RescaleSlope of this slice.
        intercept: RescaleIntercept of this slice.
    """

    path: Path
    frame: int | None
    position: np.ndarray = field(repr=False)
    slope: float = 1.0
    intercept: float = 0.0

    def name(self) -> str:
        """File name, with the frame number (1-based, as in DICOM) for multi-frame files."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"


@dataclass
class DicomSeriesInfo:
    """Header summary of a checked single-series DICOM folder (or multi-frame file).

    Attributes:
        folder: the series folder (or the multi-frame file).
        files: the files of the series, ordered by the position of their first slice along the slice normal.
        modality: Modality (e.g. ``"MR"``, ``"CT"``).
        series_instance_uid: SeriesInstanceUID.
        series_description: SeriesDescription (may be empty).
        positions: slice positions along the normal in mm, ascending (LPS), as read from the headers.
        first_position: ImagePositionPatient of the first slice (LPS, mm).
        spacing: ``(column spacing, row spacing, slice spacing)`` in mm, i.e. along MONAI's ``(X, Y, Z)``;
            the slice spacing is the distance from the first to the last slice over ``slices - 1``.
        shape: ``(Columns, Rows, slices)``, the array shape MONAI's readers return.
        slices: the slices in position order.
        orientation: ImageOrientationPatient (row direction, column direction), LPS.
        max_deviation: largest distance (mm) of a slice from its place on the regular slice grid.
        resampled: whether the slices are interpolated along the normal onto the regular grid
            (``max_deviation`` above :data:`JITTER_RESAMPLE_FRACTION` of the slice spacing).
        shear: in-plane shift (LPS, mm) of the slices per mm along the normal; non-zero for a tilted gantry,
            whose slices are shifted back onto a stack along the normal when read.
    """

    folder: Path
    files: list[Path]
    modality: str
    series_instance_uid: str
    series_description: str
    positions: list[float] = field(repr=False)
    first_position: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    slices: list[DicomSlice] = field(default_factory=list, repr=False)
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    max_deviation: float = 0.0
    resampled: bool = False
    shear: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def affine(self) -> np.ndarray:
        """The 4x4 voxel-to-world matrix of the volume read by :func:`read_dicom_series`, in RAS (MONAI's).

        Returns:
            float64 ``(4, 4)``: columns are the row direction x column spacing, the column direction x row spacing,
            the slice normal x slice spacing; the origin is the first slice's ImagePositionPatient.
        """
        iop = np.asarray(self.orientation, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        lps = np.eye(4)
        lps[:3, 0] = iop[:3] * self.spacing[0]
        lps[:3, 1] = iop[3:] * self.spacing[1]
        lps[:3, 2] = normal * self.spacing[2]
        lps[:3, 3] = self.first_position
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _candidate_files(folder: Path) -> list[Path]:
    """Files of ``folder`` (not recursive) that may be DICOM: no hidden files or obvious non-DICOM ones."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name.lower() not in _NON_DICOM_NAMES
        and not _has_suffix(p, _NON_DICOM_SUFFIXES)
    )


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID:
    """The dataset's transfer syntax; for a file without file meta (no preamble), the encoding it was read in."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax:
        return pydicom.uid.UID(syntax)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        return pydicom.uid.ImplicitVRLittleEndian
    return pydicom.uid.ExplicitVRBigEndian if little is False else pydicom.uid.ExplicitVRLittleEndian


def check_pixel_decoder(path: PathLike, ds: pydicom.Dataset) -> None:
    """Check that the pixel data of ``ds`` can be decoded by the installed pydicom plugins.

    Native and deflated pixel data need no plugin; RLE is decoded by pydicom itself; JPEG (baseline,
    extended, lossless), JPEG-LS and JPEG 2000 need ``pylibjpeg`` with its ``pylibjpeg-libjpeg`` and
    ``pylibjpeg-openjpeg`` plugins (dependencies of meddiff), or GDCM.

    Args:
        path: the file, for the error message.
        ds: its dataset.

    Raises:
        DataError: an unknown or unsupported transfer syntax (named), or no installed plugin decodes it.
    """
    syntax = _transfer_syntax(ds)
    if not syntax.is_transfer_syntax:
        raise DataError(path, f"has an unknown transfer syntax {syntax}: cannot decode its pixel data")
    if not syntax.is_compressed:
        return
    import pydicom.pixels  # pydicom >= 3, imported here: meddiff also runs beside pydicom 2.4 (MONAI Label's venv)

    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError:
        raise DataError(
            path, f"pixel data is compressed as {syntax.name} ({syntax}), which is not supported; convert the series "
            "to an uncompressed, JPEG, JPEG-LS, JPEG 2000 or RLE transfer syntax (e.g. gdcmconv --raw)"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DataError(
            path, f"pixel data is compressed as {syntax.name} ({syntax}) but no installed pydicom plugin decodes it "
            f"(install pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle; or {missing})"
        )


#: modalities of DICOM objects that are not slices of an image series (labels, plans, doses, reports...)
NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SEG", "SR", "PR", "KO", "REG", "FID", "DOC", "PLAN",
     "RWV", "AU", "ECG", "HD", "RESP", "REGISTRATION"}
)
#: SOP class UID prefixes of the same objects (for files whose Modality is missing or generic)
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.481.",  # RT Image/Dose/Structure Set/Plan/Treatment Record...
    "1.2.840.10008.5.1.4.1.1.66.",  # Segmentation, Surface Segmentation, Spatial Registration, Fiducials
    "1.2.840.10008.5.1.4.1.1.88.",  # Structured reports, Key Object Selection
    "1.2.840.10008.5.1.4.1.1.11.",  # Presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # Encapsulated PDF/CDA/STL
)


def non_image_kind(ds: pydicom.Dataset) -> str | None:
    """The kind of a DICOM object that is not a slice of an image series, or ``None`` for an image slice.

    RT structure sets, plans, doses and records, segmentations (SEG), structured reports (SR), presentation
    states (PR), key-object selections and registrations sit beside the image series in clinical exports
    (e.g. a radiotherapy planning export: CT + RTSTRUCT + RTPLAN + RTDOSE); they are never a second image
    series of the folder.

    Args:
        ds: a DICOM header.

    Returns:
        The object's Modality (e.g. ``"RTSTRUCT"``, ``"SEG"``), or ``None`` when ``ds`` is an image slice.
    """
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in NON_IMAGE_MODALITIES:
        return modality
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        return modality or pydicom.uid.UID(sop_class).name
    return None


def _log_objects(folder: Path, objects: Sequence[tuple[Path, str]]) -> None:
    """Name the non-image objects found beside an image series (INFO)."""
    if objects:
        listing = ", ".join(f"{p.name} ({kind})" for p, kind in objects)
        logger.info("%s: not part of the image series, skipped: %s", folder, listing)


def _read_dicom(path: Path) -> pydicom.Dataset:
    """Read a whole DICOM file and check its pixel data (complete, grayscale, decodable) and geometry tags.

    A non-image object (:func:`non_image_kind`: RTSTRUCT, SEG, RTPLAN, RTDOSE, SR, PR...) is returned as read,
    unchecked, for the caller to set aside.

    Returns:
        The dataset without its PixelData (the pixels are decoded later by :func:`dicom_pixels`).

    Raises:
        DataError: unreadable, truncated, not a grayscale image, an undecodable transfer syntax, or no geometry tags.
    """
    try:
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)  # no preamble: accept only if it parses as an image below
    except Exception as e:
        raise DataError(path, f"cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if ("SOPClassUID" in ds or "Modality" in ds) and non_image_kind(ds) is not None:
        return ds
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DataError(path, "has float pixel data (parametric map), not a CT/MR image")
        if "SOPClassUID" not in ds:
            raise DataError(path, "cannot be read (truncated or corrupt?): no DICOM header or pixel data")
        raise DataError(path, "has no pixel data (truncated, or not an image slice)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.BitsAllocated)
    except Exception as e:
        raise DataError(path, f"cannot be read (truncated or corrupt?): bad image header: {e}") from e
    if samples != 1:
        photometric = ds.get("PhotometricInterpretation", "?")
        raise DataError(path, f"is a colour image ({photometric}, SamplesPerPixel {samples}), not a grayscale slice")
    check_pixel_decoder(path, ds)
    if not _transfer_syntax(ds).is_compressed:
        # native pixel data: exact length (plus one pad byte for odd lengths)
        expected = (rows * cols * samples * frames * bits + 7) // 8
        got = len(ds.PixelData)
        if not expected <= got <= expected + 1:
            raise DataError(
                path,
                f"cannot be read (truncated or corrupt?): PixelData has {got} bytes, expected {expected} "
                f"(Rows {rows} x Columns {cols} x NumberOfFrames {frames} x BitsAllocated {bits}/8)",
            )
    del ds.PixelData  # checked; keep only the header in memory (the pixels are decoded later)
    return ds


def _frame_value(ds: pydicom.Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` of the ``sequence`` functional group of ``frame``: per-frame first, then shared, else ``None``."""
    for groups_keyword in _FUNCTIONAL_GROUPS:
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        group = groups[frame] if groups_keyword == _FUNCTIONAL_GROUPS[0] else groups[0]
        items = group.get(sequence)
        if items and keyword in items[0] and items[0][keyword].value not in (None, ""):
            return items[0][keyword].value
    return None


def _floats(path: Path, value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(path, f"has an unreadable {what} {value!r}: {e}") from e
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise DataError(path, f"has an invalid {what} {arr.tolist()}")
    return arr


def is_multiframe(ds: pydicom.Dataset) -> bool:
    """Whether ``ds`` is a multi-frame image (NumberOfFrames > 1, or enhanced functional groups)."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return frames > 1 or "PerFrameFunctionalGroupsSequence" in ds


def frame_geometry(path: PathLike, ds: pydicom.Dataset) -> tuple[list[DicomSlice], np.ndarray, np.ndarray]:
    """The slices of one DICOM file and their geometry, from its header.

    Single-frame files use the top-level ImagePositionPatient, ImageOrientationPatient, PixelSpacing and
    RescaleSlope/Intercept. Multi-frame files (Enhanced MR / CT Image Storage) use each frame's functional
    groups (PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence,
    PixelValueTransformationSequence; per-frame first, then shared), falling back to the top-level tags.

    Args:
        path: the file (named in errors).
        ds: its header.

    Returns:
        ``(slices, orientation, pixel_spacing)``: one :class:`DicomSlice` per frame, ImageOrientationPatient
        (6 values) and PixelSpacing ``(row spacing, column spacing)`` (1 mm when absent).

    Raises:
        DataError: missing or invalid positions/orientation, frames with different orientations or pixel spacings.
    """
    path = Path(path)
    if not is_multiframe(ds):
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise DataError(path, "has no ImagePositionPatient/ImageOrientationPatient: cannot place the slice in 3D")
        iop = _floats(path, ds.ImageOrientationPatient, 6, "ImageOrientationPatient")
        spacing = _floats(path, ds.get("PixelSpacing") or (1.0, 1.0), 2, "PixelSpacing")
        ipp = _floats(path, ds.ImagePositionPatient, 3, "ImagePositionPatient")
        slices = [DicomSlice(path, None, ipp, *_frame_rescale(path, ds, 0))]
    else:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and len(per_frame) != frames:
            raise DataError(path, f"has {len(per_frame)} per-frame functional groups for {frames} frames")
        where = "in the functional groups (PlanePositionSequence)"
        if per_frame is None:
            raise DataError(path, f"is a multi-frame DICOM ({frames} frames) without per-frame positions {where}: "
                                  "cannot place its frames in 3D")
        slices, orientations, spacings = [], [], []
        for k in range(frames):
            ipp = _frame_value(ds, k, "PlanePositionSequence", "ImagePositionPatient")
            iop = _frame_value(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient")
            iop = iop if iop is not None else ds.get("ImageOrientationPatient")
            if ipp is None or iop is None:
                raise DataError(path, f"frame {k + 1} of {frames} has no ImagePositionPatient/"
                                      f"ImageOrientationPatient {where}: cannot place it in 3D")
            pixel_spacing = _frame_value(ds, k, "PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing")
            ipp = _floats(path, ipp, 3, f"ImagePositionPatient (frame {k + 1})")
            slices.append(DicomSlice(path, k, ipp, *_frame_rescale(path, ds, k)))
            orientations.append(_floats(path, iop, 6, f"ImageOrientationPatient (frame {k + 1})"))
            spacings.append(_floats(path, pixel_spacing or (1.0, 1.0), 2, f"PixelSpacing (frame {k + 1})"))
        iop, spacing = orientations[0], spacings[0]
        for k in range(1, frames):
            if not np.allclose(orientations[k], iop, atol=1e-4):
                raise DataError(path, f"frames have different ImageOrientationPatient (frames 1 and {k + 1}): "
                                      "several stacks in one file are not supported")
            if not np.allclose(spacings[k], spacing, rtol=1e-4):
                raise DataError(path, f"frames have different PixelSpacing (frames 1 and {k + 1})")
    if abs(np.linalg.norm(np.cross(iop[:3], iop[3:])) - 1.0) > 1e-3:
        raise DataError(path, f"has an ImageOrientationPatient that is not two orthonormal vectors: {iop.tolist()}")
    if not (spacing > 0).all():
        raise DataError(path, f"has an invalid PixelSpacing {spacing.tolist()}")
    return slices, iop, spacing


def _rescale(path: Path, slope: Any, intercept: Any) -> tuple[float, float]:
    try:
        out = float(slope), float(intercept)
    except (TypeError, ValueError) as e:
        raise DataError(path, f"has an unreadable RescaleSlope/RescaleIntercept {slope!r}/{intercept!r}") from e
    if not (np.isfinite(out).all() and out[0] != 0):
        raise DataError(path, f"has an invalid RescaleSlope/RescaleIntercept {out[0]}/{out[1]}")
    return out


def dicom_pixels(path: PathLike, ds: pydicom.Dataset | None = None) -> np.ndarray:
    """Decode the frames of one DICOM file to real-world values, as ``(frames, X, Y)`` float32.

    Pixel data is decoded by pydicom and its plugins (any transfer syntax of :func:`check_pixel_decoder`),
    signed or unsigned as PixelRepresentation says; MONOCHROME1 frames are inverted within the stored range
    (``stored -> min + max - stored``) so that, like MONOCHROME2, higher values are brighter; then each frame's
    own RescaleSlope/RescaleIntercept is applied. ``X`` runs along the rows (Columns), ``Y`` down the columns.

    Args:
        path: the DICOM file.
        ds: its dataset with pixel data, if already read.

    Returns:
        float32 ``(frames, Columns, Rows)``.

    Raises:
        DataError: unreadable file, undecodable or corrupt pixel data, a colour image.
    """
    path = Path(path)
    if ds is None:
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as e:
            raise DataError(path, f"cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if "PixelData" not in ds:
        raise DataError(path, "has no pixel data (truncated, or not an image slice)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(path, f"is a colour image (SamplesPerPixel {ds.SamplesPerPixel}), not a grayscale slice")
    check_pixel_decoder(path, ds)
    syntax = _transfer_syntax(ds)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:  # no file meta (no preamble): pydicom needs it to decode
        ds.file_meta.TransferSyntaxUID = syntax
    try:
        stored = ds.pixel_array
    except Exception as e:
        raise DataError(path, f"pixel data ({syntax.name}) cannot be decoded (corrupt?): {type(e).__name__}: {e}") from e
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    stored = np.asarray(stored).reshape(frames, int(ds.Rows), int(ds.Columns)).astype(np.float64)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.get("PixelRepresentation", 0)) else (0, 2**bits - 1)
        stored = (low + high) - stored
    out = np.empty((frames, int(ds.Columns), int(ds.Rows)), dtype=np.float32)
    for k in range(frames):
        slope, intercept = _frame_rescale(path, ds, k)
        out[k] = (stored[k] * slope + intercept).T
    return out


def _frame_rescale(path: Path, ds: pydicom.Dataset, frame: int) -> tuple[float, float]:
    """RescaleSlope/Intercept of one frame: its functional groups (multi-frame), else the top-level tags."""
    slope = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    slope = slope if slope is not None else ds.get("RescaleSlope", 1.0)
    intercept = intercept if intercept is not None else ds.get("RescaleIntercept", 0.0)
    return _rescale(path, slope, intercept)


def _check_single_series(folder: Path, headers: list[tuple[Path, pydicom.Dataset]]) -> None:
    """Raise if the files belong to several series, listing them."""
    series: dict[str, list[pydicom.Dataset]] = {}
    for _, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>")), []).append(ds)
    if len(series) > 1:
        listing = "; ".join(
            f"{uid} ({dss[0].get('Modality', '?')}, '{dss[0].get('SeriesDescription', '')}', {len(dss)} files)"
            for uid, dss in sorted(series.items())
        )
        raise DataError(folder, f"contains {len(series)} DICOM series, put each in its own folder: {listing}")


def _check_positions(folder: Path, slices: list[DicomSlice], normal: np.ndarray, pixel_spacing: np.ndarray) -> dict:
    """Apply the slice-position rules to slices sorted along ``normal``; return the grid (see dicom_series_info)."""
    ipp = np.array([s.position for s in slices])
    pos = ipp @ normal
    gaps = np.diff(pos)
    dup = np.flatnonzero(gaps < DUPLICATE_GAP_MM)
    if dup.size:
        i = int(dup[0])
        raise DataError(folder, f"duplicated slice position {pos[i]:.4g} mm: {slices[i].name()} and "
                                f"{slices[i + 1].name()}")
    median = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        if gap >= MISSING_SLICE_RATIO * median:
            raise DataError(folder, f"inconsistent slice spacing: {gap:.4g} mm between {slices[i].name()} and "
                                    f"{slices[i + 1].name()}, {gap / median:.2f} x the median gap {median:.4g} mm "
                                    "(missing slice?)")
        if gap <= EXTRA_SLICE_RATIO * median:
            raise DataError(folder, f"inconsistent slice spacing: {gap:.4g} mm between {slices[i].name()} and "
                                    f"{slices[i + 1].name()}, only {gap / median:.2f} x the median gap {median:.4g} mm "
                                    "(an extra or overlapping slice, or two interleaved series?)")
    n = len(slices)
    spacing = float(pos[-1] - pos[0]) / (n - 1)
    deviation = pos - pos[0] - spacing * np.arange(n)
    worst = int(np.argmax(np.abs(deviation)))
    max_dev = float(abs(deviation[worst]))
    if max_dev > MAX_DEVIATION_FRACTION * spacing:
        raise DataError(folder, f"inconsistent slice spacing: {slices[worst].name()} is {max_dev:.4g} mm "
                                f"({100 * max_dev / spacing:.0f} % of the {spacing:.4g} mm spacing) off the regular grid "
                                "from the first to the last slice (missing slice?)")

    # gantry tilt: slices shifted in-plane in proportion to their position along the normal
    along = pos - pos[0]
    lateral = (ipp - ipp[0]) - np.outer(along, normal)
    shear = (along @ lateral) / float(along @ along)
    if np.linalg.norm(shear) <= TILT_MIN_SHEAR:
        shear = np.zeros(3)
    off_line = np.linalg.norm(lateral - np.outer(along, shear), axis=1)
    if off_line.max() > OFF_LINE_FRACTION * float(pixel_spacing.min()) + 1e-3:
        k = int(np.argmax(off_line))
        raise DataError(folder, f"slices do not form one stack: {slices[k].name()} is shifted in-plane by "
                                f"{off_line[k]:.3g} mm from the line through the other slices")
    return {"positions": pos, "spacing": spacing, "max_dev": max_dev, "worst": worst, "shear": shear}


def dicom_series_info(folder: PathLike) -> DicomSeriesInfo:
    """Check a single-series DICOM folder (or one multi-frame file) from its headers and return a summary.

    Reads every file in ``folder`` (not recursive; hidden files and obvious non-DICOM files such as
    DICOMDIR, ``.json`` and ``.txt`` are skipped) fully with pydicom. Single-frame files are one slice each;
    an Enhanced MR/CT (multi-frame) file gives one slice per frame, placed by its functional groups.
    Non-image objects beside the series (:func:`non_image_kind`: RTSTRUCT, SEG, RTPLAN, RTDOSE, SR, PR...) are
    named in the log and set aside, never counted as a second series.

    Slice-position rules (the slices are sorted along the normal ``row x column`` of ImageOrientationPatient):

    * two slices closer than :data:`DUPLICATE_GAP_MM` along the normal: duplicated position, error;
    * a gap ``>= 1.5 x`` the median gap (:data:`MISSING_SLICE_RATIO`): missing slice, error;
      a gap ``<= 0.5 x`` the median gap (:data:`EXTRA_SLICE_RATIO`): extra or overlapping slice, error;
    * the volume's grid runs from the first to the last slice with spacing ``(last - first) / (slices - 1)``
      (as ITK's series reader does); a slice more than :data:`MAX_DEVIATION_FRACTION` (20 %) of that
      spacing off its grid position is an error (uneven spacing, e.g. a missing slice in a short series);
    * otherwise the positions are accepted. A slice further than
      :data:`JITTER_WARN_FRACTION` (0.1 %) of that spacing from its grid position gives one warning with the
      largest deviation; beyond :data:`JITTER_RESAMPLE_FRACTION` (1 %) the slices are linearly interpolated
      along the normal from their measured positions onto the grid when read (:func:`read_dicom_series`);
    * slices shifted in-plane in proportion to their position (CT gantry tilt, GantryDetectorTilt) are
      shifted back onto a stack along the normal when read (warning with the tilt angle); slices off that
      line by more than a tenth of a pixel are an error (not one stack).

    Args:
        folder: a folder holding the files of one series, or one multi-frame DICOM file.

    Returns:
        The series summary, slices and files ordered by position along the slice normal.

    Raises:
        DataError: the folder is missing or has no DICOM files; a file is unreadable, truncated, colour, or
            compressed in a syntax no installed plugin decodes; several series; slices of different
            sizes, orientations or pixel spacings; duplicated positions; a missing or extra slice; slices not
            in one stack; fewer than 2 slices.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(folder, "folder does not exist")
    if folder.is_dir():
        files = _candidate_files(folder)
        if not files:
            raise DataError(folder, "contains no DICOM files")
    else:
        files = [folder]
    headers, objects = [], []
    for f in files:
        ds = _read_dicom(f)
        kind = non_image_kind(ds)
        if kind is None:
            headers.append((f, ds))
        else:
            objects.append((f, kind))
    if not headers:
        listing = ", ".join(f"{p.name} ({kind})" for p, kind in objects)
        raise DataError(folder, f"holds no image series, only non-image DICOM objects: {listing}")
    _log_objects(folder, objects)
    _check_single_series(folder, headers)

    first_path, first = headers[0]
    size = (int(first.Rows), int(first.Columns))
    slices, iop, pixel_spacing = frame_geometry(first_path, first)
    for f, ds in headers[1:]:
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise DataError(
                folder, f"slices have different sizes: {first_path.name} {size}, {f.name} {(ds.Rows, ds.Columns)}"
            )
        more, other_iop, other_spacing = frame_geometry(f, ds)
        if not np.allclose(other_iop, iop, atol=1e-4):
            raise DataError(folder, f"slices have different ImageOrientationPatient ({first_path.name}, {f.name})")
        if not np.allclose(other_spacing, pixel_spacing, rtol=1e-4):
            raise DataError(folder, f"slices have different PixelSpacing ({first_path.name}, {f.name})")
        slices += more
    if len(slices) < 2:
        raise DataError(folder, f"has only {len(slices)} slice ({first_path.name}): not a 3D volume")

    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort([s.position @ normal for s in slices], kind="stable")
    slices = [slices[i] for i in order]
    grid = _check_positions(folder, slices, normal, pixel_spacing)
    spacing = grid["spacing"]
    if grid["max_dev"] > JITTER_WARN_FRACTION * spacing:
        action = ("interpolated onto the grid from their positions" if grid["max_dev"] > JITTER_RESAMPLE_FRACTION
                  * spacing else "used as they are (within 1 %)")
        logger.warning(
            "%s: uneven slice positions: largest deviation from the regular %.4g mm grid is %.3g mm (%.2f %% of the "
            "spacing) at %s; slices %s", folder, spacing, grid["max_dev"], 100 * grid["max_dev"] / spacing,
            slices[grid["worst"]].name(), action,
        )  # fmt: skip
    if grid["shear"].any():
        tilt = float(np.degrees(np.arctan(np.linalg.norm(grid["shear"]))))
        logger.warning("%s: slices are sheared by a %.2f degree gantry tilt (GantryDetectorTilt %s); each slice is "
                       "shifted in-plane onto a stack along the slice normal", folder, tilt,
                       first.get("GantryDetectorTilt", "absent"))
    ordered_files = list(dict.fromkeys(s.path for s in slices))
    info = DicomSeriesInfo(
        folder=folder,
        files=ordered_files,
        modality=str(first.get("Modality", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        series_description=str(first.get("SeriesDescription", "")),
        positions=grid["positions"].tolist(),
        first_position=tuple(float(v) for v in slices[0].position),
        spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), spacing),
        shape=(size[1], size[0], len(slices)),
        slices=slices,
        orientation=tuple(float(v) for v in iop),
        max_deviation=grid["max_dev"],
        resampled=grid["max_dev"] > JITTER_RESAMPLE_FRACTION * spacing,
        shear=tuple(float(v) for v in grid["shear"]),
    )
    logger.info(
        "%s: %s series %s, %d slices, spacing %s mm", folder, info.modality, info.series_instance_uid,
        len(slices), tuple(round(s, 4) for s in info.spacing),
    )  # fmt: skip
    return info


def inspect_dicom_series(folder: PathLike) -> list[Path]:
    """Check a single-series DICOM folder and return its files ordered by slice position.

    See :func:`dicom_series_info` for the checks (and for the modality and geometry summary, which are
    logged here).

    Args:
        folder: a folder holding the slice files of one series.

    Returns:
        The slice files ordered by position along the slice normal (ImageOrientationPatient row x column).

    Raises:
        DataError: see :func:`dicom_series_info`.
    """
    return dicom_series_info(folder).files


def read_dicom_series(
    folder: PathLike, info: DicomSeriesInfo | None = None
) -> tuple[np.ndarray, np.ndarray, DicomSeriesInfo]:
    """Read a DICOM series folder (or a multi-frame file) as one volume, by the rules of :func:`dicom_series_info`.

    Pixels are decoded by :func:`dicom_pixels` (any supported transfer syntax; per-slice rescale; MONOCHROME1
    inverted). Slices are stacked in position order; a gantry-tilt shear is undone by shifting each slice
    in-plane (linear interpolation, the volume's minimum outside the field of view); uneven positions beyond
    1 % of the spacing are interpolated along the normal onto the regular grid.

    Args:
        folder: a folder holding one series, or one multi-frame DICOM file.
        info: the result of :func:`dicom_series_info` for ``folder``, if already computed.

    Returns:
        ``(volume, affine, info)``: float32 ``(Columns, Rows, slices)`` real values, the 4x4 RAS affine
        (as MONAI's ``ITKReader`` gives), and the header summary.

    Raises:
        DataError: see :func:`dicom_series_info` and :func:`dicom_pixels`.
    """
    info = info if info is not None else dicom_series_info(folder)
    index = {(s.path, s.frame): k for k, s in enumerate(info.slices)}
    volume = np.empty(info.shape, dtype=np.float32)
    for path in info.files:
        frames = dicom_pixels(path)
        if frames.shape[1:] != info.shape[:2]:
            raise DataError(path, f"decoded frames of shape {frames.shape[1:]}, expected {info.shape[:2]}")
        for f in range(frames.shape[0]):
            k = index.get((path, f), index.get((path, None)) if f == 0 else None)
            if k is not None:
                volume[..., k] = frames[f]
    if np.asarray(info.shear).any():
        iop = np.asarray(info.orientation)
        normal = np.cross(iop[:3], iop[3:])
        fill = float(volume.min())
        for k, s in enumerate(info.slices):
            offset = s.position - info.slices[0].position  # in-plane shift of slice k (LPS mm), as measured
            offset = offset - (offset @ normal) * normal
            shift = (offset @ iop[:3] / info.spacing[0], offset @ iop[3:] / info.spacing[1])
            volume[..., k] = ndimage.shift(volume[..., k], shift, order=1, mode="constant", cval=fill)
    if info.resampled:
        rel = np.asarray(info.positions) - info.positions[0]
        target = info.spacing[2] * np.arange(len(rel))
        lower = np.clip(np.searchsorted(rel, target, side="right") - 1, 0, len(rel) - 2)
        weight = ((target - rel[lower]) / (rel[lower + 1] - rel[lower])).clip(0.0, 1.0).astype(np.float32)
        volume = volume[..., lower] * (1 - weight) + volume[..., lower + 1] * weight
    return volume, info.affine(), info


# ------------------------------------------------------------------------------------------ loader


class LoadVolume(Transform):
    """Load a 3D volume from a NIfTI file, a DICOM series folder or a ``.npy`` stack, and check it.

    Returns a float32 channel-first ``MetaTensor`` ``(1, X, Y, Z)`` with MONAI metadata (RAS
    ``affine``, ``original_affine``, ``spatial_shape``, ``filename_or_obj``; DICOM adds ``modality``).
    DICOM series (a folder, or one multi-frame Enhanced MR/CT file) are read by :func:`read_dicom_series`
    (pydicom and its decoder plugins; the reading rules of :func:`dicom_series_info`), with the affine
    MONAI's ``ITKReader`` gives. Every problem is a :class:`DataError` naming the file or folder.

    Args:
        npy_spacing: voxel size ``(x, y, z)`` for ``.npy`` stacks (default 1 mm).
        npy_slice_axis: slice axis of the stored ``.npy`` arrays.
        dtype: output dtype.
    """

    def __init__(
        self,
        npy_spacing: Sequence[float] | None = None,
        npy_slice_axis: int = 0,
        dtype: np.dtype | type | str = np.float32,
    ) -> None:
        self.npy_spacing = tuple(npy_spacing) if npy_spacing is not None else (1.0, 1.0, 1.0)
        self.npy_reader = NpyStackReader(spacing=self.npy_spacing, slice_axis=npy_slice_axis)
        self.nifti_reader = NibabelReader()
        self.dtype = dtype
        with warnings.catch_warnings():
            # LoadImage instantiates every MONAI reader; the GPU DICOM one warns when nvImageCodec is absent
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            self._load = LoadImage(image_only=True, dtype=dtype, ensure_channel_first=False)
        self._channel_first = EnsureChannelFirst()

    def _reader_for(self, path: Path) -> ImageReader | None:
        """The MONAI reader for ``path``; ``None`` for DICOM (read by :func:`read_dicom_series`)."""
        if not path.exists():
            raise DataError(path, "does not exist")
        if path.is_dir():
            return None
        if _has_suffix(path, NIFTI_SUFFIXES):
            return self.nifti_reader
        if _has_suffix(path, NPY_SUFFIXES):
            return self.npy_reader
        if _has_suffix(path, (".dcm", ".ima")) or pydicom.misc.is_dicom(path):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception as e:
                raise DataError(path, f"cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
            if is_multiframe(header):
                return None
            raise DataError(path, "is a single DICOM file; pass the folder holding the whole series")
        raise DataError(path, "unsupported file type (expected .nii, .nii.gz, .npy or a DICOM series folder)")

    def _load_dicom(self, path: Path) -> MetaTensor:
        volume, affine, info = read_dicom_series(path)
        affine_t = torch.as_tensor(affine, dtype=torch.float64)
        meta = {
            MetaKeys.ORIGINAL_AFFINE: affine_t.clone(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(volume.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
            "filename_or_obj": str(path),
            "spacing": np.asarray(info.spacing),
            "modality": info.modality,
        }
        data = torch.from_numpy(np.ascontiguousarray(volume)[None].astype(self.dtype, copy=False))
        return MetaTensor(data, affine=affine_t, meta=meta)

    def __call__(self, path: PathLike) -> MetaTensor:
        """Load and check one volume.

        Args:
            path: a ``.nii``/``.nii.gz``/``.npy`` file, a folder holding one DICOM series, or one multi-frame
                DICOM file.

        Returns:
            A float32 ``MetaTensor`` ``(1, X, Y, Z)``.

        Raises:
            DataError: missing, unsupported, unreadable, not 3D, or non-finite voxels.
        """
        path = Path(os.fspath(path)).expanduser()
        reader = self._reader_for(path)
        if reader is None:
            img = self._load_dicom(path)
        else:
            try:
                img = self._load(str(path), reader=reader)
            except Exception as e:
                raise DataError(path, f"cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e

        # exactly 3 spatial dims of size > 1 (a trailing singleton 4th dim, e.g. one time point, is fine)
        shape = tuple(img.shape[1:]) if reader is None else tuple(img.shape)
        core = shape
        while len(core) > 3 and core[-1] == 1:
            core = core[:-1]
        if len(core) != 3 or min(core) < 2:
            raise DataError(path, f"is not a 3D volume (shape {shape})")
        if reader is not None:
            img = self._channel_first(img)
        if tuple(img.shape) != (1, *core):
            raise DataError(path, f"is not a 3D volume (shape {shape})")

        finite = torch.isfinite(img)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(img).sum())
            n_bad = int((~finite).sum())
            raise DataError(path, f"contains {n_bad} NaN/Inf voxels ({n_nan} NaN, {n_bad - n_nan} Inf)")
        return img


class LoadVolumed(MapTransform):
    """Dictionary version of :class:`LoadVolume` (for ``monai.transforms.Compose`` and bundle configs).

    Example bundle config entry: ``{"_target_": "meddiff.data.LoadVolumed", "keys": ["image"],
    "npy_spacing": [1.0, 1.0, 3.0]}``. Metadata stays in the ``MetaTensor`` (``image_only`` style).

    Args:
        keys: keys of the paths to load.
        npy_spacing: voxel size ``(x, y, z)`` for ``.npy`` stacks (default 1 mm).
        npy_slice_axis: slice axis of the stored ``.npy`` arrays.
        dtype: output dtype.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        npy_spacing: Sequence[float] | None = None,
        npy_slice_axis: int = 0,
        dtype: np.dtype | type | str = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadVolume(npy_spacing=npy_spacing, npy_slice_axis=npy_slice_axis, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load every key's path.

        Args:
            data: a dict holding paths under ``keys``.

        Returns:
            A copy of ``data`` with those paths replaced by ``MetaTensor`` volumes.

        Raises:
            DataError: see :class:`LoadVolume`.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


def verify_datalist(
    items: Sequence[Mapping[str, Any]], key: str = "image", loader: Callable[[PathLike], Any] | None = None
) -> None:
    """Check before any compute that every datalist item exists and loads cleanly (nnU-Net style).

    Args:
        items: datalist items with absolute paths (e.g. from ``monai.data.load_decathlon_datalist``).
        key: the item key holding the path.
        loader: a callable loading one path; defaults to :class:`LoadVolume`.

    Raises:
        DataError: the first item that is missing, unreadable or not a clean 3D volume.
    """
    load = loader if loader is not None else LoadVolume()
    for i, item in enumerate(items):
        if key not in item:
            raise DataError(f"datalist item {i}", f"has no '{key}' entry: {dict(item)}")
        path = item[key]
        try:
            load(path)
        except DataError:
            raise
        except Exception as e:  # a custom loader's own errors
            raise DataError(path, f"cannot be loaded: {type(e).__name__}: {e}") from e
    logger.info("verified %d volumes", len(items))
