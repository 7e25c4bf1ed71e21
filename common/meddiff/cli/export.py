# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""`meddiff export`: a self-contained copy of a bundle that runs where meddiff is not installed.

``meddiff export --zoo --weights_url BASE`` writes a model-zoo submission instead: the same copy without
the weight files, whose ``large_files.yml`` gives each one's download URL (``BASE/<file name>``) and
SHA-256, as the zoo's CI (``monai.apps.download_url`` per entry) wants. In this repository the small demo
weights are committed, so the bundles list them in ``weights.sha256`` (``sha256sum -c`` format) rather than
as url-less download entries.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import meddiff
from meddiff.data.errors import DataError
from meddiff.utils import atomic_write_json, atomic_write_text

__all__ = ["WEIGHTS_MANIFEST", "export_bundle", "meddiff_requirements", "read_weights_manifest", "sha256_of",
           "write_weights_manifest"]

logger = logging.getLogger(__name__)

#: the bundle's list of shipped weight files and their SHA-256 (``sha256sum -c weights.sha256`` in the bundle)
WEIGHTS_MANIFEST = "weights.sha256"

_IGNORE_CODE = shutil.ignore_patterns("__pycache__", "*.pyc")
_IGNORE_BUNDLE = shutil.ignore_patterns("__pycache__", "*.pyc", "outputs", "eval", "checkpoints", "*_log.jsonl")
_MANIFEST_LINE = re.compile(r"^([0-9a-f]{64}) [ *](\S.*)$")


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks.

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_weights_manifest(bundle_dir: str | os.PathLike, paths: Sequence[str]) -> Path:
    """Write ``bundle_dir/weights.sha256`` for ``paths`` (relative to the bundle), as ``sha256sum`` writes it.

    Args:
        bundle_dir: the bundle folder.
        paths: the shipped files, e.g. ``["models/model.pt", "models/model.json"]``.

    Returns:
        The manifest file.

    Raises:
        DataError: a listed file is missing.
    """
    root = Path(bundle_dir)
    lines = []
    for rel in paths:
        if not (root / rel).is_file():
            raise DataError(root / rel, f"is listed for {WEIGHTS_MANIFEST} but missing")
        lines.append(f"{sha256_of(root / rel)}  {PurePosixPath(rel)}")
    return atomic_write_text(root / WEIGHTS_MANIFEST, "\n".join(lines) + "\n")


def read_weights_manifest(bundle_dir: str | os.PathLike, check: bool = False) -> dict[str, str]:
    """Read ``bundle_dir/weights.sha256``; with ``check``, also compare every file's SHA-256 with it.

    Args:
        bundle_dir: the bundle folder.
        check: hash the files and raise on a missing file or a mismatch.

    Returns:
        ``{relative path: sha256}`` in the manifest's order.

    Raises:
        DataError: no manifest, a malformed line, a path outside the bundle, or (``check``) a missing or
            changed file.
    """
    root = Path(bundle_dir)
    manifest = root / WEIGHTS_MANIFEST
    if not manifest.is_file():
        raise DataError(manifest, "is missing: it lists the bundle's shipped weights and their SHA-256")
    entries: dict[str, str] = {}
    for num, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line)
        if match is None:
            raise DataError(manifest, f"line {num} is not '<sha256>  <path>' (sha256sum format): {line!r}")
        digest, rel = match.groups()
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or ".." in parts:
            raise DataError(manifest, f"line {num}: {rel} must be a relative path inside the bundle")
        entries[rel] = digest
    if not entries:
        raise DataError(manifest, "lists no files")
    if check:
        for rel, digest in entries.items():
            if not (root / rel).is_file():
                raise DataError(root / rel, f"is listed in {WEIGHTS_MANIFEST} but missing")
            actual = sha256_of(root / rel)
            if actual != digest:
                raise DataError(root / rel, f"has SHA-256 {actual}, but {WEIGHTS_MANIFEST} says {digest}: "
                                            "a changed file would be published under the old hash")
    return entries


#: dependencies the zoo metadata pins under keys of their own (``pytorch_version`` ...), not in ``*_packages_version``
_PINNED_APART = {"torch", "monai", "numpy"}
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def meddiff_requirements() -> dict[str, str]:
    """meddiff's runtime dependencies (no extras) as ``{distribution name: installed version}``.

    An exported bundle carries the meddiff package, not meddiff's installed distribution, so its metadata must
    declare what meddiff itself needs. torch, MONAI and NumPy are left out: the zoo's metadata pins them apart.

    Returns:
        The dependencies, lower-case names as PyPI normalises them.

    Raises:
        RuntimeError: meddiff is not installed as a distribution, or one of its dependencies is not installed.
    """
    try:
        declared = importlib.metadata.requires("meddiff") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("meddiff is not installed (pip install -e .), so its dependencies are unknown") from None
    versions = {}
    for line in declared:
        requirement, _, marker = line.partition(";")
        if "extra" in marker:
            continue
        name = _REQUIREMENT_NAME.match(requirement).group(0)
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in _PINNED_APART:
            continue
        try:
            versions[key] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"meddiff needs {line!r}, which is not installed here") from None
    return versions


def _declare_meddiff_requirements(meta: dict) -> None:
    """Replace ``meddiff`` in the metadata's package lists by its own dependencies (required, as meddiff was)."""
    required = meta.setdefault("required_packages_version", {})
    optional = meta.get("optional_packages_version", {})
    for key in ("required_packages_version", "optional_packages_version"):
        meta.get(key, {}).pop("meddiff", None)  # carried inside the bundle, nothing to install
    for name, version in meddiff_requirements().items():
        if name not in required:
            required[name] = optional.get(name, version)


