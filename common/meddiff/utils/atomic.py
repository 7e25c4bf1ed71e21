# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Atomic writes: every file is written to a temporary sibling and renamed, so nothing is half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_path", "atomic_write_json", "atomic_torch_save", "atomic_write_text", "is_temporary"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Args:
        path: final destination.
        suffix: suffix of the temporary file after ``.tmp`` (defaults to the destination's full suffix,
            so writers that dispatch on the extension, such as nibabel, still work; pass ``""`` where the
            writer does not, so that a file left by a killed process never matches ``*.pt`` or ``*.json``).

    Raises:
        Whatever the block raises; the temporary file is removed first.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(dest.suffixes) if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an atomic writer's temporary file (``.name.XXXX.tmp…``), possibly left by a killed process."""
    name = Path(path).name
    return name.startswith(".") and ".tmp" in name


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path, suffix="") as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 4) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically and return the path."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically and return the path."""
    with atomic_path(path, suffix="") as tmp:
        torch.save(obj, tmp)
    return Path(path)
