# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Find the volumes under a folder and write a MONAI (Decathlon-style) datalist JSON with a seeded split."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom

from ..utils.atomic import atomic_write_json
from .errors import DataError
from .readers import (
    NIFTI_SUFFIXES,
    NPY_SUFFIXES,
    LoadVolume,
    _candidate_files,
    _has_suffix,
    non_image_kind,
    verify_datalist,
)

__all__ = ["find_volumes", "make_datalist", "load_or_make_datalist", "VolumeFinder"]

#: finds the volumes under a data folder, e.g. :func:`find_volumes` or ``meddiff.data.find_ct_volumes``
VolumeFinder = Callable[[Path], list[Path]]

logger = logging.getLogger(__name__)


def _is_object(path: Path) -> bool:
    """Whether a DICOM file is a non-image object (RTSTRUCT, SEG, RTPLAN, SR...); unreadable files are not."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["Modality", "SOPClassUID"])
    except Exception:  # reported by the reader, naming the file
        return False
    return non_image_kind(header) is not None


def _holds_dicom(folder: Path, skip_objects: bool = False) -> bool:
    """Whether ``folder`` directly holds at least one DICOM file (``.dcm`` name or DICM magic).

    With ``skip_objects``, only DICOM image files count: a folder holding only non-image objects (an RTSTRUCT,
    SEG or SR series folder of a TCIA study) holds no volume (headers are read until the first image file).
    """
    objects = []
    for f in _candidate_files(folder):
        try:
            dicom = _has_suffix(f, (".dcm",)) or pydicom.misc.is_dicom(f)
        except OSError:
            continue
        if dicom and not (skip_objects and _is_object(f)):
            return True
        if dicom:
            objects.append(f.name)
    if objects:
        logger.info("%s: holds only non-image DICOM objects (%s), not a volume", folder, ", ".join(objects))
    return False


def find_volumes(data_dir: str | os.PathLike, skip_objects: bool = True) -> list[Path]:
    """Find every volume under ``data_dir`` (recursive; hidden files and folders are skipped).

    A volume is a ``.nii``/``.nii.gz``/``.npy`` file, or a folder directly holding DICOM image files (one
    folder = one series; its sub-folders are searched too). A folder holding only non-image DICOM objects
    (RTSTRUCT, SEG, RTPLAN, RTDOSE, SR, PR...; :func:`~meddiff.data.readers.non_image_kind`) is not a volume.

    Args:
        data_dir: the folder to search.
        skip_objects: leave out folders holding only non-image DICOM objects (``False``: every folder holding
            DICOM files, as the CT series selection lists them).

    Returns:
        The volume paths, sorted.

    Raises:
        DataError: ``data_dir`` does not exist or is not a folder.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(root, "folder does not exist" if not root.exists() else "is not a folder")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        here = Path(dirpath)
        found += [
            here / name
            for name in filenames
            if not name.startswith(".") and _has_suffix(name, NIFTI_SUFFIXES + NPY_SUFFIXES)
        ]
        if filenames and _holds_dicom(here, skip_objects):
            if dirnames:
                logger.warning("%s: holds DICOM files and sub-folders; using it as one series", here)
            found.append(here)
    return sorted(found)


