# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Procedural breast-MRI phantoms with whole-breast masks, for tests, demos and offline experiments.

THESE ARE PHANTOMS, NOT PATIENT DATA. No labelled breast MRI can be shipped, so this module draws
axial, non-fat-saturated T1-like volumes from a simple anatomical model: a thorax (skin, subcutaneous
fat, pectoral muscle, lungs, heart) with two breasts of random size, projection, droop, tilt,
asymmetry and shape on the chest wall; fat (bright) with fibroglandular tissue (dark) of random
density and texture inside the breasts; a smooth multiplicative bias field, Rician noise and a
slight blur (partial volume). Voxels are anisotropic (thicker slices, like most breast protocols).
The mask is the whole breast: everything anterior to the pectoral muscle inside the two breast
mounds, skin included (label 1), background 0.

Voxel axes follow RAS+ (``+x`` = patient right, ``+y`` = anterior, ``+z`` = superior; the affine may
add a small rotation), so the breasts lie at high ``y``.

Every NIfTI file carries ``descrip = "meddiff PHANTOM - synthetic, not patient data"`` and
``dataset.json`` says the same, so phantom files cannot be mistaken for real scans.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from meddiff.utils import atomic_path, atomic_write_json

__all__ = [
    "PHANTOM_DESCRIPTION",
    "PHANTOM_LABELS",
    "BreastPhantom",
    "make_breast_phantom",
    "write_breast_phantoms",
]

logger = logging.getLogger(__name__)

PHANTOM_DESCRIPTION = "meddiff PHANTOM - synthetic, not patient data"
#: label value -> name of the phantom masks (the segmentation bundle's classes)
PHANTOM_LABELS: dict[str, str] = {"0": "background", "1": "breast"}

# relative signal of the tissues in a non-fat-saturated T1-weighted image (fat = 1)
_INTENSITY = {"fat": 1.0, "fgt": 0.32, "muscle": 0.36, "skin": 0.6, "lung": 0.05, "heart": 0.28, "air": 0.0}


@dataclass
class BreastPhantom:
    """One phantom volume and its mask.

    Attributes:
        image: ``(X, Y, Z)`` float32 intensities (fat about 1000).
        mask: ``(X, Y, Z)`` uint8 whole-breast mask (1 = breast).
        affine: 4x4 voxel-to-world matrix (RAS+, mm).
        params: the anatomical parameters drawn for this case (JSON-able).
    """

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    params: dict[str, Any]


