# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Building a blinded study: balanced seeded draw, conversion round trip, orientation, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff.cli.main import main
from meddiff.data.errors import DataError
from meddiff.reader_study import build_study, load_key, load_public_study
from meddiff.utils import default_mode
from tests.reader_study.helpers import make_folders, write_volume


def _decode(study: Path, case: str) -> np.ndarray:
    meta = json.loads((study / "viewer" / "cases" / case / "meta.json").read_text())
    raw = gzip.decompress((study / "viewer" / "cases" / case / "volume.u16.gz").read_bytes())
    q = np.frombuffer(raw, dtype="<u2").reshape(meta["shape"])
    return meta["offset"] + meta["scale"] * q.astype(np.float64)


def test_blinded_balanced_and_seeded(tmp_path: Path) -> None:
    real, syn = make_folders(tmp_path, n_real=5, n_syn=3)
    study = build_study(real, syn, tmp_path / "s1", seed=7)
    public, key = load_public_study(study), load_key(study)
    # balanced: the smaller folder sets the size; the key says which is which, the viewer does not
    truths = [v["truth"] for v in key["cases"].values()]
    assert sorted(truths) == ["real"] * 3 + ["synthetic"] * 3
    assert sorted(public["cases"]) == sorted(key["cases"]) and len(set(public["cases"])) == 6
    assert not (study / "viewer" / "key.json").exists() and (study / "key.json").is_file()
    # the study folder is shared as a plain folder would be; the key is its owner's alone
    assert (study / "key.json").stat().st_mode & 0o777 == 0o600
    assert study.stat().st_mode & 0o777 == default_mode(directory=True)
    served = b"".join(p.read_bytes() for p in (study / "viewer").rglob("*.json"))
    for word in (b"synthetic", b"patient_", b"sample_", str(tmp_path).encode()):
        assert word not in served, word
    # every case decodes to its source volume (in RAS+), within the uint16 quantisation step
    for case, info in key["cases"].items():
        src = np.asarray(nib.as_closest_canonical(nib.load(info["source"])).dataobj, dtype=np.float64)
        meta = json.loads((study / "viewer" / "cases" / case / "meta.json").read_text())
        np.testing.assert_allclose(_decode(study, case), src, atol=meta["scale"] * 0.51)
    # the same seed draws the same study, another seed another order
    again = build_study(real, syn, tmp_path / "s2", seed=7)
    assert load_key(again)["cases"].keys() == key["cases"].keys()
    assert [v["source"] for v in load_key(again)["cases"].values()] == [v["source"] for v in key["cases"].values()]
    other = build_study(real, syn, tmp_path / "s3", seed=8)
    assert list(load_key(other)["cases"]) != list(key["cases"])


def test_num_cases_and_planes(tmp_path: Path) -> None:
    real, syn = make_folders(tmp_path, n_real=3, n_syn=3)
    study = build_study(real, syn, tmp_path / "s", num_cases=4)
    public = load_public_study(study)
    assert len(public["cases"]) == 4 and public["modality"] == "mri"
    # 1 x 1 x 2.5 mm voxels: slices are axial, the reformat coronal; the voxel size is kept for display
    assert [p["axis"] for p in public["planes"]] == [2, 1] and public["spacing"] == [1.0, 1.0, 2.5]
    assert [p["name"] for p in public["presets"]] == ["Auto", "Full range"]


def test_orientation_and_ct(tmp_path: Path) -> None:
    """A volume stored LPS with thick sagittal slices shows the same anatomy as its RAS twin."""
    rng = np.random.default_rng(0)
    ras = rng.normal(0, 300, (8, 20, 24)) - 500
    write_volume(tmp_path / "real" / "a.nii.gz", ras, spacing=(3.0, 1.0, 1.0))
    lps_affine = np.diag([-3.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [7 * 3.0, 19 * 1.0, 0]
    (tmp_path / "synthetic").mkdir()
    nib.save(nib.Nifti1Image(ras[::-1, ::-1, :].astype(np.float32), lps_affine), str(tmp_path / "synthetic" / "b.nii"))
    study = build_study(tmp_path / "real", tmp_path / "synthetic", tmp_path / "s")
    public, key = load_public_study(study), load_key(study)
    assert public["modality"] == "ct" and [p["name"] for p in public["presets"]][:2] == ["Soft tissue", "Lung"]
    assert [p["axis"] for p in public["planes"]] == [0, 2]  # sagittal acquisition, axial reformat
    a, b = (_decode(study, c) for c in key["cases"])
    np.testing.assert_allclose(a, b, atol=0.1)
    np.testing.assert_allclose(a, ras, atol=0.1)


def test_bad_input(tmp_path: Path) -> None:
    real, syn = make_folders(tmp_path, n_real=2, n_syn=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no NIfTI volumes") as e:
        build_study(tmp_path / "empty", syn, tmp_path / "s")
    assert e.value.path == str(tmp_path / "empty")
    with pytest.raises(DataError, match="is not a folder"):
        build_study(tmp_path / "missing", syn, tmp_path / "s")
    with pytest.raises(DataError, match="even"):
        build_study(real, syn, tmp_path / "s", num_cases=3)
    with pytest.raises(DataError, match="has 2 volumes, 3 needed"):
        build_study(real, syn, tmp_path / "s", num_cases=6)

    write_volume(syn / "sample_02.nii.gz", np.zeros((32, 32, 12)))
    with pytest.raises(DataError, match=r"has shape \(32, 32, 12\).*one shape") as e:
        build_study(real, syn, tmp_path / "s")
    assert e.value.path.endswith("sample_02.nii.gz")
    (syn / "sample_02.nii.gz").unlink()

    ct_real, ct_syn = make_folders(tmp_path / "ct", n_real=2, n_syn=2, ct=True)
    write_volume(ct_syn / "sample_01.nii.gz", np.full((32, 32, 16), 300.0))  # an MRI-like volume among CT
    with pytest.raises(DataError, match="looks like MRI.*one modality.*Hounsfield") as e:
        build_study(ct_real, ct_syn, tmp_path / "s")
    assert e.value.path.endswith("sample_01.nii.gz")

    bad = np.zeros((32, 32, 16))
    bad[1, 2, 3] = np.nan
    write_volume(real / "patient_09.nii.gz", bad)
    write_volume(syn / "sample_09.nii.gz", np.zeros((32, 32, 16)))
    with pytest.raises(DataError, match="NaN"):
        build_study(real, syn, tmp_path / "s")
    (real / "patient_09.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="cannot be read as NIfTI"):
        build_study(real, syn, tmp_path / "s")
    (real / "patient_09.nii.gz").unlink()
    (syn / "sample_09.nii.gz").unlink()

    build_study(real, syn, tmp_path / "s")
    with pytest.raises(DataError, match="already exists and is not empty"):
        build_study(real, syn, tmp_path / "s")
    assert not list(tmp_path.glob(".s.*"))  # no temporary folder left behind


def test_cli(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    real, syn = make_folders(tmp_path, n_real=2, n_syn=2)
    main(["reader-study", "build", "--real", str(real), "--synthetic", str(syn), "--out", str(tmp_path / "s"),
          "--num_cases", "2", "--seed", "5"])
    assert len(load_public_study(tmp_path / "s")["cases"]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["reader-study", "build", "--real", str(tmp_path / "empty"), "--synthetic", str(syn),
              "--out", str(tmp_path / "s2")])
    assert e.value.code == 1 and "holds no NIfTI volumes" in caplog.text
