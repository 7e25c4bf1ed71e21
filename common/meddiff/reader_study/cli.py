# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""``meddiff reader-study build|serve|analyse``: the commands of the reader-study group."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["COMMANDS", "analyse", "build", "serve"]

logger = logging.getLogger("meddiff.cli")


def build(real: str, synthetic: str, out: str, num_cases: int | None = None, seed: int = 0,
          title: str = "Reader study", match_grid: bool = False) -> str:
    """Build a blinded study of real vs synthetic NIfTI volumes; the key goes to OUT/key.json, apart from the viewer.

    Args:
        real: folder of real volumes.
        synthetic: folder of synthetic volumes (same shape and modality).
        out: the new study folder.
        num_cases: total cases, even (half real, half synthetic); default: all the smaller folder allows, twice.
        seed: seed of the draw, shuffle, case ids and each reader's order.
        title: shown to readers.
        match_grid: resample the real volumes onto the synthetic volumes' grid (orientation; voxel size,
            trilinear with anti-aliasing; centred crop/pad with the volume's minimum); originals are only read,
            OUT/key.json records what was done to each case.
    """
    from .build import build_study

    return str(build_study(real, synthetic, out, num_cases=num_cases, seed=seed, title=title, match_grid=match_grid))


def serve(study: str, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve the study's viewer until Ctrl-C; ratings go to STUDY/ratings.sqlite as they come.

    Args:
        study: the study folder.
        port: port (0: any free port; the URL is logged and written to STUDY/server.lock).
        host: address to listen on (default: this machine only).
    """
    from .server import serve_study

    serve_study(study, host=host, port=port)


def analyse(study: str, out_dir: str | None = None) -> str:
    """Scores real vs synthetic (Mann-Whitney), accuracy with binomial CI, kappa/ICC; CSV, PNG and HTML.

    Args:
        study: the study folder.
        out_dir: where to write (default STUDY/analysis).
    """
    from .analyse import analyse_study

    return str(analyse_study(study, out_dir=out_dir)["out_dir"] / "summary.html")


#: sub-command name -> function, registered as ``meddiff reader-study <name>``
COMMANDS: dict[str, Callable[..., Any]] = {"build": build, "serve": serve, "analyse": analyse}
