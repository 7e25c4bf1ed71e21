# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""`meddiff export`: a self-contained copy of a bundle that runs where meddiff is not installed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import meddiff
from meddiff.utils import atomic_write_json

__all__ = ["export_bundle"]

logger = logging.getLogger(__name__)

_IGNORE_CODE = shutil.ignore_patterns("__pycache__", "*.pyc")
_IGNORE_BUNDLE = shutil.ignore_patterns("__pycache__", "*.pyc", "outputs", "eval", "checkpoints", "*_log.jsonl")


def export_bundle(bundle_dir: str, output_dir: str, with_weights: bool = True) -> str:
    """Copy ``bundle_dir`` to ``output_dir`` with the ``meddiff`` package inside its root.

    MONAI's ``ConfigWorkflow.run`` puts the bundle root on ``sys.path``, so the configs' full
    ``meddiff.*`` ``_target_`` paths resolve to the copy (MONAI Label and the model zoo load
    bundles this way). ``metadata.json`` records the meddiff version the copy carries.

    Args:
        bundle_dir: the bundle folder (holding ``configs/``).
        output_dir: the new bundle folder; must not exist.
        with_weights: also copy ``models/*.pt`` and ``models/*.json`` (not training checkpoints).

    Returns:
        The exported bundle folder.

    Raises:
        FileNotFoundError: ``bundle_dir`` has no ``configs/metadata.json``.
        FileExistsError: ``output_dir`` exists.
    """
    src, dst = Path(bundle_dir), Path(output_dir)
    if not (src / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{src}: not a bundle (no configs/metadata.json)")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; export into a new folder")
    staging = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging, ignore=_IGNORE_BUNDLE)
    if not with_weights:
        shutil.rmtree(staging / "models", ignore_errors=True)
    shutil.copytree(Path(meddiff.__file__).parent, staging / "meddiff", ignore=_IGNORE_CODE)
    meta_file = staging / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    for key in ("required_packages_version", "optional_packages_version"):
        if key in meta:
            meta[key].pop("meddiff", None)  # carried inside the bundle, nothing to install
    meta["meddiff_version"] = meddiff.__version__
    atomic_write_json(meta_file, meta, indent=4)
    staging.rename(dst)
    logger.info("exported %s to %s with meddiff %s inside", src, dst, meddiff.__version__)
    return str(dst)
