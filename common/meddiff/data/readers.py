# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Loading 3D volumes (NIfTI, DICOM series, MRNet-style ``.npy`` stacks) with clear errors for bad files.

All loaders return what MONAI's own readers return: a channel-first ``MetaTensor`` ``(1, X, Y, Z)``
whose ``affine`` maps voxel indices to RAS world coordinates (``meta["space"] == "RAS"``).

* NIfTI (``.nii``, ``.nii.gz``): MONAI ``NibabelReader``; array and affine exactly as nibabel stores them.
* DICOM series (a folder): checked by :func:`inspect_dicom_series`, then read with MONAI ``ITKReader``
  (ITK/GDCM: RescaleSlope/Intercept applied, slices ordered along the slice normal
  ``row x column`` of ImageOrientationPatient, spacing from the slice positions).
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
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.data.image_reader import ImageReader
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform, Transform
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from .errors import DataError

__all__ = [
    "NpyStackReader",
    "DicomSeriesInfo",
    "dicom_series_info",
    "inspect_dicom_series",
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
# relative tolerance on slice spacing (a missing slice doubles one gap)
_SPACING_RTOL = 0.01


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


@dataclass
class DicomSeriesInfo:
    """Header summary of a checked single-series DICOM folder.

    Attributes:
        folder: the series folder.
        files: slice files ordered by position along the slice normal.
        modality: Modality (e.g. ``"MR"``, ``"CT"``).
        series_instance_uid: SeriesInstanceUID.
        series_description: SeriesDescription (may be empty).
        positions: slice positions along the normal in mm, ascending (LPS).
        first_position: ImagePositionPatient of the first slice (LPS, mm).
        spacing: ``(column spacing, row spacing, slice spacing)`` in mm, i.e. along MONAI's ``(X, Y, Z)``.
        shape: ``(Columns, Rows, slices)``, the array shape MONAI's readers return.
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


def _read_dicom(path: Path) -> pydicom.Dataset:
    """Read a whole DICOM file and check that its pixel data is complete.

    Raises:
        DataError: unreadable, truncated, not an image, multi-frame or without geometry tags.
    """
    try:
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)  # no preamble: accept only if it parses as an image below
    except Exception as e:
        raise DataError(path, f"cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
    if "PixelData" not in ds:
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
    if frames > 1:
        raise DataError(path, f"is a multi-frame DICOM ({frames} frames); only single-frame series are supported")
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax is None or not syntax.is_compressed:
        # native pixel data: exact length (plus one pad byte for odd lengths)
        expected = rows * cols * samples * frames * bits // 8
        got = len(ds.PixelData)
        if not expected <= got <= expected + 1:
            raise DataError(
                path,
                f"cannot be read (truncated or corrupt?): PixelData has {got} bytes, expected {expected} "
                f"(Rows {rows} x Columns {cols} x SamplesPerPixel {samples} x BitsAllocated {bits}/8)",
            )
    del ds.PixelData  # checked; keep only the header in memory (ITK reads the pixels later)
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise DataError(path, "has no ImagePositionPatient/ImageOrientationPatient: cannot place the slice in 3D")
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    except (TypeError, ValueError) as e:
        raise DataError(path, f"has unreadable ImagePositionPatient/ImageOrientationPatient: {e}") from e
    if ipp.shape != (3,) or iop.shape != (6,) or not (np.isfinite(ipp).all() and np.isfinite(iop).all()):
        raise DataError(
            path, f"has invalid ImagePositionPatient {ipp.tolist()} / ImageOrientationPatient {iop.tolist()}"
        )
    if abs(np.linalg.norm(np.cross(iop[:3], iop[3:])) - 1.0) > 1e-3:
        raise DataError(path, f"has an ImageOrientationPatient that is not two orthonormal vectors: {iop.tolist()}")
    return ds


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


def dicom_series_info(folder: PathLike) -> DicomSeriesInfo:
    """Check a single-series DICOM folder from its headers and return a summary.

    Reads every file in ``folder`` (not recursive; hidden files and obvious non-DICOM files such as
    DICOMDIR, ``.json`` and ``.txt`` are skipped) fully with pydicom.

    Args:
        folder: a folder holding the slice files of one series.

    Returns:
        The series summary, files ordered by position along the slice normal.

    Raises:
        DataError: the folder is missing or has no DICOM files; a file is unreadable or truncated;
            several series; inconsistent slice size/orientation; duplicated slice positions;
            uneven slice spacing (e.g. a missing slice); fewer than 2 slices.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(folder, "folder does not exist")
    if not folder.is_dir():
        raise DataError(folder, "is not a folder")
    files = _candidate_files(folder)
    if not files:
        raise DataError(folder, "contains no DICOM files")
    headers = [(f, _read_dicom(f)) for f in files]
    _check_single_series(folder, headers)

    first = headers[0][1]
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    size = (int(first.Rows), int(first.Columns))
    pixel_spacing = np.asarray(first.get("PixelSpacing", (1.0, 1.0)), dtype=np.float64)
    for f, ds in headers[1:]:
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise DataError(
                folder, f"slices have different sizes: {files[0].name} {size}, {f.name} {(ds.Rows, ds.Columns)}"
            )
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise DataError(folder, f"slices have different ImageOrientationPatient ({files[0].name}, {f.name})")
        if not np.allclose(np.asarray(ds.get("PixelSpacing", (1.0, 1.0)), dtype=np.float64), pixel_spacing, rtol=1e-4):
            raise DataError(folder, f"slices have different PixelSpacing ({files[0].name}, {f.name})")
    if len(headers) < 2:
        raise DataError(folder, f"has only {len(headers)} slice ({files[0].name}): not a 3D volume")

    # order by position along the slice normal
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in headers])
    pos = ipp @ normal
    order = np.argsort(pos, kind="stable")
    pos, ipp = pos[order], ipp[order]
    files = [headers[i][0] for i in order]
    gaps = np.diff(pos)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise DataError(folder, f"duplicated slice position {pos[i]:.4g} mm: {files[i].name} and {files[i + 1].name}")
    median = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - median) > _SPACING_RTOL * median)
    if bad.size:
        i = int(bad[0])
        raise DataError(
            folder,
            f"inconsistent slice spacing: {gaps[i]:.4g} mm between {files[i].name} and {files[i + 1].name}, "
            f"median {median:.4g} mm (missing slice?)",
        )
    lateral = np.linalg.norm(np.cross(ipp[-1] - ipp[0], normal)) / max(pos[-1] - pos[0], 1e-6)
    if lateral > 1e-3:
        logger.warning("%s: slices are not stacked along their normal (gantry tilt?); geometry is approximate", folder)

    info = DicomSeriesInfo(
        folder=folder,
        files=files,
        modality=str(first.get("Modality", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        series_description=str(first.get("SeriesDescription", "")),
        positions=pos.tolist(),
        first_position=tuple(float(v) for v in ipp[0]),
        spacing=(float(pixel_spacing[1]), float(pixel_spacing[0]), median),
        shape=(size[1], size[0], len(files)),
    )
    logger.info(
        "%s: %s series %s, %d slices, spacing %s mm", folder, info.modality, info.series_instance_uid,
        len(files), tuple(round(s, 4) for s in info.spacing),
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


# ------------------------------------------------------------------------------------------ loader


class LoadVolume(Transform):
    """Load a 3D volume from a NIfTI file, a DICOM series folder or a ``.npy`` stack, and check it.

    Returns a float32 channel-first ``MetaTensor`` ``(1, X, Y, Z)`` with MONAI metadata (RAS
    ``affine``, ``original_affine``, ``spatial_shape``, ``filename_or_obj``; DICOM adds ``modality``).
    Every problem is a :class:`DataError` naming the file or folder.

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
        self.dicom_reader = ITKReader()
        with warnings.catch_warnings():
            # LoadImage instantiates every MONAI reader; the GPU DICOM one warns when nvImageCodec is absent
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            self._load = LoadImage(image_only=True, dtype=dtype, ensure_channel_first=False)
        self._channel_first = EnsureChannelFirst()

    def _reader_for(self, path: Path) -> ImageReader:
        if not path.exists():
            raise DataError(path, "does not exist")
        if path.is_dir():
            return self.dicom_reader
        if _has_suffix(path, NIFTI_SUFFIXES):
            return self.nifti_reader
        if _has_suffix(path, NPY_SUFFIXES):
            return self.npy_reader
        if _has_suffix(path, (".dcm", ".ima")):
            raise DataError(path, "is a single DICOM file; pass the folder holding the whole series")
        raise DataError(path, "unsupported file type (expected .nii, .nii.gz, .npy or a DICOM series folder)")

    def __call__(self, path: PathLike) -> MetaTensor:
        """Load and check one volume.

        Args:
            path: a ``.nii``/``.nii.gz``/``.npy`` file or a folder holding one DICOM series.

        Returns:
            A float32 ``MetaTensor`` ``(1, X, Y, Z)``.

        Raises:
            DataError: missing, unsupported, unreadable, not 3D, or non-finite voxels.
        """
        path = Path(os.fspath(path)).expanduser()
        reader = self._reader_for(path)
        info = dicom_series_info(path) if reader is self.dicom_reader else None
        try:
            img = self._load(str(path), reader=reader)
        except Exception as e:
            raise DataError(path, f"cannot be read (truncated or corrupt?): {type(e).__name__}: {e}") from e
        if info is not None:
            self._check_dicom_geometry(img, info)
            img.meta["modality"] = info.modality

        # exactly 3 spatial dims of size > 1 (a trailing singleton 4th dim, e.g. one time point, is fine)
        shape = tuple(img.shape)
        core = shape
        while len(core) > 3 and core[-1] == 1:
            core = core[:-1]
        if len(core) != 3 or min(core) < 2:
            raise DataError(path, f"is not a 3D volume (shape {shape})")
        img = self._channel_first(img)
        if tuple(img.shape) != (1, *core):
            raise DataError(path, f"is not a 3D volume (shape {shape})")

        finite = torch.isfinite(img)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(img).sum())
            n_bad = int((~finite).sum())
            raise DataError(path, f"contains {n_bad} NaN/Inf voxels ({n_nan} NaN, {n_bad - n_nan} Inf)")
        return img

    @staticmethod
    def _check_dicom_geometry(img: MetaTensor, info: DicomSeriesInfo) -> None:
        """Cross-check what ITK read against the pydicom header scan (slice count, origin)."""
        if tuple(img.shape[-3:]) != info.shape:
            raise DataError(info.folder, f"ITK read shape {tuple(img.shape)} but the DICOM headers give {info.shape}")
        origin_ras = np.asarray(info.first_position) * np.array([-1.0, -1.0, 1.0])
        got = np.asarray(img.affine[:3, 3], dtype=np.float64)
        if not np.allclose(got, origin_ras, atol=1e-3):
            raise DataError(
                info.folder, f"ITK origin {got.tolist()} differs from the first slice {origin_ras.tolist()}"
            )


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
