# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Nyúl & Udupa histogram standardisation (piecewise-linear intensity landmarks) as MONAI transforms.

The method (Nyúl & Udupa, 1999; Nyúl, Udupa & Zhang, 2000) has two steps:

* **Training** (:func:`fit_nyul_landmarks`, :func:`learn_nyul_landmarks`): for each training image the
  percentiles ``percentiles`` of its foreground are computed, mapped linearly so that the lowest and the
  highest percentile land on ``standard_range``, and averaged over the images. The result, the *standard
  landmarks*, is saved as JSON (:class:`NyulLandmarks`).
* **Transformation** (:class:`NyulStandardize`, :class:`NyulStandardized`): each image's own percentile
  landmarks, computed the same way, are mapped piecewise-linearly onto the standard landmarks; values outside
  the first/last landmark are extrapolated with the slopes of the end segments.

Because the foreground rule (voxels above the image mean) and percentiles commute with positive affine
intensity changes, ``a * x + b`` (``a > 0``) standardises to the same output as ``x``.

Multi-channel inputs are treated as one image (all channels pooled); standardise one modality per key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from meddiff.utils.atomic import atomic_write_json

__all__ = [
    "DEFAULT_PERCENTILES",
    "NyulLandmarks",
    "NyulStandardize",
    "NyulStandardized",
    "fit_nyul_landmarks",
    "image_landmarks",
    "learn_nyul_landmarks",
]

logger = logging.getLogger(__name__)

#: The classic landmark set: 1st and 99th percentiles as end points, deciles in between.
DEFAULT_PERCENTILES: tuple[float, ...] = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
_FOREGROUND_RULES = ("mean", None)
_FORMAT = "meddiff.nyul_landmarks"
_VERSION = 1


@dataclass
class NyulLandmarks:
    """Learned standard landmarks of a Nyúl standardisation.

    Args:
        standard_landmarks: standard intensities of the percentile landmarks, strictly increasing.
        percentiles: percentiles (in ``[0, 100]``, strictly increasing) the landmarks correspond to.
        standard_range: ``(s_min, s_max)`` onto which each training image's lowest/highest landmark was mapped.
        n_images: number of training images the landmarks were averaged over.
        foreground: foreground rule, ``"mean"`` (voxels above the image mean) or ``None`` (all voxels).

    Raises:
        ValueError: if the fields are inconsistent (lengths, ordering, unknown foreground rule).
    """

    standard_landmarks: list[float]
    percentiles: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    standard_range: tuple[float, float] = (0.0, 100.0)
    n_images: int = 0
    foreground: str | None = "mean"

    def __post_init__(self) -> None:
        self.standard_landmarks = [float(v) for v in self.standard_landmarks]
        self.percentiles = [float(p) for p in self.percentiles]
        self.standard_range = (float(self.standard_range[0]), float(self.standard_range[1]))
        self.n_images = int(self.n_images)
        _check_percentiles(self.percentiles)
        _check_foreground(self.foreground)
        if len(self.standard_landmarks) != len(self.percentiles):
            raise ValueError(
                f"{len(self.standard_landmarks)} standard landmarks for {len(self.percentiles)} percentiles."
            )
        values = np.asarray(self.standard_landmarks, dtype=np.float64)
        if not np.all(np.isfinite(values)) or not np.all(np.diff(values) > 0):
            raise ValueError(
                f"standard landmarks must be finite and strictly increasing, got {self.standard_landmarks}."
            )
        if not self.standard_range[0] < self.standard_range[1]:
            raise ValueError(f"standard_range must be increasing, got {self.standard_range}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-serialisable representation (see :meth:`save`)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "percentiles": list(self.percentiles),
            "standard_landmarks": list(self.standard_landmarks),
            "standard_range": list(self.standard_range),
            "n_images": self.n_images,
            "foreground": self.foreground,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NyulLandmarks:
        """Build landmarks from :meth:`to_dict` output.

        Args:
            data: mapping with at least ``standard_landmarks``; other fields fall back to the defaults.

        Returns:
            The landmarks.

        Raises:
            ValueError: if a field is missing, unknown or invalid, or the format/version is not supported.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"Nyúl landmarks must be a mapping, got {type(data).__name__}.")
        data = dict(data)
        fmt, version = data.pop("format", _FORMAT), data.pop("version", _VERSION)
        if fmt != _FORMAT or version != _VERSION:
            raise ValueError(f"unsupported Nyúl landmarks format {fmt!r} version {version!r}.")
        unknown = set(data) - {"percentiles", "standard_landmarks", "standard_range", "n_images", "foreground"}
        if unknown:
            raise ValueError(f"unknown Nyúl landmarks fields {sorted(unknown)}.")
        if "standard_landmarks" not in data:
            raise ValueError("Nyúl landmarks lack 'standard_landmarks'.")
        try:
            return cls(**data)
        except (TypeError, IndexError) as e:
            raise ValueError(f"invalid Nyúl landmarks: {e}") from e

    def save(self, path: str | os.PathLike) -> Path:
        """Write the landmarks to ``path`` as JSON, atomically.

        Args:
            path: destination ``.json`` file (parent folders are created).

        Returns:
            The destination path.
        """
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> NyulLandmarks:
        """Read landmarks written by :meth:`save`.

        Args:
            path: the JSON file.

        Returns:
            The landmarks.

        Raises:
            FileNotFoundError: if ``path`` does not exist (the landmarks are learned by train_autoencoder).
            ValueError: if the file is not valid JSON or not valid landmarks; the message names the path.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Nyúl landmarks file {path} not found: run train_autoencoder first (it learns them from the training set)."
            )
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"invalid Nyúl landmarks file {path}: {e}") from e


