# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Blinded reader studies of real vs synthetic volumes in the browser (the paper's radiologist evaluation).

``meddiff reader-study build`` converts the volumes and hides which is which (:mod:`.build`);
``meddiff reader-study serve`` runs the viewer and stores ratings in SQLite (:mod:`.server`, :mod:`.db`);
``meddiff reader-study analyse`` compares scores, measures detection accuracy and agreement (:mod:`.analyse`).
"""

from __future__ import annotations

from .analyse import analyse_study, icc, weighted_kappa
from .build import DEFAULT_QUESTIONS, build_study, load_key, load_public_study
from .db import RatingsDB, reader_order
from .server import make_server, serve_study

__all__ = [
    "DEFAULT_QUESTIONS",
    "RatingsDB",
    "analyse_study",
    "build_study",
    "icc",
    "load_key",
    "load_public_study",
    "make_server",
    "reader_order",
    "serve_study",
    "weighted_kappa",
]
