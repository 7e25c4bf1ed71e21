# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Experiments built from several bundle workflows (e.g. the label-budget study of the breast bundle)."""

from __future__ import annotations

from .label_budget import run_label_budget_experiment, summarize_label_budget

__all__ = ["run_label_budget_experiment", "summarize_label_budget"]
