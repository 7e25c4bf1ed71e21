# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The one exception raised for bad input data: it always names the offending file or folder.

A :class:`DataError` raised while ``python -m monai.bundle run`` builds a component reaches the terminal
wrapped in MONAI's config-resolver errors (``RuntimeError: Failed to instantiate ...``), whose traceback
would end the output. Importing this module therefore chains a small :data:`sys.excepthook`
(:func:`install_excepthook`): after the usual traceback of an uncaught exception caused by a
:class:`DataError`, it prints the data error once more as the last line, so the user reads the file and
the problem last. Nothing else changes (other exceptions, exit codes, caught errors).
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["DataError", "find_data_error", "install_excepthook"]


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


def find_data_error(exc: BaseException | None) -> DataError | None:
    """The :class:`DataError` behind ``exc``: itself, or the first one in its ``__cause__``/``__context__`` chain.

    Args:
        exc: an exception (or ``None``).

    Returns:
        The data error, or ``None`` if the chain holds none.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return None


def _data_error_excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, previous=None
) -> None:
    (previous or sys.__excepthook__)(exc_type, exc, tb)
    err = find_data_error(exc)
    if err is not None and err is not exc:
        sys.stderr.write(f"\n{type(err).__module__}.{type(err).__qualname__}: {err}\n")
        sys.stderr.flush()


def install_excepthook() -> None:
    """Chain the data-error summary onto :data:`sys.excepthook` (once; idempotent).

    After the traceback printed by the previous hook, an uncaught exception caused by a :class:`DataError`
    (e.g. MONAI's ``RuntimeError: Failed to instantiate ...`` around it) gets one more line, the data error
    itself, so the output ends with the file and the problem.
    """
    current = sys.excepthook
    if getattr(current, "_meddiff_data_error_hook", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        _data_error_excepthook(exc_type, exc, tb, previous=current)

    hook._meddiff_data_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


install_excepthook()
