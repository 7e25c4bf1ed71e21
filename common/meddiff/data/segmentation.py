# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Labelled segmentation data: Decathlon-style datalists and image/label loading with checks.

A labelled set is described by a JSON file in the Medical Segmentation Decathlon layout
(``{"training": [{"image": ..., "label": ...}], "validation": [...], "test": [...]}``, paths relative to
the file's folder or absolute), as written by :func:`meddiff.data.phantoms.write_breast_phantoms`.
Every problem is a :class:`~meddiff.data.errors.DataError` naming the offending file: a missing file,
an image/label pair whose shapes or geometry (affine) differ, or label values outside the declared
classes.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..utils.config import as_bool
from .class_labels import CLASS_KEY
from .errors import DataError
from .readers import LoadVolume

__all__ = ["LoadSegmentationPaird", "check_label_values", "load_labelled_datalist", "parse_label_names"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def parse_label_names(label_names: Mapping[str, Any]) -> dict[str, int]:
    """Normalise declared classes to ``{name: value}``.

    Accepts MONAI Label's ``{"breast": 1, "background": 0}`` and the metadata ``channel_def`` form
    ``{"0": "background", "1": "breast"}``.

    Args:
        label_names: the declared classes in either form.

    Returns:
        ``{name: integer value}``.

    Raises:
        ValueError: empty, or values that are not distinct non-negative integers.
    """
    if not label_names:
        raise ValueError("label_names is empty: declare the classes, e.g. {'background': 0, 'breast': 1}")
    items = dict(label_names)
    if all(str(k).isdigit() for k in items) and all(isinstance(v, str) for v in items.values()):
        items = {v: int(k) for k, v in items.items()}  # channel_def form
    try:
        names = {str(k): int(v) for k, v in items.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"label_names values must be integers, got {label_names}") from e
    if len(set(names.values())) != len(names) or min(names.values()) < 0:
        raise ValueError(f"label_names values must be distinct non-negative integers, got {label_names}")
    return names


def _resolve(path: str, base: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base / p


def load_labelled_datalist(
    datalist_file: PathLike,
    base_dir: PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    require_label: bool | str = True,
    require_split: str = "training",
) -> dict[str, list[dict[str, str]]]:
    """Read a Decathlon-style datalist and return its splits with absolute paths.

    ``require_split`` (``training`` by default) must be a non-empty list. ``validation`` is taken from the
    file when present, else split off
    ``training`` by a seeded shuffle (``val_fraction``, at least one case when there are two or more).
    ``test`` is returned if present (else an empty list). Files are checked to exist here, before any
    compute; their content is checked when loaded (:class:`LoadSegmentationPaird`).

    Args:
        datalist_file: the JSON file.
        base_dir: folder that relative paths are relative to (default: the JSON file's folder).
        val_fraction: fraction of ``training`` used for validation when the file has no ``validation``.
        seed: seed of that split.
        require_label: every item must have a ``label``.
        require_split: the split that must be present and non-empty (``"test"`` for evaluation).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, items ``{"image": ..., "label": ...}`` (plus
        the item's ``class_label`` when it has one).

    Raises:
        DataError: the file is missing or not a datalist, an item lacks a key, or a listed file is missing.
        ValueError: ``val_fraction`` outside ``[0, 1)``.
    """
    path = Path(datalist_file)
    if not path.is_file():
        raise DataError(path, "datalist file does not exist")
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(path, f"is not a readable JSON datalist: {e}") from e
    if not isinstance(content, dict) or not isinstance(content.get(require_split), list) or not content[require_split]:
        raise DataError(path, f"has no non-empty '{require_split}' list of {{'image': ..., 'label': ...}} items")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    base = Path(base_dir) if base_dir is not None else path.parent
    require_label = as_bool(require_label, "require_label")

    def items(key: str) -> list[dict[str, str]]:
        out = []
        for i, item in enumerate(content.get(key) or []):
            if not isinstance(item, dict) or "image" not in item or (require_label and "label" not in item):
                needed = "'image' and 'label'" if require_label else "'image'"
                raise DataError(path, f"{key}[{i}] needs {needed} entries, got {item!r}")
            resolved = {k: str(_resolve(v, base)) for k, v in item.items() if k in ("image", "label")}
            for k, v in resolved.items():
                if not Path(v).exists():
                    raise DataError(v, f"listed as {key}[{i}]['{k}'] in {path} but does not exist")
            if item.get(CLASS_KEY) is not None:  # the class of class + mask conditioning (ControlNet stage)
                resolved[CLASS_KEY] = str(item[CLASS_KEY])
            out.append(resolved)
        return out

    splits = {key: items(key) for key in ("training", "validation", "test")}
    if "validation" not in content and val_fraction > 0 and len(splits["training"]) >= 2 and require_split == "training":
        order = list(range(len(splits["training"])))
        random.Random(seed).shuffle(order)
        n_val = min(max(round(len(order) * val_fraction), 1), len(order) - 1)
        val_idx = set(order[:n_val])
        splits["validation"] = [x for i, x in enumerate(splits["training"]) if i in val_idx]
        splits["training"] = [x for i, x in enumerate(splits["training"]) if i not in val_idx]
    logger.info("%s: %d training, %d validation, %d test cases", path, len(splits["training"]),
                len(splits["validation"]), len(splits["test"]))
    return splits


def check_label_values(label: torch.Tensor | np.ndarray, label_names: Mapping[str, int], path: PathLike) -> None:
    """Raise unless every voxel of ``label`` is one of the declared class values.

    Args:
        label: the label volume.
        label_names: ``{name: value}`` of the declared classes.
        path: the label file, for the message.

    Raises:
        DataError: non-integer values, or values outside the declared classes.
    """
    values = torch.unique(torch.as_tensor(label).float()).tolist()
    fractional = [v for v in values if not float(v).is_integer()]
    if fractional:
        raise DataError(path, f"label has non-integer values {fractional[:5]}: is it an image rather than a mask?")
    allowed = set(label_names.values())
    extra = sorted(int(v) for v in values if int(v) not in allowed)
    if extra:
        declared = ", ".join(f"{v}: {k}" for k, v in sorted(label_names.items(), key=lambda kv: kv[1]))
        raise DataError(path, f"label values {extra} are outside the declared classes {{{declared}}}; "
                              "map them with label_mapping (e.g. {2: 1}) or fix the mask")


class LoadSegmentationPaird(MapTransform):
    """Load an image and (when present) its label with :class:`~meddiff.data.LoadVolume`, and check the pair.

    Checks, each a :class:`DataError` naming the label file: same array shape as the image, same
    geometry (4x4 affines equal within ``affine_atol`` mm), integer values within ``label_names``
    (after ``label_mapping``). Items without a label pass through image-only unless ``require_label``
    (e.g. unlabelled volumes for pre-training).

    Example config entry: ``{"_target_": "meddiff.data.segmentation.LoadSegmentationPaird",
    "label_names": {"background": 0, "breast": 1}, "label_mapping": {"2": 1}}``.

    Args:
        image_key: key of the image path.
        label_key: key of the label path.
        label_names: declared classes (``{name: value}`` or ``{"value": name}``).
        label_mapping: optional ``{source value: class value}`` applied to labels before the check,
            e.g. to merge fibroglandular tissue (2) and vessels (3) into the whole breast (1).
        require_label: raise if an item has no label.
        affine_atol: tolerance on the affine entries (mm for the translation).
        npy_spacing: voxel size of ``.npy`` stacks (see :class:`LoadVolume`).
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        label_names: Mapping[str, Any] | None = None,
        label_mapping: Mapping[Any, int] | None = None,
        require_label: bool | str = False,
        affine_atol: float = 1e-3,
        npy_spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.image_key = image_key
        self.label_key = label_key
        self.label_names = parse_label_names(label_names or {"background": 0, "foreground": 1})
        self.label_mapping = {int(k): int(v) for k, v in (label_mapping or {}).items()}
        self.require_label = as_bool(require_label, "require_label")
        self.affine_atol = float(affine_atol)
        self.loader = LoadVolume(npy_spacing=npy_spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load and check one item.

        Args:
            data: a dict with the image path and optionally the label path.

        Returns:
            A copy with ``MetaTensor`` volumes ``(1, X, Y, Z)`` in place of the paths.

        Raises:
            DataError: see the class docstring, or a bad file (see :class:`LoadVolume`).
        """
        d = dict(data)
        if self.image_key not in d:
            raise DataError(f"datalist item {dict(data)!r}", f"has no '{self.image_key}' entry")
        image_path = d[self.image_key]
        if isinstance(image_path, (str, os.PathLike)):
            d[self.image_key] = self.loader(image_path)
        if self.label_key not in d:
            if self.require_label:
                raise DataError(str(image_path), f"has no '{self.label_key}' in its datalist item")
            return d
        label_path = d[self.label_key]
        label = self.loader(label_path) if isinstance(label_path, (str, os.PathLike)) else label_path
        image = d[self.image_key]
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise DataError(str(label_path), f"label shape {tuple(label.shape[1:])} differs from its image "
                                             f"{image_path} {tuple(image.shape[1:])}")
        if isinstance(label, MetaTensor) and isinstance(image, MetaTensor):
            a_img = np.asarray(image.affine, dtype=np.float64)
            a_lab = np.asarray(label.affine, dtype=np.float64)
            diff = float(np.abs(a_img - a_lab).max())
            if diff > self.affine_atol:
                raise DataError(str(label_path), f"label geometry (affine) differs from its image {image_path} by up "
                                                 f"to {diff:.4g} (spacing, orientation or origin): resample the "
                                                 "label onto the image grid")
        if self.label_mapping:
            mapped = label.clone()
            for src, dst in self.label_mapping.items():
                mapped[label == src] = dst
            label = mapped
        check_label_values(label, self.label_names, label_path)
        d[self.label_key] = label
        return d
