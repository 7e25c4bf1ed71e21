# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""``meddiff reader-study build --match_grid``: real scans of other shapes, voxel sizes and orientations are
resampled onto the synthetic grid; the originals stay as they were and the key records what was done."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from meddiff.data.errors import DataError
from meddiff.reader_study import build_study, load_key, load_public_study
from tests.reader_study.helpers import make_folders, write_volume
from tests.reader_study.test_build import _decode

REPO = Path(__file__).resolve().parents[2]
GRID = {"shape": [32, 32, 16], "spacing": [1.0, 1.0, 2.5], "axcodes": "RAS"}  # make_folders' synthetic grid
BALL_OFFSET_MM = np.array([6.0, -4.0, 5.0])  # the ball's centre from the field-of-view centre, RAS mm


def _real_scan(path: Path, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """An MRI-like scan: a bright ball of radius 7 mm off the field-of-view centre, on a dim ramp; world mm."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    dist = np.linalg.norm(world - (centre + BALL_OFFSET_MM), axis=-1)
    data = np.where(dist < 7.0, 600.0, 20.0 + 0.5 * world[..., 0] % 10).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return centre + BALL_OFFSET_MM


def _affine(columns: list[list[float]], origin: list[float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, dtype=float).T  # column j: world step of voxel axis j
    affine[:3, 3] = origin
    return affine


# LPS at 0.8 x 0.8 x 2 mm, larger than the grid (crop); slices first (S, L, A) at 3 x 1.25 x 1.25 mm (pad)
REALS = {
    "patient_lps.nii.gz": (_affine([[-0.8, 0, 0], [0, -0.8, 0], [0, 0, 2.0]], [20.0, 15.0, -30.0]), (50, 44, 24),
                           {"axcodes": "LPS", "spacing": [0.8, 0.8, 2.0]}),
    "patient_sla.nii.gz": (_affine([[0, 0, 3.0], [-1.25, 0, 0], [0, 1.25, 0]], [12.0, -20.0, -9.0]), (9, 20, 22),
                           {"axcodes": "SLA", "spacing": [3.0, 1.25, 1.25]}),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_match_grid_through_the_cli(tmp_path: Path) -> None:
    _, syn = make_folders(tmp_path, n_real=0, n_syn=2)
    balls = {name: _real_scan(tmp_path / "real" / name, affine, shape) for name, (affine, shape, _) in REALS.items()}
    before = {p: (_sha256(p), p.stat().st_mtime_ns) for p in (tmp_path / "real").iterdir()}
    # without --match_grid the other shapes are refused, as before
    with pytest.raises(DataError, match="one shape"):
        build_study(tmp_path / "real", syn, tmp_path / "refused")
    study = tmp_path / "study"
    subprocess.run([sys.executable, "-m", "meddiff.cli.main", "reader-study", "build", "--real", str(tmp_path / "real"),
                    "--synthetic", str(syn), "--out", str(study), "--match_grid", "--seed", "3"],
                   check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert {p: (_sha256(p), p.stat().st_mtime_ns) for p in (tmp_path / "real").iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == sorted(REALS)  # nothing written beside them

    public, key = load_public_study(study), load_key(study)
    assert public["shape"] == GRID["shape"] and public["spacing"] == GRID["spacing"]
    assert {k: key["match_grid"][k] for k in GRID} == GRID
    assert key["match_grid"]["reference"].endswith("sample_00.nii.gz") and "trilinear" in key["match_grid"]["method"]
    assert not (study / "viewer" / "matched").exists()  # the resampled real scans are kept beside the key only
    real_cases = {Path(v["source"]).name: (c, v) for c, v in key["cases"].items() if v["truth"] == "real"}
    assert sorted(real_cases) == sorted(REALS)
    for name, (case, entry) in real_cases.items():
        affine, shape, expect = REALS[name]
        src = nib.load(str(tmp_path / "real" / name))
        original = entry["grid"]["original"]
        assert original["shape"] == list(shape) and original["axcodes"] == expect["axcodes"]
        np.testing.assert_allclose(original["spacing"], expect["spacing"], rtol=1e-6)
        assert entry["grid"]["matched"] == GRID
        steps = entry["grid"]["steps"]
        assert len(steps) == 3, steps
        assert steps[0].startswith(f"reoriented {expect['axcodes']} -> RAS")
        assert "-> (1, 1, 2.5) mm, trilinear" in steps[1]
        assert ("anti-aliasing sigma (0.125, 0.125, 0.125)" in steps[1]) == (name == "patient_lps.nii.gz")  # coarser
        assert steps[2].startswith("centred crop/pad") and "-> (32, 32, 16)" in steps[2]
        # the matched volume is on the synthetic grid: shape, voxel size, orientation
        matched = nib.load(str(study / entry["matched_file"]))
        assert matched.shape == tuple(GRID["shape"]) and nib.aff2axcodes(matched.affine) == tuple(GRID["axcodes"])
        np.testing.assert_allclose(matched.header.get_zooms()[:3], GRID["spacing"], rtol=1e-5)
        np.testing.assert_allclose(np.abs(np.diag(matched.affine)[:3]), GRID["spacing"], rtol=1e-5)
        data = np.asarray(matched.dataobj, dtype=np.float64)
        orig = np.asarray(src.dataobj, dtype=np.float64)
        # intensities stay in the original range (no overshoot); padding is the volume's minimum
        assert orig.min() - 1e-3 <= data.min() and data.max() <= orig.max() + 1e-3
        # geometry: the ball sits where the matched affine says its world centre is (a wrong flip misses by 8+ mm)
        ball = ndimage.center_of_mass(data > 300)
        expected = np.linalg.inv(matched.affine) @ np.append(balls[name], 1.0)
        np.testing.assert_allclose(ball, expected[:3], atol=0.6)
        # centred: the field-of-view centre moves by less than one output voxel
        centre_in = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
        centre_out = matched.affine[:3, :3] @ ((np.asarray(GRID["shape"]) - 1) / 2) + matched.affine[:3, 3]
        assert np.all(np.abs(centre_out - centre_in) <= np.asarray(GRID["spacing"]) + 1e-6), (centre_in, centre_out)
        # readers see exactly the matched volume
        meta = json.loads((study / "viewer" / "cases" / case / "meta.json").read_text())
        np.testing.assert_allclose(_decode(study, case), data, atol=meta["scale"] * 0.51)
    # the padded scan (9 x 3 mm = 27 mm < 40 mm along S) has the minimum in its padded slices
    _, sla = real_cases["patient_sla.nii.gz"]
    sla_data = np.asarray(nib.load(str(study / sla["matched_file"])).dataobj)
    sla_min = float(np.asarray(nib.load(str(tmp_path / "real" / "patient_sla.nii.gz")).dataobj).min())
    assert "padded" in sla["grid"]["steps"][2] and np.all(sla_data[:, :, 0] == pytest.approx(sla_min))
    for entry in key["cases"].values():
        if entry["truth"] == "synthetic":
            assert entry["grid"]["steps"] == ["synthetic: on the study grid, unchanged"] and "matched_file" not in entry


def test_match_grid_needs_one_synthetic_grid(tmp_path: Path) -> None:
    real, syn = make_folders(tmp_path, n_real=2, n_syn=2)
    write_volume(syn / "sample_09.nii.gz", np.zeros((32, 32, 16)), spacing=(1.0, 1.0, 3.0))
    with pytest.raises(DataError, match=r"has grid .*'spacing': \[1.0, 1.0, 3.0\].*sample_00.nii.gz has .*must share"
                       ) as e:
        build_study(real, syn, tmp_path / "s", match_grid=True)
    assert e.value.path.endswith("sample_09.nii.gz")
    assert not (tmp_path / "s").exists()
    (syn / "sample_09.nii.gz").unlink()
    # real volumes already on the grid are recorded as unchanged, with the same voxels as without --match_grid
    study = build_study(real, syn, tmp_path / "s", match_grid=True)
    plain = build_study(real, syn, tmp_path / "plain")
    for case, entry in load_key(study)["cases"].items():
        if entry["truth"] == "real":
            assert entry["grid"]["steps"] == ["already on the synthetic grid: unchanged"]
            np.testing.assert_allclose(_decode(study, case), _decode(plain, case), atol=1e-3)
