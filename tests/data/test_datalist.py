# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""find_volumes / make_datalist and the ``meddiff datalist`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from meddiff.cli.main import COMMANDS, main
from meddiff.data import DataError, LoadVolumed, find_volumes, load_or_make_datalist, make_datalist, write_dicom_series

from .conftest import SHAPE, ct_volume, make_affine, save_nifti


@pytest.fixture
def tree(tmp_path: Path, rng: np.random.Generator) -> Path:
    """A data folder: NIfTI, .npy, two DICOM series folders, plus files to ignore."""
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    vol = rng.normal(size=SHAPE).astype(np.float32)
    save_nifti(root / "a.nii.gz", vol, make_affine())
    save_nifti(root / "sub" / "b.nii", vol, make_affine())
    np.save(root / "sub" / "deeper" / "c.npy", rng.normal(size=(SHAPE[2], SHAPE[0], SHAPE[1])).astype(np.float32))
    write_dicom_series(ct_volume(rng), make_affine(), root / "dicom" / "patient1" / "ct", modality="CT")
    write_dicom_series(ct_volume(rng), make_affine(), root / "dicom" / "patient2" / "mr")
    (root / "README.txt").write_text("not a volume")
    (root / ".hidden.nii.gz").write_bytes(b"")
    (root / "dicom" / "patient1" / "ct" / "series.json").write_text("{}")
    return root


def test_find_volumes(tree: Path) -> None:
    found = find_volumes(tree)
    assert [p.relative_to(tree).as_posix() for p in found] == [
        "a.nii.gz",
        "dicom/patient1/ct",
        "dicom/patient2/mr",
        "sub/b.nii",
        "sub/deeper/c.npy",
    ]


def test_make_datalist_split_paths_and_loading(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "lists" / "datalist.json"
    result = make_datalist(tree, out, val_fraction=0.2, seed=0, npy_spacing=(1, 1, 3))
    on_disk = json.loads(out.read_text())
    assert on_disk == result
    assert len(result["training"]) == 4 and len(result["validation"]) == 1
    assert result["meddiff"]["seed"] == 0 and result["meddiff"]["val_fraction"] == 0.2
    assert result["meddiff"]["data_dir"] == str(tree.resolve()) and result["meddiff"]["npy_spacing"] == [1, 1, 3]
    assert os.listdir(out.parent) == ["datalist.json"]  # no temp files left
    everything = sorted(i["image"] for i in result["training"] + result["validation"])
    assert everything == sorted(p.relative_to(tree).as_posix() for p in find_volumes(tree))

    # relative paths resolve with MONAI, and every item loads
    load = LoadVolumed(keys="image", npy_spacing=(1, 1, 3))
    for key in ("training", "validation"):
        items = load_decathlon_datalist(out, data_list_key=key, base_dir=tree)
        for item in items:
            assert Path(item["image"]).exists()
            assert tuple(load(item)["image"].shape) == (1, *SHAPE)

    absolute = make_datalist(tree, tmp_path / "abs.json", relative=False)
    assert all(Path(i["image"]).is_absolute() for i in absolute["training"] + absolute["validation"])


def test_split_is_deterministic_by_seed(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(10):
        np.save(root / f"v{i}.npy", np.zeros((2, 2, 2), np.float32))
    first = make_datalist(root, tmp_path / "a.json", seed=7)
    again = make_datalist(root, tmp_path / "b.json", seed=7)
    assert first["training"] == again["training"] and first["validation"] == again["validation"]
    assert len(first["validation"]) == 2 and len(first["training"]) == 8
    splits = {
        tuple(i["image"] for i in make_datalist(root, tmp_path / "c.json", seed=s)["validation"]) for s in range(6)
    }
    assert len(splits) > 1  # the seed matters
    none = make_datalist(root, tmp_path / "d.json", val_fraction=0.0)
    assert len(none["validation"]) == 0 and len(none["training"]) == 10

    for name in ("v2.npy", "v3.npy", "v4.npy", "v5.npy", "v6.npy", "v7.npy", "v8.npy", "v9.npy"):
        (root / name).unlink()
    two = make_datalist(root, tmp_path / "e.json", val_fraction=0.2)
    assert len(two["validation"]) == 1 and len(two["training"]) == 1  # at least one validation item
    with pytest.raises(ValueError, match="val_fraction"):
        make_datalist(root, tmp_path / "f.json", val_fraction=1.0)


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty: contains no volumes"):
        make_datalist(tmp_path / "empty", tmp_path / "out.json")
    with pytest.raises(DataError, match=r"nope: folder does not exist"):
        make_datalist(tmp_path / "nope", tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_verify_option_stops_at_a_bad_volume(tree: Path, tmp_path: Path) -> None:
    bad = tree / "sub" / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.nii\.gz: cannot be read"):
        make_datalist(tree, tmp_path / "out.json", verify=True, npy_spacing=(1, 1, 3))
    assert not (tmp_path / "out.json").exists()


def test_cli_datalist_subprocess(tree: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "cli"
    out_dir.mkdir()
    out = out_dir / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "meddiff.cli.main", "datalist", str(tree), str(out), "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"datalist: {out} (4 training, 1 validation)" in proc.stderr
    written = json.loads(out.read_text())
    assert written["meddiff"]["seed"] == 1
    expected = make_datalist(tree, tmp_path / "ref.json", seed=1)
    assert written["training"] == expected["training"] and written["validation"] == expected["validation"]
    assert os.listdir(out_dir) == ["out.json"]  # no temp files left


def test_cli_in_process_error_exit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert "datalist" in COMMANDS
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["datalist", str(tmp_path / "empty"), str(tmp_path / "out.json")])
    assert exit_info.value.code == 1
    assert "contains no volumes" in caplog.text


def test_volume_finder_replaces_the_default_search(tree: Path, tmp_path: Path) -> None:
    picked = [tree / "a.nii.gz", tree / "dicom" / "patient1" / "ct"]
    calls: list[Path] = []

    def finder(root: Path) -> list[Path]:
        calls.append(root)
        return picked

    made = make_datalist(tree, tmp_path / "d.json", val_fraction=0.5, volume_finder=finder, verify=True)
    assert calls == [tree]
    assert sorted(i["image"] for i in made["training"] + made["validation"]) == ["a.nii.gz", "dicom/patient1/ct"]
    split = load_or_make_datalist(tree, tmp_path / "e.json", volume_finder=finder)
    assert sorted(i["image"] for i in split["training"] + split["validation"]) == sorted(str(p) for p in picked)
    with pytest.raises(DataError, match="contains no volumes"):
        make_datalist(tree, tmp_path / "f.json", volume_finder=lambda root: [])
    assert not (tmp_path / "f.json").exists()
