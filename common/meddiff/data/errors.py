# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The one exception raised for bad input data: it always names the offending file or folder.

A :class:`DataError` (or a bad setting, a ``ValueError`` naming the key) raised while ``python -m monai.bundle
run`` builds a component reaches the terminal wrapped in MONAI's config-resolver errors (``RuntimeError: Failed
to instantiate ...``), whose traceback would end the output. Importing this module therefore chains a small
:data:`sys.excepthook` (:func:`install_excepthook`): after the usual traceback of an uncaught exception that wraps
a :class:`DataError`, or an error raised by meddiff's own code, it prints that error once more as the last line,
so the user reads the file or setting and the problem last. Nothing else changes (other exceptions, exit codes,
caught errors).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType

__all__ = ["DataError", "find_data_error", "find_user_error", "install_excepthook"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the meddiff package, wherever it is (installed or in a bundle)


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


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and what caused it, outermost first (``__cause__``, else ``__context__``)."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return chain


def find_data_error(exc: BaseException | None) -> DataError | None:
    """The :class:`DataError` behind ``exc``: itself, or the first one in its ``__cause__``/``__context__`` chain.

    Args:
        exc: an exception (or ``None``).

    Returns:
        The data error, or ``None`` if the chain holds none.
    """
    return next((e for e in _chain(exc) if isinstance(e, DataError)), None)


def _raised_by_meddiff(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _PACKAGE_DIR in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def find_user_error(exc: BaseException | None) -> BaseException | None:
    """The error a user should read last: the :class:`DataError` behind ``exc``, else the innermost exception
    in its chain raised by meddiff's own code (e.g. a ``ValueError`` naming a bad setting).

    Args:
        exc: an exception (or ``None``).

    Returns:
        That error (possibly ``exc`` itself), or ``None`` if the chain holds neither.
    """
    return find_data_error(exc) or next((e for e in reversed(_chain(exc)) if _raised_by_meddiff(e)), None)


def _data_error_excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, previous=None
) -> None:
    (previous or sys.__excepthook__)(exc_type, exc, tb)
    err = find_user_error(exc)
    if err is not None and err is not exc:
        module = type(err).__module__
        name = type(err).__qualname__ if module == "builtins" else f"{module}.{type(err).__qualname__}"
        sys.stderr.write(f"\n{name}: {err}\n")
        sys.stderr.flush()


def install_excepthook() -> None:
    """Chain the data-error summary onto :data:`sys.excepthook` (once; idempotent).

    After the traceback printed by the previous hook, an uncaught exception caused by a :class:`DataError` or by
    an error of meddiff's own code (e.g. MONAI's ``RuntimeError: Failed to instantiate ...`` around it) gets one
    more line, that error itself (:func:`find_user_error`), so the output ends with the file or setting and the
    problem.
    """
    current = sys.excepthook
    if getattr(current, "_meddiff_data_error_hook", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        _data_error_excepthook(exc_type, exc, tb, previous=current)

    hook._meddiff_data_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


install_excepthook()
