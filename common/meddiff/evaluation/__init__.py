# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Evaluation workflow of the generation bundles: metrics.json and a self-contained report.html."""

from __future__ import annotations

from .evaluator import AUDIT_DEFINITION, GenerationEvaluator, json_safe
from .fidelity import FIDELITY_DEFINITION, ConditioningFidelity, conditioning_label_file, dice_per_label

__all__ = [
    "AUDIT_DEFINITION",
    "FIDELITY_DEFINITION",
    "ConditioningFidelity",
    "GenerationEvaluator",
    "conditioning_label_file",
    "dice_per_label",
    "json_safe",
]