def _write_large_files(staging: Path, entries: dict[str, str], weights_url: str) -> dict[str, str]:
    """Write ``staging/large_files.yml`` with path, url and sha256 of each entry; returns path -> url."""
    base = weights_url.rstrip("/")
    names: dict[str, str] = {}
    for rel in entries:
        name = PurePosixPath(rel).name
        if name in names:
            raise DataError(staging.name, f"{rel} and {names[name]} share the file name {name}: "
                                          "their URLs under --weights_url would collide")
        names[name] = rel
    urls = {rel: f"{base}/{PurePosixPath(rel).name}" for rel in entries}
    lines = ["# Downloaded by the model zoo's CI and by `python -m monai.bundle download_large_files` "
             "(monai.apps.download_url checks each SHA-256).",
             "# Written by `meddiff export --zoo`.",
             "large_files:"]
    for rel, digest in entries.items():
        lines += [f"  - path: {json.dumps(rel)}", f"    url: {json.dumps(urls[rel])}",
                  f"    hash_val: {json.dumps(digest)}", '    hash_type: "sha256"']
    atomic_write_text(staging / "large_files.yml", "\n".join(lines) + "\n")
    return urls


def export_bundle(bundle_dir: str, output_dir: str, with_weights: bool = True, zoo: bool = False,
                  weights_url: str | None = None) -> str:
    """Copy ``bundle_dir`` to ``output_dir`` with the ``meddiff`` package inside its root.

    MONAI's ``ConfigWorkflow.run`` puts the bundle root on ``sys.path``, so the configs' full
    ``meddiff.*`` ``_target_`` paths resolve to the copy (MONAI Label and the model zoo load
    bundles this way). ``metadata.json`` records the meddiff version the copy carries and, in place of
    ``meddiff``, requires meddiff's own dependencies at their installed versions.

    With ``zoo``, the copy is a model-zoo submission: the files listed in ``weights.sha256`` are checked
    against their hashes and left out, and ``large_files.yml`` lists each with ``url``
    (``weights_url/<file name>``: upload the bundle's files there), ``hash_val`` and ``hash_type: sha256``.

    Args:
        bundle_dir: the bundle folder (holding ``configs/``).
        output_dir: the new bundle folder; must not exist.
        with_weights: also copy ``models/*.pt`` and ``models/*.json`` (not training checkpoints).
        zoo: write a model-zoo submission (no weight files; ``large_files.yml`` with URLs).
        weights_url: with ``zoo``: the URL of the folder the weight files are uploaded to
            (``https://...``, or ``file://...`` for a local test).

    Returns:
        The exported bundle folder.

    Raises:
        FileNotFoundError: ``bundle_dir`` has no ``configs/metadata.json``.
        FileExistsError: ``output_dir`` exists.
        ValueError: ``zoo`` without a ``weights_url`` with a scheme, or ``weights_url`` without ``zoo``.
        RuntimeError: meddiff's dependencies cannot be read from its installed distribution.
        DataError: (``zoo``) ``weights.sha256`` is missing or malformed, or a listed file is missing or changed.
    """
    src, dst = Path(bundle_dir), Path(output_dir)
    if not (src / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{src}: not a bundle (no configs/metadata.json)")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; export into a new folder")
    if weights_url is not None and not zoo:
        raise ValueError("--weights_url is only used with --zoo")
    entries: dict[str, str] = {}
    if zoo:
        if not weights_url or not urlparse(str(weights_url)).scheme:
            raise ValueError(f"--zoo needs --weights_url, the URL of the folder holding the weight files "
                             f"(e.g. https://host/releases/{src.resolve().name}_v1), got {weights_url!r}")
        entries = read_weights_manifest(src, check=True)
    staging = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging, ignore=_IGNORE_BUNDLE)
    try:
        if not with_weights:
            shutil.rmtree(staging / "models", ignore_errors=True)
        shutil.copytree(Path(meddiff.__file__).parent, staging / "meddiff", ignore=_IGNORE_CODE)
        meta_file = staging / "configs" / "metadata.json"
        meta = json.loads(meta_file.read_text())
        _declare_meddiff_requirements(meta)
        meta["meddiff_version"] = meddiff.__version__
        atomic_write_json(meta_file, meta, indent=4)
        if zoo:
            unlisted = sorted(str(p.relative_to(staging)) for p in (staging / "models").rglob("*")
                              if p.is_file() and p.relative_to(staging).as_posix() not in entries)
            if unlisted:
                logger.warning("left out of the submission (not in %s): %s", WEIGHTS_MANIFEST, ", ".join(unlisted))
            for rel in entries:
                (staging / rel).unlink(missing_ok=True)
            shutil.rmtree(staging / "models", ignore_errors=True)  # only the downloads go there
            (staging / WEIGHTS_MANIFEST).unlink()  # large_files.yml now holds the hashes
            urls = _write_large_files(staging, entries, str(weights_url))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.rename(dst)
    if zoo:
        for rel, url in urls.items():
            logger.info("upload %s to %s", src / rel, url)
    logger.info("exported %s to %s with meddiff %s inside%s", src, dst, meddiff.__version__,
                " (model-zoo submission: weights downloaded from large_files.yml)" if zoo else "")
    return str(dst)
