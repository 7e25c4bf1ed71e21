# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Values as they arrive from bundle configs and ``python -m monai.bundle run --key value`` overrides."""

from __future__ import annotations

from typing import Any

__all__ = ["as_bool"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "none", ""}


def as_bool(value: Any, name: str = "value") -> bool:
    """A switch given as a bool, a number or a string.

    ``--resume false`` reaches a bundle as the string ``"false"`` (fire only parses ``False``), which
    Python would treat as true; this reads it as meant.

    Raises:
        ValueError: a string that is not a recognised switch value (names ``name``).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)
