# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Build a blinded reader study from a folder of real and a folder of synthetic NIfTI volumes.

A study folder holds two parts that never mix:

* ``viewer/`` — everything a reader's browser may fetch: ``study.json`` (questions, window presets, the
  number of cases, voxel size) and ``cases/<case_id>/`` with each volume converted once for the viewer
  (``volume.u16.gz``: gzip-compressed little-endian uint16 in RAS+ voxel order, ``meta.json``: the linear
  map back to the stored intensities and the case's automatic window). Case ids are random and carry no
  file name, folder or label.
* ``key.json`` — outside ``viewer/``: which case is real or synthetic, its source file and the seed; with
  ``--match_grid`` also each case's original grid and what was done to it.
* ``matched/`` — only with ``--match_grid``: the real volumes resampled onto the synthetic grid (not served).

``ratings.sqlite`` (written by :mod:`meddiff.reader_study.server`) and ``analysis/`` (written by
:mod:`meddiff.reader_study.analyse`) appear beside them later.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..data.errors import DataError
from ..utils import default_mode, is_temporary

__all__ = [
    "DEFAULT_QUESTIONS",
    "WINDOW_PRESETS",
    "KEY_FILE",
    "VIEWER_DIR",
    "build_study",
    "detect_modality",
    "find_volumes",
    "load_key",
    "load_public_study",
]

logger = logging.getLogger(__name__)

#: the three questions the paper's radiologists answered, each on a 1-5 Likert scale
DEFAULT_QUESTIONS: list[dict[str, Any]] = [
    {
        "id": "realism",
        "text": "How realistic does the image look?",
        "anchors": ["1 not realistic", "2", "3", "4", "5 indistinguishable from a real scan"],
    },
    {
        "id": "anatomy",
        "text": "How correct is the anatomy?",
        "anchors": ["1 grossly wrong", "2", "3", "4", "5 fully plausible"],
    },
    {
        "id": "consistency",
        "text": "How consistent are neighbouring slices (in the reformat)?",
        "anchors": ["1 inconsistent", "2", "3", "4", "5 seamless"],
    },
]

#: window presets per modality: name -> (width, level); ``None`` = each case's automatic window
WINDOW_PRESETS: dict[str, list[dict[str, Any]]] = {
    "ct": [
        {"name": "Soft tissue", "width": 400.0, "level": 40.0},
        {"name": "Lung", "width": 1500.0, "level": -600.0},
        {"name": "Bone", "width": 1800.0, "level": 400.0},
        {"name": "Auto", "width": None, "level": None},
    ],
    "mri": [
        {"name": "Auto", "width": None, "level": None},
        {"name": "Full range", "width": "full", "level": "full"},
    ],
}

VIEWER_DIR = "viewer"
KEY_FILE = "key.json"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: 1st percentile below this (HU) means CT; MRI and normalised images are >= about 0
_CT_P1_THRESHOLD = -500.0
_AXIS_NAMES = ("sagittal", "coronal", "axial")  # the plane orthogonal to RAS axis 0, 1, 2


@dataclass
class _Volume:
    path: Path
    data: np.ndarray  # float32 (X, Y, Z) in RAS+ voxel order
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    slice_axis: int  # RAS axis of the file's thickest (or last) voxel axis
    modality: str


def find_volumes(folder: str | os.PathLike) -> list[Path]:
    """List the NIfTI files in ``folder`` (recursively), sorted.

    Args:
        folder: the folder to search.

    Returns:
        The ``.nii``/``.nii.gz`` files.

    Raises:
        DataError: the folder is missing or holds no NIfTI volume.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(root, "is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(_NIFTI_SUFFIXES)
                   and not is_temporary(p))
    if not files:
        raise DataError(root, "holds no NIfTI volumes (.nii, .nii.gz)")
    return files


def detect_modality(data: np.ndarray) -> str:
    """Tell CT (Hounsfield units) from MRI by the intensity range.

    Args:
        data: the volume.

    Returns:
        ``"ct"`` when the 1st percentile is below -500 (air in HU), else ``"mri"``.
    """
    return "ct" if float(np.percentile(data, 1)) < _CT_P1_THRESHOLD else "mri"


def _load(path: Path, img: nib.Nifti1Image | None = None) -> _Volume:
    try:
        img = nib.load(str(path)) if img is None else img
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for truncated or foreign files
        raise DataError(path, f"cannot be read as NIfTI ({type(e).__name__}: {e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"is not a 3D volume (shape {tuple(data.shape)})")
    if not np.isfinite(data).all():
        raise DataError(path, "contains NaN or Inf voxels")
    spacing = tuple(float(s) for s in canonical.header.get_zooms()[:3])
    # which RAS axis did the file's slice axis (thickest voxels; the last axis on ties) become
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    src_axis = 2 if zooms[2] >= zooms.max() * 0.99 else int(np.argmax(zooms))
    ornt = nib.orientations.io_orientation(img.affine)
    slice_axis = int(ornt[src_axis, 0])
    return _Volume(path, data, tuple(data.shape), spacing, slice_axis, detect_modality(data))  # type: ignore[arg-type]


def _check_consistent(volumes: Sequence[_Volume], reference: _Volume) -> None:
    for v in volumes:
        if v.shape != reference.shape:
            raise DataError(
                v.path,
                f"has shape {v.shape} (RAS+), but {reference.path.name} has {reference.shape}: "
                "all volumes of a study must have one shape, or the shape alone tells real from synthetic",
            )
        if v.modality != reference.modality:
            raise DataError(
                v.path,
                f"looks like {v.modality.upper()} (1st intensity percentile {np.percentile(v.data, 1):.1f}), but "
                f"{reference.path.name} looks like {reference.modality.upper()}: one study holds one modality "
                "(synthetic CT must be in Hounsfield units like the real scans)",
            )


def _canonical_shape(path: Path) -> tuple[int, ...]:
    """The volume's shape in RAS+ axis order (from its header)."""
    grid = _grid_of(path)
    if None in grid.axcodes:
        raise DataError(path, f"has an affine with a degenerate axis (axis codes {grid.axcodes})")
    out = [0, 0, 0]
    for size, code in zip(grid.shape, grid.axcodes):
        out["LRPAIS".index(code) // 2] = size
    return tuple(out)


def _check_shapes(files: Sequence[Path]) -> None:
    """Compare every file's RAS+ shape (from its header) with the first one's, before any voxel is read."""
    first = _canonical_shape(files[0])
    for f in files[1:]:
        shape = _canonical_shape(f)
        if shape != first:
            raise DataError(
                f,
                f"has shape {shape} (RAS+), but {files[0].name} has {first}: "
                "all volumes of a study must have one shape, or the shape alone tells real from synthetic",
            )


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]  # in the file's voxel order
    spacing: tuple[float, float, float]  # mm
    axcodes: tuple[str, str, str]  # nibabel's, e.g. ("R", "A", "S")

    def describe(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "spacing": [round(float(z), 6) for z in self.spacing],
                "axcodes": "".join(self.axcodes)}


def _grid_of(path: Path, img: nib.Nifti1Image | None = None) -> _Grid:
    try:
        img = nib.load(str(path)) if img is None else img
        shape = tuple(int(n) for n in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        axcodes = tuple(nib.aff2axcodes(img.affine))
    except Exception as e:  # nibabel raises many types for truncated or foreign files
        raise DataError(path, f"cannot be read as NIfTI ({type(e).__name__}: {e})") from e
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(path, f"is not a 3D volume (shape {shape})")
    return _Grid(shape, zooms, axcodes)  # type: ignore[arg-type]


def _synthetic_grid(files: Sequence[Path]) -> _Grid:
    """The one grid (shape, voxel size, orientation) of every synthetic volume, read from the headers."""
    first = _grid_of(files[0])
    for f in files[1:]:
        grid = _grid_of(f)
        if grid.shape != first.shape or grid.axcodes != first.axcodes or not np.allclose(
                grid.spacing, first.spacing, rtol=1e-3):
            raise DataError(f, f"has grid {grid.describe()}, but {files[0].name} has {first.describe()}: "
                               "--match_grid resamples the real volumes onto the synthetic volumes' grid, so the "
                               "synthetic volumes must share one")
    return first


def _match_grid(path: Path, grid: _Grid) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Resample a real volume onto ``grid``: orientation, voxel size, then centred crop or pad to its shape.

    1. ``Orientation``: axes permuted and flipped to ``grid.axcodes`` (no interpolation).
    2. ``Spacing``: trilinear interpolation (MONAI ``mode="bilinear"`` on a 3D volume) to ``grid.spacing``;
       along each axis that gets coarser, a Gaussian of sigma ``(new / old - 1) / 2`` voxels first (the
       anti-aliasing of ``skimage.transform.resize``), so the real volume is not noisier than it would be
       if acquired at the coarser spacing.
    3. ``ResizeWithPadOrCrop``: centred crop or pad to ``grid.shape``.

    Everything outside the original field of view (padding, the filter's border) is the volume's minimum,
    its background, not zero (which would be a bright frame on CT).

    Returns:
        The resampled image (its affine carries the grid) and what was done, for the study's key.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import GaussianSmooth, Orientation, ResizeWithPadOrCrop, Spacing

    source = _grid_of(path)
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(source.shape)
    if not np.isfinite(data).all():
        raise DataError(path, "contains NaN or Inf voxels")
    background = float(data.min())
    x = MetaTensor(torch.from_numpy(data - background)[None], affine=torch.as_tensor(img.affine, dtype=torch.float64))
    steps: list[str] = []
    x = Orientation(axcodes="".join(grid.axcodes), labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)  # nibabel's
    if source.axcodes != grid.axcodes:
        steps.append(f"reoriented {''.join(source.axcodes)} -> {''.join(grid.axcodes)} (axes permuted/flipped, "
                     "no interpolation)")
    spacing = tuple(float(z) for z in x.pixdim[:3])
    if not np.allclose(spacing, grid.spacing, rtol=1e-3):
        sigma = [max(0.0, (new / old - 1.0) / 2.0) for old, new in zip(spacing, grid.spacing)]
        if any(sg > 0 for sg in sigma):
            x = GaussianSmooth(sigma=sigma)(x)
        shape_before = tuple(int(n) for n in x.shape[1:])
        x = Spacing(pixdim=grid.spacing, mode="bilinear", padding_mode="zeros", dtype=np.float32)(x)
        steps.append(f"resampled voxel size {_mm(spacing)} -> {_mm(grid.spacing)} mm, trilinear"
                     + (f" after Gaussian anti-aliasing sigma {_mm(sigma)} voxels" if any(sigma) else "")
                     + f" (shape {shape_before} -> {tuple(int(n) for n in x.shape[1:])})")
    shape_before = tuple(int(n) for n in x.shape[1:])
    if shape_before != grid.shape:
        x = ResizeWithPadOrCrop(spatial_size=grid.shape, method="symmetric", mode="constant", value=0.0)(x)
        how = ["cropped" if b > g else "padded" if b < g else "kept" for b, g in zip(shape_before, grid.shape)]
        steps.append(f"centred crop/pad {shape_before} -> {grid.shape} ({', '.join(how)}; pad value "
                     f"{background:g}, the volume's minimum)")
    out = nib.Nifti1Image(np.asarray(x[0].numpy(), dtype=np.float32) + background,
                          np.asarray(x.affine, dtype=np.float64))
    out.header.set_xyzt_units("mm")
    record = {"original": source.describe(), "matched": _grid_of(path, out).describe(),
              "steps": steps or ["already on the synthetic grid: unchanged"]}
    return out, record


def _mm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _write_case(case_dir: Path, case_id: str, data: np.ndarray) -> dict[str, Any]:
    lo, hi = float(data.min()), float(data.max())
    scale = (hi - lo) / 65535.0 if hi > lo else 1.0
    q = np.clip(np.rint((data - lo) / scale), 0, 65535).astype("<u2")
    case_dir.mkdir(parents=True)
    with gzip.open(case_dir / "volume.u16.gz", "wb", compresslevel=6) as f:
        f.write(np.ascontiguousarray(q).tobytes(order="C"))
    p_lo, p_hi = np.percentile(data, [1.0, 99.5])
    meta = {
        "id": case_id,
        "shape": list(data.shape),
        "dtype": "uint16",
        "order": "C (x, y, z), RAS+",
        "offset": lo,
        "scale": scale,
        "auto_window": {"width": float(max(p_hi - p_lo, 1e-6)), "level": float((p_hi + p_lo) / 2)},
    }
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def build_study(
    real_dir: str | os.PathLike,
    synthetic_dir: str | os.PathLike,
    out: str | os.PathLike,
    num_cases: int | None = None,
    seed: int = 0,
    title: str = "Reader study",
    questions: Sequence[dict[str, Any]] | None = None,
    match_grid: bool = False,
) -> Path:
    """Build a randomised, blinded reader study of real and synthetic volumes.

    Equal numbers of real and synthetic volumes are drawn (seeded), shuffled and given random case ids.
    Every volume is reoriented to RAS+ by its affine, so synthetic volumes must carry a correct affine (the
    bundles' samplers write one). All volumes must share one shape and one modality (CT in HU or MRI).

    With ``match_grid``, the real volumes are first resampled onto the synthetic volumes' grid (which they
    must share): orientation, voxel size (trilinear, Gaussian anti-aliasing where the grid is coarser) and a
    centred crop or pad with the volume's minimum (:func:`_match_grid`). The original files are only read;
    each resampled volume is kept as ``STUDY/matched/<case_id>.nii.gz`` (beside the key, not served) and the
    key records each case's original grid and the steps applied.

    Args:
        real_dir: folder of real NIfTI volumes (searched recursively).
        synthetic_dir: folder of synthetic NIfTI volumes.
        out: the study folder to create (must not exist, or be empty).
        num_cases: total number of cases, even (half real, half synthetic); default: as many as the smaller
            folder allows, twice.
        seed: seed of the draw, the shuffle, the case ids and each reader's case order.
        title: shown on the reader's page.
        questions: Likert questions (``id``, ``text``, five ``anchors``); default :data:`DEFAULT_QUESTIONS`.
        match_grid: resample the real volumes onto the synthetic volumes' grid instead of requiring one shape.

    Returns:
        The study folder.

    Raises:
        DataError: a folder is empty or missing, a volume is unreadable, not 3D or has NaN/Inf, shapes or
            modalities differ (with ``match_grid``: the synthetic volumes' grids differ), ``num_cases`` is odd or
            larger than the folders allow, or ``out`` is in use.
    """
    out_path = Path(out)
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise DataError(out_path, "already exists and is not empty: choose a new study folder (ratings live there)")
    real_files, syn_files = find_volumes(real_dir), find_volumes(synthetic_dir)
    per_group = min(len(real_files), len(syn_files))
    if num_cases is not None:
        num_cases = int(num_cases)
        if num_cases < 2 or num_cases % 2:
            raise DataError(out_path, f"--num_cases must be even and >= 2 (half real, half synthetic), got {num_cases}")
        if num_cases // 2 > per_group:
            short = real_dir if len(real_files) < num_cases // 2 else synthetic_dir
            raise DataError(short, f"has {per_group} volumes, {num_cases // 2} needed for --num_cases {num_cases}")
        per_group = num_cases // 2
    elif len(real_files) != len(syn_files):
        logger.warning("using %d real and %d synthetic volumes (balanced)", per_group, per_group)
    qs = [dict(q) for q in (questions or DEFAULT_QUESTIONS)]
    for q in qs:
        if not q.get("id") or not q.get("text") or len(q.get("anchors", [])) != 5:
            raise DataError(out_path, f"question {q!r} needs an id, a text and five anchors")

    rng = random.Random(seed)
    chosen = [("real", p) for p in sorted(rng.sample(real_files, per_group))]
    chosen += [("synthetic", p) for p in sorted(rng.sample(syn_files, per_group))]
    rng.shuffle(chosen)
    ids = rng.sample(range(1000, 10000), len(chosen))  # random 4-digit ids: the number says nothing

    grid: _Grid | None = None
    if match_grid:
        grid = _synthetic_grid(syn_files)
        for f in real_files:
            _grid_of(f)  # readable 3D volumes, before any voxel is read
    else:
        _check_shapes(real_files + syn_files)
    # the first real volume is the reference for shape and modality; volumes are converted one at a time
    order = sorted(range(len(chosen)), key=lambda i: chosen[i][0] != "real")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        reference: _Volume | None = None
        seen: list[tuple[str, _Volume]] = []
        key: dict[str, dict[str, Any]] = {}
        for i in order:
            truth, path = chosen[i]
            case_id = f"case-{ids[i]}"
            record: dict[str, Any] = {"truth": truth, "source": str(path.resolve())}
            if grid is not None and truth == "real":
                matched, record["grid"] = _match_grid(path, grid)
                record["matched_file"] = f"matched/{case_id}.nii.gz"
                (tmp / "matched").mkdir(exist_ok=True)
                nib.save(matched, str(tmp / record["matched_file"]))
                logger.info("%s (%s): %s", path, case_id, "; ".join(record["grid"]["steps"]))
                vol = _load(path, img=matched)
            else:
                vol = _load(path)
                if grid is not None:
                    record["grid"] = {"original": grid.describe(), "matched": grid.describe(),
                                      "steps": ["synthetic: on the study grid, unchanged"]}
            reference = reference or vol
            _check_consistent([vol], reference)
            _write_case(tmp / VIEWER_DIR / "cases" / case_id, case_id, vol.data)
            vol.data = np.empty(0, dtype=np.float32)  # keep only the metadata in memory
            seen.append((truth, vol))
            key[case_id] = record
        assert reference is not None
        real_vols = [v for truth, v in seen if truth == "real"]
        spacing = np.median(np.asarray([v.spacing for v in real_vols]), axis=0)
        for _, v in seen:
            if not np.allclose(v.spacing, spacing, rtol=0.01):
                logger.warning("%s: voxel size %s differs from the real volumes' %s; shown at the latter",
                               v.path, tuple(round(s, 3) for s in v.spacing), tuple(round(s, 3) for s in spacing))
        slice_axis = int(np.bincount([v.slice_axis for v in real_vols], minlength=3).argmax())
        reformat_axis = 1 if slice_axis == 2 else 2  # axial -> coronal; coronal/sagittal -> axial
        modality = reference.modality
        key = {f"case-{ids[i]}": key[f"case-{ids[i]}"] for i in range(len(chosen))}  # in the shuffled order
        public = {
            "title": title,
            "modality": modality,
            "cases": sorted(key),
            "shape": list(reference.shape),
            "spacing": [float(s) for s in spacing],
            "planes": [
                {"axis": slice_axis, "name": f"{_AXIS_NAMES[slice_axis]} (acquisition)"},
                {"axis": reformat_axis, "name": f"{_AXIS_NAMES[reformat_axis]} (reformat)"},
            ],
            "presets": WINDOW_PRESETS[modality],
            "questions": qs,
        }
        (tmp / VIEWER_DIR / "study.json").write_text(json.dumps(public, indent=1) + "\n")
        private: dict[str, Any] = {"seed": int(seed), "real_dir": str(Path(real_dir).resolve()),
                                   "synthetic_dir": str(Path(synthetic_dir).resolve())}
        if grid is not None:
            private["match_grid"] = {
                **grid.describe(), "reference": str(syn_files[0].resolve()),
                "method": "MONAI Orientation; Spacing, trilinear, after a Gaussian of sigma (new/old - 1)/2 voxels "
                          "along coarser axes; ResizeWithPadOrCrop, centred; outside the field of view the "
                          "volume's minimum. Originals untouched; resampled real volumes in matched/."}
        private["cases"] = key
        (tmp / KEY_FILE).write_text(json.dumps(private, indent=1) + "\n")
        (tmp / KEY_FILE).chmod(0o600)  # the study folder is shared; the answers stay with its owner
        if out_path.exists():
            out_path.rmdir()
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp's folder is owner-only
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("reader study: %s (%d cases, %s, shape %s); the key is %s — keep it from the readers",
                out_path, len(key), modality.upper(), public["shape"], out_path / KEY_FILE)
    return out_path


def load_public_study(study: str | os.PathLike) -> dict[str, Any]:
    """Read ``STUDY/viewer/study.json``.

    Args:
        study: the study folder.

    Returns:
        The public study description.

    Raises:
        DataError: the folder is not a built study.
    """
    path = Path(study) / VIEWER_DIR / "study.json"
    if not path.is_file():
        raise DataError(study, "is not a reader study (no viewer/study.json): run `meddiff reader-study build` first")
    return json.loads(path.read_text())


def load_key(study: str | os.PathLike) -> dict[str, Any]:
    """Read the private key ``STUDY/key.json``.

    Args:
        study: the study folder.

    Returns:
        ``{"seed": int, "cases": {case_id: {"truth": "real"|"synthetic", "source": path}}, ...}``.

    Raises:
        DataError: the key is missing.
    """
    path = Path(study) / KEY_FILE
    if not path.is_file():
        raise DataError(path, "is missing: the study's key (which case is synthetic) is needed here")
    return json.loads(path.read_text())
