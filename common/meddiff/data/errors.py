# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The one exception raised for bad input data: it always names the offending file or folder."""

from __future__ import annotations

import os

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file or folder is missing, unreadable or not a usable 3D volume.

    ``str(err)`` is ``"<path>: <problem>"`` so the message always says which input to fix.

    Args:
        path: the offending file or folder.
        problem: what is wrong with it, e.g. ``"contains NaN or Inf voxels"``.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = str(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # keep the two-argument signature when pickled (e.g. raised in a DataLoader worker)
        return (self.__class__, (self.path, self.problem))