def _split(n: int, val_fraction: float, seed: int) -> set[int]:
    """Indices of the validation items: a seeded shuffle, at least one when ``n >= 2`` and ``val_fraction > 0``."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:n_val])


def make_datalist(
    data_dir: str | os.PathLike,
    output_file: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    relative: bool = True,
    npy_spacing: Sequence[float] | None = None,
    verify: bool = False,
    volume_finder: VolumeFinder | None = None,
) -> dict[str, Any]:
    """Write a MONAI datalist JSON for the volumes under ``data_dir``.

    The file is ``{"training": [{"image": ...}], "validation": [...], "meddiff": {...}}``, written
    atomically. The split is a seeded shuffle (the same ``seed`` and files give the same split). With
    ``relative=True`` paths are relative to ``data_dir``, so
    ``monai.data.load_decathlon_datalist(output_file, data_list_key="training", base_dir=data_dir)``
    resolves them.

    Args:
        data_dir: folder holding the volumes (see :func:`find_volumes`).
        output_file: the JSON file to write.
        val_fraction: fraction of volumes for validation, in ``[0, 1)``; at least one when there are
            two or more volumes and ``val_fraction > 0``.
        seed: seed of the split.
        relative: write paths relative to ``data_dir`` (else absolute).
        npy_spacing: voxel size ``(x, y, z)`` of ``.npy`` stacks, recorded in the ``meddiff`` section
            (and used by ``verify``).
        verify: also load every volume with :class:`~meddiff.data.LoadVolume` before writing.
        volume_finder: called as ``volume_finder(data_dir)`` to list the volumes; default
            :func:`find_volumes` (every volume). ``meddiff.data.find_ct_volumes`` picks one CT series
            per patient in DICOM trees.

    Returns:
        The datalist dict that was written.

    Raises:
        DataError: ``data_dir`` is missing or holds no volumes, or (with ``verify``) a volume is bad.
        ValueError: ``val_fraction`` out of range.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(data_dir)
    volumes = (volume_finder or find_volumes)(root)
    if not volumes:
        raise DataError(root, "contains no volumes (.nii, .nii.gz, .npy files or DICOM series folders)")
    if verify:
        verify_datalist([{"image": str(v)} for v in volumes], loader=LoadVolume(npy_spacing=npy_spacing))

    def entry(path: Path) -> dict[str, str]:
        return {"image": path.relative_to(root).as_posix() if relative else str(path.resolve())}

    val_idx = _split(len(volumes), float(val_fraction), int(seed))
    datalist: dict[str, Any] = {
        "training": [entry(v) for i, v in enumerate(volumes) if i not in val_idx],
        "validation": [entry(v) for i, v in enumerate(volumes) if i in val_idx],
        "meddiff": {
            "data_dir": str(root.resolve()),
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "relative": bool(relative),
            "npy_spacing": [float(s) for s in npy_spacing] if npy_spacing is not None else None,
            "num_training": len(volumes) - len(val_idx),
            "num_validation": len(val_idx),
        },
    }
    atomic_write_json(output_file, datalist)
    logger.info(
        "wrote %s: %d training, %d validation volumes from %s",
        output_file,
        len(datalist["training"]),
        len(datalist["validation"]),
        root,
    )
    return datalist


def load_or_make_datalist(
    data_dir: str | os.PathLike,
    datalist_file: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    npy_spacing: Sequence[float] | None = None,
    volume_finder: VolumeFinder | None = None,
) -> dict[str, list[dict[str, str]]]:
    """The training/validation split a workflow uses, with absolute paths.

    The first workflow run on a data folder checks every volume and writes the split to
    ``datalist_file`` (next to the checkpoints); later stages (diffusion, evaluation) reuse it, so
    all stages see the same split. A ``datalist_file`` made for another folder is an error, not a
    silent reuse.

    Args:
        data_dir: folder holding the volumes.
        datalist_file: the split file to reuse or write.
        val_fraction: fraction of volumes for validation (only when the file is made).
        seed: seed of the split (only when the file is made).
        npy_spacing: voxel size of ``.npy`` stacks, for the check.
        volume_finder: lists the volumes of ``data_dir`` (only when the file is made); default
            :func:`find_volumes`.

    Returns:
        ``{"training": [{"image": abs_path, ...}], "validation": [...]}`` (other keys of the items kept).

    Raises:
        DataError: no volumes, a bad volume, or a split file made for another folder.
    """
    root = Path(data_dir).resolve()
    path = Path(datalist_file)
    if path.is_file():
        datalist = json.loads(path.read_text())
        made_for = datalist.get("meddiff", {}).get("data_dir")
        if made_for is not None and Path(made_for).resolve() != root:
            raise DataError(path, f"was made for data folder {made_for}, not {root}; delete it or pass another "
                                  "--datalist_file")
        logger.info("reusing the split in %s", path)
    else:
        datalist = make_datalist(root, path, val_fraction=val_fraction, seed=seed, relative=True,
                                 npy_spacing=npy_spacing, verify=True, volume_finder=volume_finder)
    # keep the items' other keys (e.g. a hand-written "class_label" for class-conditioned training)
    return {key: [{**item, "image": str(root / item["image"])} for item in datalist[key]]
            for key in ("training", "validation")}
