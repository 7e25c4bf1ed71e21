# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""File writers shared by data preparation and inference: NIfTI volumes, PNG slice mosaics, affines from geometry.

They live in :mod:`meddiff.data` so that data tools (demo sets) and the sampling workflows both use them
without ``meddiff.data`` importing ``meddiff.sampling`` (sampling imports data, never the reverse).

Affines follow MONAI's convention for images read by ``LoadImage`` (``NibabelReader``, or ``ITKReader`` with its
default ``affine_lps_to_ras=True``): a 4x4 voxel-to-world matrix in RAS+ world coordinates, which is also NIfTI's
convention, so they are written to the NIfTI sform/qform unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from ..utils.atomic import atomic_path

__all__ = ["LABEL_COLOURS", "affine_from_geometry", "save_mosaic_png", "save_nifti", "save_overlay_mosaic_png"]

logger = logging.getLogger(__name__)

_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _spatial_volume(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(X, Y, Z)`` numpy view of a ``(X, Y, Z)`` or ``(1, X, Y, Z)`` volume."""
    arr = _to_numpy(volume)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a (X, Y, Z) or (1, X, Y, Z) volume, got shape {tuple(arr.shape)}.")
    return arr


def _as_affine(affine: np.ndarray | torch.Tensor | None) -> np.ndarray:
    aff = np.eye(4) if affine is None else _to_numpy(affine).astype(np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}.")
    return aff


def save_nifti(
    volume: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor | None,
    path: str | os.PathLike,
    dtype: np.dtype | type = np.float32,
    description: str | None = None,
) -> Path:
    """Write a volume as NIfTI-1 (``.nii`` or ``.nii.gz``) atomically.

    Args:
        volume: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` array or tensor.
        affine: 4x4 voxel-to-world matrix in RAS+ (as carried by MONAI ``MetaTensor.affine``); written to both
            sform and qform (code 1, scanner). ``None``: the volume's own ``affine`` if it has one, else identity.
        path: destination file; its suffix selects compression. Parent folders are created.
        dtype: on-disk data type. Integer types: values are rounded, NaN set to 0, and clipped to the type's range.
        description: the header's ``descrip`` (ASCII, at most 80 bytes), e.g. a generated volume's
            ``"SYNTHETIC meddiff rflow10 seed=3"``; ``None``: left empty.

    Returns:
        The destination path.

    Raises:
        ValueError: if the volume or affine has the wrong shape, or ``description`` is not ASCII or longer than
            80 bytes.
    """
    descrip = None
    if description is not None:
        if not description.isascii() or len(description) > 80:
            raise ValueError(f"description (NIfTI descrip) must be ASCII and at most 80 bytes, got "
                             f"{len(description.encode())} bytes: {description!r}.")
        descrip = description.encode("ascii")
    if affine is None:
        affine = getattr(volume, "affine", None)
    aff = _as_affine(affine)
    data = _spatial_volume(volume)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        # one working copy, rounded and clipped in place (float32 is exact for <= 16-bit integers: a 512x512x256
        # volume then needs 0.27 GB here instead of several float64 temporaries)
        data = np.array(data, dtype=np.float64 if dtype.itemsize > 2 else np.float32)
        np.nan_to_num(data, copy=False, nan=0.0)
        np.clip(np.rint(data, out=data), info.min, info.max, out=data)
    data = np.ascontiguousarray(data.astype(dtype, copy=False))
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units(xyz="mm")
    if descrip is not None:
        img.header["descrip"] = descrip
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    logger.debug("Wrote NIfTI %s %s %s.", path, data.shape, dtype)
    return Path(path)


def _display(slice2d: np.ndarray, radiological: bool) -> np.ndarray:
    """Voxel slice ``(a, b)`` -> display ``(rows, cols)``: rows = ``b`` decreasing, cols = ``a`` (decreasing if radiological)."""
    img = slice2d.T[::-1]
    return img[:, ::-1] if radiological else img


def save_mosaic_png(
    volume: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    num_slices: int = 16,
    columns: int = 4,
    window: tuple[float, float] | None = None,
    axis: int = -1,
    radiological: bool = True,
    affine: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write evenly spaced slices of a volume as a grid PNG (8-bit grey), atomically.

    Display orientation: with voxel axes in RAS order, each tile shows the slice with the higher-index remaining
    axis pointing up and the lower-index one pointing left (``radiological=True``), i.e. like a radiology viewer:
    axial (``axis=-1``): anterior up, patient right on the image left; coronal (``axis=1``): superior up, patient
    right on the left; sagittal (``axis=0``): superior up, anterior on the left. ``radiological=False`` mirrors the
    tiles left-right (neurological convention). The volume is used in voxel order unless ``affine`` is given, in
    which case it is first reoriented to the closest RAS voxel order. Voxel spacing is ignored (no resampling).

    Slices are the centres of ``num_slices`` equal bins along ``axis`` (all slices if there are fewer), laid out
    row by row, ``columns`` per row; unused tiles are black.

    Args:
        volume: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` array or tensor.
        path: destination ``.png`` (parent folders are created).
        num_slices: number of slices to show.
        columns: tiles per row.
        window: ``(low, high)`` intensities mapped to 0 and 255; default: the volume's 0.5th and 99.5th percentiles.
        axis: spatial axis to slice along (``0``, ``1``, ``2`` or negative).
        radiological: show the lower-index in-plane axis increasing to the left (see above).
        affine: optional 4x4 affine; if given, the volume is reoriented to RAS voxel order first.

    Returns:
        The destination path.

    Raises:
        ValueError: on a bad shape, axis, count or window.
    """
    arr = _spatial_volume(volume).astype(np.float32)
    if affine is not None:
        arr = nib.orientations.apply_orientation(arr, nib.orientations.io_orientation(_as_affine(affine)))
    if not -3 <= axis <= 2:
        raise ValueError(f"axis must be in [-3, 2], got {axis}.")
    if num_slices < 1 or columns < 1:
        raise ValueError(f"num_slices and columns must be positive, got {num_slices}, {columns}.")
    arr = np.moveaxis(arr, axis, -1)
    n = arr.shape[-1]
    if n <= num_slices:
        index = np.arange(n)
    else:
        index = np.floor((np.arange(num_slices) + 0.5) * n / num_slices).astype(int)
    if window is None:
        finite = arr[np.isfinite(arr)]
        low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    else:
        low, high = window
    low, high = float(low), float(high)
    if not math.isfinite(low) or not math.isfinite(high) or high < low:
        raise ValueError(f"window must be finite with low <= high, got {(low, high)}.")
    scale = 255.0 / (high - low) if high > low else 0.0
    tiles = [_display(arr[..., i], radiological) for i in index]
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    th, tw = tiles[0].shape
    canvas = np.zeros((rows * th, cols * tw), dtype=np.float32)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        canvas[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = tile
    pixels = np.clip(np.rint((np.nan_to_num(canvas, nan=low) - low) * scale), 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    logger.debug("Wrote mosaic %s (%d slices along axis %d).", path, len(tiles), axis)
    return Path(path)


#: RGB colours of label values 1, 2, ... in :func:`save_overlay_mosaic_png` (cycled)
LABEL_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180))


def save_overlay_mosaic_png(
    volume: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    num_slices: int = 16,
    columns: int = 4,
    alpha: float = 0.35,
    axis: int = -1,
    radiological: bool = True,
    affine: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write an image/label pair as an RGB mosaic: the image's slices (as :func:`save_mosaic_png`, grey, window
    = the 0.5th-99.5th percentiles) with each label value > 0 blended in a colour (:data:`LABEL_COLOURS`).

    Args:
        volume: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` image.
        label: integer label map of the same spatial shape (0 = background, not coloured).
        path: destination ``.png`` (parent folders are created).
        num_slices: number of slices to show.
        columns: tiles per row.
        alpha: opacity of the label colours, in [0, 1].
        axis: spatial axis to slice along.
        radiological: as in :func:`save_mosaic_png`.
        affine: optional 4x4 affine of both; if given, both are reoriented to RAS voxel order first.

    Returns:
        The destination path.

    Raises:
        ValueError: image and label shapes differ, or a bad ``alpha`` (other arguments as
            :func:`save_mosaic_png`).
    """
    image, labels = _spatial_volume(volume).astype(np.float32), np.rint(_spatial_volume(label)).astype(np.int64)
    if image.shape != labels.shape:
        raise ValueError(f"image and label shapes differ: {image.shape} vs {labels.shape}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    # the same layout as save_mosaic_png: grey image mosaic, then the label values through the identical tiling
    with tempfile.TemporaryDirectory() as work:
        grey_file, label_file = Path(work) / "grey.png", Path(work) / "label.png"
        save_mosaic_png(image, grey_file, num_slices, columns, None, axis, radiological, affine)
        # label values 0..255 as 8-bit grey through the identity window: the same tiles as the image
        save_mosaic_png(np.clip(labels, 0, 255).astype(np.float32), label_file, num_slices, columns, (0.0, 255.0),
                        axis, radiological, affine)
        grey = np.asarray(Image.open(grey_file), dtype=np.float32)
        tiled = np.asarray(Image.open(label_file), dtype=np.int64)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value in np.unique(tiled[tiled > 0]):
        colour = np.asarray(LABEL_COLOURS[(int(value) - 1) % len(LABEL_COLOURS)], dtype=np.float32)
        where = tiled == value
        rgb[where] = (1 - alpha) * rgb[where] + alpha * colour
    with atomic_path(path) as tmp:
        Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).save(tmp, format="PNG")
    logger.debug("Wrote overlay mosaic %s.", path)
    return Path(path)


def affine_from_geometry(
    spacing: Sequence[float],
    axcodes: str = "RAS",
    origin: Sequence[float] | None = None,
    spatial_size: Sequence[int] | None = None,
) -> np.ndarray:
    """Build a 4x4 RAS+ voxel-to-world affine from spacing and orientation codes.

    Args:
        spacing: voxel size (mm) along the three voxel axes, positive.
        axcodes: direction each voxel axis points to, one of ``L/R``, ``P/A``, ``I/S`` each (e.g. ``"RAS"``,
            ``"LPS"``, ``"SAR"``); ``nibabel.aff2axcodes`` of the result returns them.
        origin: world coordinates (RAS+, mm) of voxel ``(0, 0, 0)``. Default: the volume centred on the world origin
            if ``spatial_size`` is given, else zeros.
        spatial_size: volume size ``(X, Y, Z)``, used only for the default origin.

    Returns:
        float64 array of shape ``(4, 4)``.

    Raises:
        ValueError: if the codes are invalid or the lengths/values are wrong.
    """
    codes = axcodes.upper() if isinstance(axcodes, str) else "".join(axcodes).upper()
    if len(spacing) != 3 or len(codes) != 3:
        raise ValueError(f"need three spacings and three axcodes, got {list(spacing)} and {axcodes!r}.")
    world = [next((w for w, pair in enumerate(_AXIS_LABELS) if c in pair), None) for c in codes]
    if None in world or sorted(world) != [0, 1, 2]:
        raise ValueError(f"axcodes must name each of L/R, P/A, I/S once, got {axcodes!r}.")
    sp = np.asarray(spacing, dtype=np.float64)
    if not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ValueError(f"spacing must be positive, got {list(spacing)}.")
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for v, (w, c) in enumerate(zip(world, codes)):
        affine[w, v] = sp[v] if c == _AXIS_LABELS[w][1] else -sp[v]
    if origin is not None:
        if len(origin) != 3:
            raise ValueError(f"origin must have three values, got {list(origin)}.")
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    elif spatial_size is not None:
        if len(spatial_size) != 3:
            raise ValueError(f"spatial_size must have three values, got {list(spatial_size)}.")
        centre = (np.asarray(spatial_size, dtype=np.float64) - 1.0) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre
    return affine
