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

__all__ = ["atomic_path", "atomic_write_json", "atomic_torch_save", "atomic_write_text", "default_mode", "is_temporary"]

#: the process umask, read once (``os.umask`` can only be read by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def default_mode(directory: bool = False) -> int:
    """The permissions ``open`` (``0o666``) or ``mkdir`` (``0o777``) would give, less the umask.

    ``mkstemp``/``mkdtemp`` make owner-only temporaries; renamed as they are, outputs on shared storage would be
    hidden from the rest of the team (and from a MONAI Label server running as another user). Writers chmod a
    temporary to this before renaming it onto its final name.
    """
    return (0o777 if directory else 0o666) & ~_UMASK


def _final_mode(dest: Path) -> int:
    """Permissions of the file written onto ``dest``: those of the file it replaces, else :func:`default_mode`."""
    try:
        return dest.stat().st_mode & 0o7777
    except OSError:
        return default_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the permissions of the file it replaces, or the usual ``0o666`` less the umask for a new one.

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
        if tmp_path.exists():
            os.chmod(tmp_path, _final_mode(dest))
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
