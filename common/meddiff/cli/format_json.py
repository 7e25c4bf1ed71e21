# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""`meddiff format-json`: JSON files written the way the model zoo's pre-commit hook writes them.

The MONAI model zoo checks every JSON file with pre-commit-hooks' ``pretty-format-json --indent=4
--no-sort-keys``: the file must equal ``json.dumps(json.loads(text), indent=4) + "\\n"`` (keys kept in
their order, non-ASCII characters written as ``\\uXXXX`` escapes, one newline at the end). This module
produces exactly that text, rewrites files that differ (``--check`` only lists them) and skips files
that git ignores (run outputs such as ``bundles/*/models/*.json``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from meddiff.data.errors import DataError
from meddiff.utils import atomic_path

__all__ = ["find_json_files", "format_json_files", "pretty_json"]

logger = logging.getLogger(__name__)


def pretty_json(text: str, indent: int = 4, ensure_ascii: bool = True) -> str:
    """The text pre-commit-hooks' ``pretty-format-json --indent=<indent> --no-sort-keys`` accepts for ``text``.

    Args:
        text: a JSON document.
        indent: spaces per indentation level.
        ensure_ascii: write non-ASCII characters as ``\\uXXXX`` escapes (the hook's default; its
            ``--no-ensure-ascii`` is ``False``).

    Returns:
        The formatted document, ending in one newline.

    Raises:
        json.JSONDecodeError: ``text`` is not valid JSON.
    """
    return json.dumps(json.loads(text), indent=indent, ensure_ascii=ensure_ascii) + "\n"


def _git_ignored(files: Sequence[Path]) -> set[Path]:
    """Those of ``files`` that git ignores; none when git or a repository is not there."""
    if not files:
        return set()
    try:
        proc = subprocess.run(["git", "check-ignore", "--stdin", "-z"], input="\0".join(map(str, files)) + "\0",
                              capture_output=True, text=True, cwd=os.path.commonpath([f.parent for f in files]),
                              check=False)
    except OSError:
        return set()
    if proc.returncode not in (0, 1):  # 128: not inside a repository
        return set()
    root = Path(os.path.commonpath([f.parent for f in files]))
    return {(root / name).resolve() for name in proc.stdout.split("\0") if name}


def find_json_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The ``*.json`` files given, or found under the folders given (hidden folders and git-ignored files skipped).

    Args:
        paths: files and folders.

    Returns:
        Absolute paths, sorted, without duplicates.

    Raises:
        DataError: a path does not exist.
    """
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            for file in path.rglob("*.json"):
                rel = file.relative_to(path).parts
                if file.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel[:-1]):
                    found.add(file.resolve())
        else:
            raise DataError(path, "no such file or folder")
    files = sorted(found)
    ignored = _git_ignored(files)
    return [f for f in files if f not in ignored]


def format_json_files(
    paths: Iterable[str | os.PathLike], check: bool = False, indent: int = 4, ensure_ascii: bool = True
) -> list[Path]:
    """Rewrite (or, with ``check``, only find) the JSON files that are not formatted as :func:`pretty_json` says.

    Args:
        paths: files and folders (searched recursively for ``*.json``).
        check: list the files that would change without writing anything.
        indent: spaces per indentation level.
        ensure_ascii: write non-ASCII characters as ``\\uXXXX`` escapes.

    Returns:
        The files that were rewritten (or, with ``check``, need rewriting).

    Raises:
        DataError: a path does not exist, or a file is not UTF-8 JSON (the message names it and the position).
    """
    changed = []
    for file in find_json_files(paths):
        try:
            with open(file, encoding="utf-8") as f:  # text mode: "\r\n" reads as "\n", as in the hook
                text = f.read()
            pretty = pretty_json(text, indent=indent, ensure_ascii=ensure_ascii)
        except UnicodeDecodeError as e:
            raise DataError(file, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
        except json.JSONDecodeError as e:
            raise DataError(file, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
        if text != pretty:
            changed.append(file)
            if not check:
                with atomic_path(file, suffix="") as tmp:  # keeps the file's permissions
                    tmp.write_text(pretty, encoding="utf-8")
                logger.info("formatted %s", file)
    return changed
