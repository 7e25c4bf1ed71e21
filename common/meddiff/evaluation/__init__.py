# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Evaluation workflow of the generation bundles: metrics.json and a self-contained report.html."""

from __future__ import annotations

from .evaluator import AUDIT_DEFINITION, GenerationEvaluator, json_safe

__all__ = ["AUDIT_DEFINITION", "GenerationEvaluator", "json_safe"]