def _rotation(degrees: Sequence[float]) -> np.ndarray:
    """Rotation matrix from angles about x, y, z (degrees), applied in that order."""
    ax, ay, az = (math.radians(float(d)) for d in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field smoothed by ``sigma_vox`` voxels per axis."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma_vox, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def make_breast_phantom(
    shape: Sequence[int] = (96, 64, 40),
    fov_mm: Sequence[float] = (360.0, 220.0, 180.0),
    seed: int = 0,
    oblique_degrees: float = 0.0,
    noise: tuple[float, float] = (0.015, 0.04),
    bias: float = 0.25,
) -> BreastPhantom:
    """Draw one breast-MRI phantom (see the module docstring for the model).

    Args:
        shape: voxels ``(X, Y, Z)``: left-right, posterior-anterior, inferior-superior.
        fov_mm: field of view along those axes in mm; spacing is ``fov_mm / shape`` (anisotropic by default).
        seed: seed of every random draw (the same seed gives the same phantom).
        oblique_degrees: maximum random rotation of the affine about each axis (0: axis-aligned RAS).
            The anatomy is defined in voxel space, so only the world placement changes.
        noise: range of the Rician noise level, as a fraction of the fat signal.
        bias: amplitude of the log bias field (0 disables it).

    Returns:
        The phantom image, mask, affine and drawn parameters.

    Raises:
        ValueError: ``shape`` or ``fov_mm`` are not three positive numbers, or a volume too small to draw.
    """
    shape = tuple(int(s) for s in shape)
    fov = np.asarray([float(f) for f in fov_mm])
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8, got {shape}")
    if fov.shape != (3,) or not np.all(fov > 0):
        raise ValueError(f"fov_mm must be three positive lengths, got {list(fov_mm)}")
    rng = np.random.default_rng(seed)
    spacing = fov / np.asarray(shape)
    # world-like coordinates in mm, centred: x left->right, y posterior->anterior, z inferior->superior
    axes = [(np.arange(n) + 0.5) * s - f / 2 for n, s, f in zip(shape, spacing, fov)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)

    # thorax: an elliptic cylinder whose front sits in the lower half of the field of view
    p: dict[str, Any] = {}
    p["thorax_half_width"] = float(rng.uniform(0.42, 0.48) * fov[0])
    p["thorax_front"] = float(rng.uniform(-0.06, 0.06) * fov[1])
    p["thorax_depth"] = float(rng.uniform(0.75, 0.95) * fov[1])
    p["fat_mm"] = float(rng.uniform(6, 16))
    p["muscle_mm"] = float(rng.uniform(8, 16))
    ax_t, ay_t = p["thorax_half_width"], p["thorax_depth"]
    yc = p["thorax_front"] - ay_t
    taper = 1.0 + 0.06 * (z / (fov[2] / 2)) ** 2  # slightly narrower towards the top and bottom

    n = p["thorax_exponent"] = float(rng.uniform(2.4, 3.2))  # superellipse: a flat front, rounded sides

    def inside_thorax(inset: float) -> np.ndarray:
        return np.abs((x * taper) / (ax_t - inset)) ** n + np.abs((y - yc) / (ay_t - inset)) ** n < 1.0

    body = inside_thorax(0.0)
    below_fat = inside_thorax(p["fat_mm"])
    cavity = inside_thorax(p["fat_mm"] + p["muscle_mm"])
    # chest-wall surface (front of the pectoral muscle) as a function of x and z
    inset = p["fat_mm"]
    ratio = np.clip((x * taper) / (ax_t - inset), -1.0, 1.0)
    y_wall = yc + (ay_t - inset) * (1.0 - np.abs(ratio) ** n) ** (1.0 / n)

    # the two breasts: superellipsoid mounds on the chest wall
    breasts = np.zeros(shape, dtype=bool)
    depth_frac = np.zeros(shape, dtype=np.float32)  # 0 at the chest wall, 1 at the nipple
    radial_frac = np.ones(shape, dtype=np.float32)  # 0 on the breast axis, 1 at its surface
    size = float(rng.uniform(0.6, 1.25))  # overall breast size of this "patient"
    p["breasts"] = []
    for side in (-1.0, 1.0):
        b = {
            "side": "left" if side < 0 else "right",
            "centre_x": float(side * rng.uniform(0.20, 0.27) * fov[0]),
            "centre_z": float(rng.uniform(-0.1, 0.1) * fov[2]),
            "base_radius": float(size * rng.uniform(52, 68) * rng.uniform(0.92, 1.08)),
            "projection": float(size * rng.uniform(40, 80) * rng.uniform(0.9, 1.1)),
            "aspect": float(rng.uniform(0.85, 1.2)),  # lateral / vertical extent
            "exponent": float(rng.uniform(1.7, 2.8)),  # profile: low = conical, high = dome
            "droop": float(rng.uniform(0.0, 0.45)),
            "tilt": float(rng.uniform(0.0, 0.3)),
        }
        p["breasts"].append(b)
        # height above the chest wall, which the breast follows laterally only down to 15 mm below its centre
        wall_at_centre = yc + (ay_t - inset) * (1.0 - abs(b["centre_x"] / (ax_t - inset)) ** n) ** (1.0 / n)
        h = y - np.maximum(y_wall, wall_at_centre - 15.0)
        t = np.clip(h / b["projection"], 0.0, None)
        profile = np.clip(1.0 - t ** b["exponent"], 0.0, None) ** (1.0 / b["exponent"])
        r = b["base_radius"] * profile
        cx = b["centre_x"] + side * b["tilt"] * b["projection"] * t
        cz = b["centre_z"] - b["droop"] * b["projection"] * t**2
        rho = np.sqrt(((x - cx) / (r * b["aspect"] + 1e-6)) ** 2 + ((z - cz) / (r + 1e-6)) ** 2)
        mound = (h > 0) & (t < 1.0) & (rho < 1.0)
        breasts |= mound
        depth_frac = np.where(mound, t, depth_frac)
        radial_frac = np.where(mound, rho, radial_frac)
    # the breasts sit on the chest wall: only what lies in front of the pectoral muscle counts
    breasts &= ~below_fat
    anatomy = body | breasts
    if not breasts.any():
        raise ValueError(f"volume {shape} with field of view {fov.tolist()} mm is too small to hold the breasts")

    # fibroglandular tissue: thresholded smooth noise, denser in the centre of each breast
    p["fgt_density"] = float(rng.uniform(0.08, 0.45))
    p["fgt_texture_mm"] = float(rng.uniform(2.5, 6.0))
    texture = _smooth_noise(rng, shape, p["fgt_texture_mm"] / spacing)
    weight = (1.0 - radial_frac) * 1.5 + (1.0 - np.abs(depth_frac - 0.45)) - 1.0
    score = texture + 1.2 * weight
    dist_out = ndimage.distance_transform_edt(anatomy, sampling=spacing)
    core = breasts & (dist_out > 3.0) & (depth_frac > 0.04)
    fgt = np.zeros(shape, dtype=bool)
    if core.any():
        threshold = np.quantile(score[core], 1.0 - p["fgt_density"])
        fgt = core & (score > threshold)

    # tissue intensities
    img = np.full(shape, _INTENSITY["air"], dtype=np.float32)
    fat_level = float(rng.uniform(0.9, 1.1))
    img[anatomy] = _INTENSITY["fat"] * fat_level
    img[below_fat & ~cavity] = _INTENSITY["muscle"]
    lungs = cavity.copy()
    img[lungs] = _INTENSITY["lung"]
    heart_centre = (float(rng.uniform(-0.06, 0.0) * fov[0]), p["thorax_front"] - p["fat_mm"] - p["muscle_mm"] - 45.0)
    heart = cavity & (((x - heart_centre[0]) / 60.0) ** 2 + ((y - heart_centre[1]) / 45.0) ** 2
                      + (z / (0.4 * fov[2])) ** 2 < 1.0)
    img[heart] = _INTENSITY["heart"]
    img[fgt] = _INTENSITY["fgt"] * float(rng.uniform(0.85, 1.15))
    skin = anatomy & (dist_out <= 2.0)
    img[skin] = _INTENSITY["skin"]
    # partial volume / point spread: a slight blur in voxel units
    img = ndimage.gaussian_filter(img, sigma=0.6, mode="nearest")

    # bias field: smooth low-order multiplicative field; receive coils make the breasts brighter
    u = [(a / (f / 2)).astype(np.float32) for a, f in zip((x, y, z), fov)]
    coeffs = rng.uniform(-1, 1, 6) * bias
    log_field = (coeffs[0] * u[0] + coeffs[1] * u[1] + coeffs[2] * u[2]
                 + coeffs[3] * u[0] ** 2 + coeffs[4] * u[1] ** 2 + coeffs[5] * u[0] * u[2])
    img = img * np.exp(log_field).astype(np.float32)
    p["bias_coefficients"] = [float(c) for c in coeffs]

    # Rician noise
    p["noise"] = float(rng.uniform(*noise))
    img = np.hypot(img + rng.normal(0, p["noise"], shape), rng.normal(0, p["noise"], shape)).astype(np.float32)
    img *= 1000.0

    affine = np.eye(4)
    rotation = _rotation(rng.uniform(-1, 1, 3) * oblique_degrees) if oblique_degrees else np.eye(3)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = rotation @ (-(np.asarray(shape) - 1) / 2 * spacing)
    p.update(seed=int(seed), shape=list(shape), spacing_mm=[float(s) for s in spacing],
             breast_volume_ml=float(breasts.sum() * np.prod(spacing) / 1000.0))
    return BreastPhantom(image=img, mask=breasts.astype(np.uint8), affine=affine, params=p)


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> Path:
    img = nib.Nifti1Image(np.ascontiguousarray(data.astype(dtype)), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    img.header["descrip"] = PHANTOM_DESCRIPTION.encode()
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


@dataclass
class _Settings:
    num_cases: int
    num_test: int
    shape: list[int]
    fov_mm: list[float]
    seed: int
    oblique_degrees: float
    labels: bool


def write_breast_phantoms(
    output_dir: str | os.PathLike,
    num_cases: int = 20,
    num_test: int = 0,
    shape: Sequence[int] = (96, 64, 40),
    fov_mm: Sequence[float] = (360.0, 220.0, 180.0),
    seed: int = 0,
    labels: bool = True,
    oblique_degrees: float = 0.0,
    prefix: str = "phantom",
) -> dict[str, Any]:
    """Write phantoms as NIfTI files, with whole-breast masks and a Decathlon-style ``dataset.json``.

    With ``labels=True``: ``imagesTr/``, ``labelsTr/`` (and ``imagesTs/``, ``labelsTs/`` for the last
    ``num_test`` cases) plus ``dataset.json`` listing ``training`` and ``test`` pairs, paths relative to
    ``output_dir`` (the layout the segmentation bundle and the label-budget experiment read). With
    ``labels=False``: only images, directly in ``output_dir`` (an unlabelled set for pre-training, the
    layout of the generation bundle's ``sample_XXX.nii.gz``). Case ``i`` uses seed ``seed * 100_003 + i``.

    Args:
        output_dir: destination folder (created).
        num_cases: number of phantoms in total (test cases included).
        num_test: how many of them form the test split (labelled sets only).
        shape: voxels ``(X, Y, Z)`` of every phantom.
        fov_mm: field of view in mm (spacing is ``fov_mm / shape``).
        seed: seed of the set.
        labels: write masks and ``dataset.json`` (else images only).
        oblique_degrees: maximum random rotation of each affine (see :func:`make_breast_phantom`).
        prefix: file name prefix (``<prefix>_XXX.nii.gz``).

    Returns:
        The ``dataset.json`` content (also for ``labels=False``, where it is written as ``phantoms.json``).

    Raises:
        ValueError: ``num_cases < 1`` or ``num_test`` not in ``[0, num_cases)``.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if labels and not 0 <= num_test < num_cases:
        raise ValueError(f"num_test must be in [0, num_cases={num_cases}), got {num_test}")
    out = Path(output_dir)
    settings = _Settings(num_cases, num_test if labels else 0, [int(s) for s in shape], [float(f) for f in fov_mm],
                         int(seed), float(oblique_degrees), bool(labels))
    training: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    cases = []
    for i in range(num_cases):
        ph = make_breast_phantom(shape, fov_mm, seed=seed * 100_003 + i, oblique_degrees=oblique_degrees)
        name = f"{prefix}_{i:03d}.nii.gz"
        is_test = labels and i >= num_cases - num_test
        if not labels:
            _save(ph.image, ph.affine, out / name, np.float32)
            cases.append({"image": name, **{k: ph.params[k] for k in ("seed", "breast_volume_ml", "fgt_density")}})
            continue
        img_dir, lab_dir = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
        _save(ph.image, ph.affine, out / img_dir / name, np.float32)
        _save(ph.mask, ph.affine, out / lab_dir / name, np.uint8)
        item = {"image": f"{img_dir}/{name}", "label": f"{lab_dir}/{name}"}
        (test if is_test else training).append(item)
        cases.append({**item, **{k: ph.params[k] for k in ("seed", "breast_volume_ml", "fgt_density")}})
    dataset: dict[str, Any] = {
        "name": "meddiff breast MRI phantoms",
        "description": "PROCEDURAL PHANTOMS, not patient data: axial non-fat-saturated T1-like breast volumes "
                       "drawn by meddiff.data.phantoms, with whole-breast masks. For tests and demos only.",
        "phantom": True,
        "modality": {"0": "MR (T1-like phantom)"},
        "labels": dict(PHANTOM_LABELS) if labels else {},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        "meddiff": {"generator": "meddiff.data.phantoms.write_breast_phantoms", **asdict(settings), "cases": cases},
    }
    atomic_write_json(out / ("dataset.json" if labels else "phantoms.json"), dataset)
    logger.info("wrote %d breast phantoms (%s voxels, %s mm spacing%s) to %s", num_cases, tuple(settings.shape),
                tuple(round(f / s, 2) for f, s in zip(settings.fov_mm, settings.shape)),
                f", {len(test)} test" if labels else ", images only", out)
    return dataset
