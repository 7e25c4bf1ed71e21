# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The ``meddiff`` command line: ``meddiff <command> [args]`` (``python -m meddiff.cli.main`` works too).

Add a command by writing a function and registering it in :data:`COMMANDS`; ``fire`` turns its
signature into command-line arguments (``--name value``) and its docstring into ``--help``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import fire

from ..data.errors import DataError
from ..reader_study.cli import COMMANDS as READER_STUDY_COMMANDS
from .breast import breast_demo, breast_experiment, breast_phantoms

__all__ = ["COMMANDS", "ct_organ_demo", "datalist", "demo", "export", "format_json", "main"]

logger = logging.getLogger("meddiff.cli")


def datalist(
    data_dir: str,
    output_file: str,
    val_fraction: float = 0.2,
    seed: int = 0,
    relative: bool = True,
    npy_spacing: Sequence[float] | None = None,
    verify: bool = False,
) -> None:
    """Write a MONAI datalist JSON for the volumes under DATA_DIR (NIfTI, .npy, DICOM series folders).

    Args:
        data_dir: folder holding the volumes (searched recursively).
        output_file: the JSON file to write.
        val_fraction: fraction of volumes for validation.
        seed: seed of the training/validation split.
        relative: write paths relative to data_dir (``--norelative`` for absolute paths).
        npy_spacing: voxel size x,y,z of .npy stacks, e.g. ``--npy_spacing 1,1,3``.
        verify: load every volume first and stop at the first bad one.

    Raises:
        DataError: no volumes, or a bad volume with ``--verify``.
    """
    from ..data.datalist import make_datalist  # imported lazily: keeps ``--help`` fast

    result = make_datalist(
        data_dir,
        output_file,
        val_fraction=val_fraction,
        seed=seed,
        relative=relative,
        npy_spacing=npy_spacing,
        verify=verify,
    )
    logger.info(
        "datalist: %s (%d training, %d validation)",
        os.fspath(output_file),
        len(result["training"]),
        len(result["validation"]),
    )


def demo(output_dir: str = "demo_output", num_volumes: int = 8, train: bool = False) -> str:
    """Sample the MRI and CT bundles' shipped demo weights (seconds) and run the breast demo.

    Args:
        output_dir: folder for the demo data, checkpoints and samples.
        num_volumes: number of demo volumes (with ``--train``).
        train: retrain the MRI and CT demo models first (real MRI and CT template variants; tens of minutes on a
            CPU) instead of sampling the shipped weights (``make demo-train``).
    """
    from .demo import run_demo

    return run_demo(output_dir=output_dir, num_volumes=num_volumes, train=train)


def ct_organ_demo(output_dir: str, num_volumes: int = 8, seed: int = 0, layout: str = "nifti") -> str:
    """Write labelled CT: variants of a real abdominal CT with its organ label map (TotalSegmentator's test CT).

    Labels: 0 background, 1 body, 2 liver, 3 spleen, 4 kidney, 5 bowel, 6 vessel, 7 bone, 8 muscle, 9 lung.

    Args:
        output_dir: the data set folder (``dataset.json`` with ``image`` + ``label`` items goes there).
        num_volumes: number of variants.
        seed: random seed of the variations (another seed, other variants: e.g. held-out masks).
        layout: ``nifti`` (``imagesTr/``, ``labelsTr/``) or ``dicom`` (``CTORGAN-XX/ct/``: a CT series holding a
            DICOM SEG of the organs, ``seg.dcm``).
    """
    from ..data.demo import make_ct_organ_demo

    return str(make_ct_organ_demo(output_dir, num_volumes=num_volumes, seed=seed, layout=layout))


def format_json(*paths: str, check: bool = False) -> None:
    """Write the JSON files under PATHS as the model zoo's pre-commit hook does (``pretty-format-json --indent=4 --no-sort-keys``).

    Args:
        paths: files and folders (searched recursively; git-ignored files are skipped).
        check: change nothing; exit with status 1 if a file is not formatted (its name is logged).

    Raises:
        SystemExit: with ``--check``, status 1 when a file needs formatting.
        DataError: a path is missing or a file is not valid JSON.
    """
    from .format_json import format_json_files

    if not isinstance(check, bool):  # fire reads `--check PATH` as check=PATH: that PATH is a path to check
        paths, check = (str(check), *paths), True
    changed = format_json_files(paths or ["."], check=check)
    if check and changed:
        for file in changed:
            logger.error("not formatted: %s", file)
        logger.error("%d JSON file(s) need formatting: run `make format-json`", len(changed))
        raise SystemExit(1)
    logger.info("format-json: %d file(s) %s", len(changed), "need formatting" if check else "rewritten")


def export(bundle_dir: str, output_dir: str, with_weights: bool = True, zoo: bool = False,
           weights_url: str | None = None) -> str:
    """Copy a bundle with meddiff inside it, for MONAI Label or the model zoo (no pip install needed).

    Args:
        bundle_dir: the bundle folder.
        output_dir: the new folder (must not exist).
        with_weights: include ``models/*.pt`` and their JSON side files.
        zoo: a model-zoo submission: no weight files; ``large_files.yml`` gives each one's URL and SHA-256.
        weights_url: with ``--zoo``: the URL of the folder the files of ``weights.sha256`` are uploaded to.
    """
    from .export import export_bundle

    return export_bundle(bundle_dir, output_dir, with_weights=with_weights, zoo=zoo, weights_url=weights_url)


#: command name -> function; extend this dict to add commands
COMMANDS: dict[str, Callable[..., Any] | dict[str, Callable[..., Any]]] = {
    "datalist": datalist,
    "demo": demo,
    "export": export,
    "format-json": format_json,
    "breast-phantoms": breast_phantoms,
    "breast-experiment": breast_experiment,
    "breast-demo": breast_demo,
    "ct-organ-demo": ct_organ_demo,
    "reader-study": READER_STUDY_COMMANDS,  # a group: meddiff reader-study build|serve|analyse
}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``meddiff`` command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: exit code 1 on a :class:`DataError` (logged without a traceback), or fire's own exit
            codes for usage errors.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        fire.Fire(COMMANDS, command=list(argv) if argv is not None else None, name="meddiff")
    except DataError as e:
        logger.error("%s", e)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