def _check_percentiles(percentiles: Sequence[float]) -> None:
    p = np.asarray(percentiles, dtype=np.float64)
    if p.ndim != 1 or p.size < 2 or not np.all(np.diff(p) > 0) or p[0] < 0 or p[-1] > 100:
        raise ValueError(f"percentiles must be >= 2 strictly increasing values in [0, 100], got {list(percentiles)}.")


def _check_foreground(foreground: str | None) -> None:
    if foreground not in _FOREGROUND_RULES:
        raise ValueError(f"foreground must be one of {_FOREGROUND_RULES}, got {foreground!r}.")


def _plain_tensor(img: NdarrayOrTensor) -> torch.Tensor:
    """``img`` as a plain tensor (a ``MetaTensor`` loses its metadata bookkeeping; numpy shares memory)."""
    if isinstance(img, MetaTensor):
        return img.as_tensor()
    return torch.as_tensor(img)


def _quantiles_sorted(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles (numpy's default method) of an ascending 1D tensor; no size limit."""
    pos = q * (values.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.to(pos.dtype)
    v_lo, v_hi = values[lo].to(torch.float64), values[hi].to(torch.float64)
    return v_lo + (v_hi - v_lo) * frac


def image_landmarks(
    img: NdarrayOrTensor, percentiles: Sequence[float] = DEFAULT_PERCENTILES, foreground: str | None = "mean"
) -> np.ndarray:
    """Percentile landmarks of one image's foreground.

    Args:
        img: image (any shape, channels pooled); non-finite voxels are ignored.
        percentiles: percentiles in ``[0, 100]``.
        foreground: ``"mean"``: voxels strictly above the image mean (all voxels if none is);
            ``None``: all voxels.

    Returns:
        float64 array of the landmark intensities, one per percentile.

    Raises:
        ValueError: if the image has no finite voxel or the foreground rule is unknown.
    """
    _check_foreground(foreground)
    x = _plain_tensor(img).detach().reshape(-1)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        raise ValueError("image has no finite voxel.")
    if foreground == "mean":
        fg = x[x > x.to(torch.float64).mean().to(x.dtype)]
        x = fg if fg.numel() > 0 else x  # constant image: fall back to all voxels
    q = torch.as_tensor(np.asarray(percentiles, dtype=np.float64) / 100.0, device=x.device)
    return _quantiles_sorted(torch.sort(x).values, q).cpu().numpy()


def fit_nyul_landmarks(
    images: Iterable[NdarrayOrTensor],
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    standard_range: tuple[float, float] = (0.0, 100.0),
    foreground: str | None = "mean",
) -> NyulLandmarks:
    """Learn standard landmarks from training images.

    Each image's foreground percentiles are mapped linearly so that the lowest percentile lands on
    ``standard_range[0]`` and the highest on ``standard_range[1]``; the mapped landmarks are averaged.
    Images whose lowest and highest landmarks coincide (e.g. constant images) are skipped with a warning.

    Args:
        images: training images (numpy arrays or tensors, channels pooled); consumed once.
        percentiles: strictly increasing percentiles in ``[0, 100]``.
        standard_range: ``(s_min, s_max)``, increasing.
        foreground: ``"mean"`` (voxels above the image mean) or ``None`` (all voxels).

    Returns:
        The fitted :class:`NyulLandmarks`.

    Raises:
        ValueError: if arguments are invalid, no usable image is given, or the averaged landmarks are not
            strictly increasing.
    """
    _check_percentiles(percentiles)
    _check_foreground(foreground)
    s_min, s_max = float(standard_range[0]), float(standard_range[1])
    if not s_min < s_max:
        raise ValueError(f"standard_range must be increasing, got {standard_range}.")
    total = np.zeros(len(percentiles), dtype=np.float64)
    n_used, n_seen = 0, 0
    for img in images:
        n_seen += 1
        lm = image_landmarks(img, percentiles, foreground)
        if not lm[-1] > lm[0]:
            logger.warning("Nyúl fit: skipping image %d, its landmarks are degenerate (%g..%g).", n_seen, lm[0], lm[-1])
            continue
        total += s_min + (lm - lm[0]) / (lm[-1] - lm[0]) * (s_max - s_min)
        n_used += 1
    if n_used == 0:
        raise ValueError(f"no usable image to fit Nyúl landmarks ({n_seen} given).")
    mean = total / n_used
    mean[0], mean[-1] = s_min, s_max  # exact ends, free of rounding
    if not np.all(np.diff(mean) > 0):
        raise ValueError(
            f"fitted Nyúl standard landmarks are not strictly increasing ({mean.tolist()}): the images have tied "
            "percentiles (e.g. many identical voxels); use fewer percentiles or another foreground rule."
        )
    return NyulLandmarks(
        standard_landmarks=mean.tolist(),
        percentiles=list(percentiles),
        standard_range=(s_min, s_max),
        n_images=n_used,
        foreground=foreground,
    )


def _load_item(item: Any, loader: Callable[[Any], Any] | None, key: Hashable) -> Any:
    """Load one training item into an image array/tensor."""
    if loader is None:
        from monai.transforms import LoadImage  # local: only needed when no loader is given

        return LoadImage(image_only=True)(item[key] if isinstance(item, Mapping) else item)
    if isinstance(loader, MapTransform) and not isinstance(item, Mapping):
        item = {key: item}  # a bare path for a dictionary transform
    out = loader(item)
    return out[key] if isinstance(out, Mapping) else out


def learn_nyul_landmarks(
    files: Sequence[Mapping[Hashable, Any] | str | os.PathLike],
    landmarks_file: str | os.PathLike,
    loader: Callable[[Any], Any] | None = None,
    key: Hashable = "image",
    overwrite: bool = False,
    **fit_kwargs: Any,
) -> str:
    """Learn Nyúl landmarks from training files once and cache them as JSON.

    If ``landmarks_file`` exists and ``overwrite`` is false, it is only validated and reused (``files`` are
    not read). Meant to be instantiated from a bundle config and its return value passed to
    :class:`NyulStandardized`::

        "nyul_landmarks": {"_target_": "meddiff.transforms.learn_nyul_landmarks",
                           "files": "@train_files", "landmarks_file": "@nyul_file", "loader": "@load_image"}

    Args:
        files: training items: data dicts (image under ``key``) or image paths.
        landmarks_file: JSON file to write (atomically) or reuse.
        loader: callable turning an item into an image. A MONAI ``MapTransform`` is called on the item dict
            (a bare path is wrapped as ``{key: path}``); any other callable is called on the item as is. A
            mapping result is indexed with ``key``. ``None`` uses ``monai.transforms.LoadImage(image_only=True)``
            on the path.
        key: key of the image in the items and in the loader's output.
        overwrite: refit even if ``landmarks_file`` exists.
        fit_kwargs: ``percentiles``, ``standard_range``, ``foreground`` for :func:`fit_nyul_landmarks`.

    Returns:
        ``landmarks_file`` as a string.

    Raises:
        ValueError: if ``files`` is empty and no landmarks file exists, an existing file is invalid, or the fit fails.
    """
    path = Path(landmarks_file)
    if path.exists() and not overwrite:
        existing = NyulLandmarks.load(path)
        for name in ("percentiles", "standard_range", "foreground"):
            if name in fit_kwargs:
                want = fit_kwargs[name]
                want = [float(v) for v in want] if isinstance(want, Sequence) and not isinstance(want, str) else want
                have = getattr(existing, name)
                if (list(have) if isinstance(have, tuple) else have) != want:
                    logger.warning("Nyúl landmarks %s: %s is %r, not the requested %r.", path, name, have, want)
        logger.info("Reusing Nyúl landmarks %s (learned from %d images).", path, existing.n_images)
        return str(path)
    if len(files) == 0:
        raise ValueError(f"no training files to learn Nyúl landmarks {path} from.")
    logger.info("Learning Nyúl landmarks from %d training images.", len(files))
    landmarks = fit_nyul_landmarks((_load_item(item, loader, key) for item in files), **fit_kwargs)
    landmarks.save(path)
    logger.info("Saved Nyúl landmarks learned from %d images to %s.", landmarks.n_images, path)
    return str(path)


def _as_landmarks(landmarks: NyulLandmarks | str | os.PathLike | Mapping[str, Any]) -> NyulLandmarks:
    if isinstance(landmarks, NyulLandmarks):
        return landmarks
    if isinstance(landmarks, Mapping):
        return NyulLandmarks.from_dict(landmarks)
    if isinstance(landmarks, (str, os.PathLike)):
        return NyulLandmarks.load(landmarks)
    raise TypeError(f"landmarks must be NyulLandmarks, a path or a dict, got {type(landmarks).__name__}.")


def _piecewise_linear(x: torch.Tensor, xp: np.ndarray, fp: np.ndarray) -> torch.Tensor:
    """Map ``x`` through the polyline ``(xp, fp)`` (``xp`` strictly increasing), extrapolating the end segments."""
    xp_t = torch.as_tensor(xp, dtype=x.dtype, device=x.device)
    slopes = torch.as_tensor(np.diff(fp) / np.diff(xp), dtype=x.dtype, device=x.device)
    fp_t = torch.as_tensor(fp, dtype=x.dtype, device=x.device)
    # segment index: 0 below xp[1], len(xp) - 2 from xp[-2] on, so the ends extrapolate
    seg = torch.bucketize(x, xp_t[1:-1].contiguous(), right=True)
    return fp_t[seg] + (x - xp_t[seg]) * slopes[seg]


class NyulStandardize(Transform):
    """Map an image's foreground percentile landmarks piecewise-linearly onto learned standard landmarks.

    The output has the input's type (numpy array, tensor or ``MetaTensor`` with its metadata). Channels are pooled
    (one set of landmarks per image).

    Args:
        landmarks: :class:`NyulLandmarks`, a dict as in :meth:`NyulLandmarks.to_dict`, or the path of a landmarks
            JSON file (loaded now, so a missing file fails at construction).
        dtype: output dtype; ``None`` keeps floating inputs' dtype (integers become float32).

    Raises:
        FileNotFoundError: if ``landmarks`` is a path that does not exist.
        ValueError: if the landmarks are invalid.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        landmarks: NyulLandmarks | str | os.PathLike | Mapping[str, Any],
        dtype: DtypeLike | torch.dtype = np.float32,
    ) -> None:
        self.landmarks = _as_landmarks(landmarks)
        self.dtype = dtype

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Standardise ``img``.

        Args:
            img: image of any shape (e.g. ``(C, X, Y, Z)``).

        Returns:
            The standardised image, same type/device as ``img``.
        """
        lm = self.landmarks
        x = _plain_tensor(img)
        work_dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        x = x.to(work_dtype)
        src = image_landmarks(x, lm.percentiles, lm.foreground)
        xp, fp = _unique_landmarks(src, np.asarray(lm.standard_landmarks, dtype=np.float64))
        if xp.size < 2:
            logger.warning("Nyúl standardisation: image is constant (%g); shifting it to %g.", xp[0], fp[0])
            out = x - float(xp[0]) + float(fp[0])
        else:
            out = _piecewise_linear(x, xp, fp)
        dtype = self.dtype
        if dtype is None:
            dtype = img.dtype if _is_floating(img) else np.float32
        result, *_ = convert_to_dst_type(out, dst=img, dtype=dtype)
        return result


def _is_floating(img: NdarrayOrTensor) -> bool:
    if isinstance(img, torch.Tensor):
        return img.is_floating_point()
    return bool(np.issubdtype(np.asarray(img).dtype, np.floating))


def _unique_landmarks(src: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge tied source landmarks (e.g. many identical voxels), averaging their standard values."""
    xp, inverse = np.unique(src, return_inverse=True)
    if xp.size == src.size:
        return src, std
    fp = np.bincount(inverse, weights=std) / np.bincount(inverse)
    return xp, fp


class NyulStandardized(MapTransform):
    """Dictionary wrapper of :class:`NyulStandardize`.

    Args:
        keys: keys of the images to standardise (all with the same landmarks).
        landmarks: :class:`NyulLandmarks`, a dict or a landmarks JSON path (loaded now).
        dtype: output dtype, see :class:`NyulStandardize`.
        allow_missing_keys: don't raise if a key is missing.

    Raises:
        FileNotFoundError: if ``landmarks`` is a path that does not exist.
    """

    backend = NyulStandardize.backend

    def __init__(
        self,
        keys: KeysCollection,
        landmarks: NyulLandmarks | str | os.PathLike | Mapping[str, Any],
        dtype: DtypeLike | torch.dtype = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.standardizer = NyulStandardize(landmarks, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        """Standardise ``data[key]`` for each key.

        Args:
            data: data dictionary.

        Returns:
            A shallow copy of ``data`` with the images standardised.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.standardizer(d[key])
        return d
