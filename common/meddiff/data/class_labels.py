# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Class labels of the training volumes for class-conditioned generation: from the datalist or a CSV table."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError

__all__ = ["CLASS_KEY", "class_names_of", "read_labels_file", "volume_id", "with_class_labels"]

logger = logging.getLogger(__name__)

#: the datalist key holding an item's class name
CLASS_KEY = "class_label"
#: first-row cells that mark a header row of a labels CSV
_HEADER_CELLS = {"file", "filename", "image", "path", "case", "id", "case_id", "volume"}
_SUFFIXES = (".nii.gz", ".nii", ".npy", ".npz", ".mha", ".nrrd", ".dcm")


def volume_id(path: str | os.PathLike) -> str:
    """The name a labels CSV uses for a volume: the file or folder name without its image extension.

    ``/data/0007.npy`` -> ``0007``; ``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``; a DICOM series folder -> its name.
    """
    name = Path(str(path).rstrip("/\\")).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_labels_file(labels_file: str | os.PathLike) -> dict[str, str]:
    """Read a two-column CSV ``file,class`` (e.g. MRNet's ``train-abnormal.csv``: ``0000,0``).

    The first column names a volume (a file name, a path or an id without extension; matched by
    :func:`volume_id`), the second its class name (any text, e.g. ``0``/``1`` or ``healthy``/``lesion``).
    A first row whose first cell is ``file``, ``image``, ``path``, ``case``, ``id`` (or similar) is a header.
    Blank lines are skipped; further columns are ignored.

    Args:
        labels_file: the CSV file.

    Returns:
        Volume id -> class name.

    Raises:
        DataError: the file is missing, a row has fewer than two cells, an id appears twice with different
            classes, or the file holds no rows.
    """
    path = Path(labels_file)
    if not path.is_file():
        raise DataError(path, "labels_file not found")
    labels: dict[str, str] = {}
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if rows and rows[0][0].strip().lower() in _HEADER_CELLS:
        rows = rows[1:]
    for line, row in enumerate(rows, start=1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(path, f"row {line} {row!r} is not 'file,class' (labels_file)")
        key, name = volume_id(row[0].strip()), row[1].strip()
        if labels.get(key, name) != name:
            raise DataError(path, f"{key!r} has two classes, {labels[key]!r} and {name!r} (labels_file)")
        labels[key] = name
    if not labels:
        raise DataError(path, "holds no 'file,class' rows (labels_file)")
    return labels


def with_class_labels(
    items: Sequence[Mapping[str, Any]],
    num_classes: int = 0,
    labels_file: str | os.PathLike | None = None,
    source: str = "datalist",
) -> list[dict[str, Any]]:
    """Datalist items with their ``class_label`` (a class name), checked, for class-conditioned training.

    With ``num_classes == 0`` (unconditional) the items are returned as they are. Otherwise every item
    needs a class: from ``labels_file`` (see :func:`read_labels_file`) when given, else from the item's own
    ``class_label`` key (written by hand or by a tool into the datalist).

    Args:
        items: datalist items (``{"image": path, ...}``).
        num_classes: number of classes (0: unconditional, items untouched).
        labels_file: CSV ``file,class`` giving every item's class, or ``None`` to use the items' ``class_label``.
        source: what the items are, for messages (e.g. ``"training datalist"``).

    Returns:
        New item dicts, each with ``class_label`` set to a class name (a string).

    Raises:
        DataError: a volume missing from ``labels_file`` (the message names both).
        ValueError: ``num_classes`` negative, or an item without ``class_label`` and no ``labels_file``.
    """
    num_classes = int(num_classes)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}.")
    if num_classes == 0:
        return [dict(item) for item in items]
    table = None if labels_file is None else read_labels_file(labels_file)
    out = []
    for item in items:
        item = dict(item)
        if table is not None:
            key = volume_id(item["image"])
            if key not in table:
                raise DataError(Path(labels_file), f"has no row for {key!r} ({item['image']}); every {source} "
                                                   f"volume needs a class (labels_file)")
            item[CLASS_KEY] = table[key]
        elif item.get(CLASS_KEY) is None:
            raise ValueError(f"num_classes={num_classes} but the {source} item {item['image']} has no "
                             f"'{CLASS_KEY}': add one to every item of the datalist_file or give a labels_file CSV.")
        item[CLASS_KEY] = str(item[CLASS_KEY])
        out.append(item)
    if out:
        logger.info("%s: %d volumes in classes %s", source, len(out), class_names_of(out))
    return out


def class_names_of(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sorted distinct ``class_label`` values of datalist items (the class index order)."""
    return sorted({str(item[CLASS_KEY]) for item in items if item.get(CLASS_KEY) is not None})
