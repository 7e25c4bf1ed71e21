# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""CT series selection in LIDC-IDRI-style DICOM trees: the rule, the skipped series, and the errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from meddiff.data import (
    DataError,
    LoadVolume,
    find_ct_volumes,
    find_volumes,
    load_or_make_datalist,
    make_datalist,
    select_ct_series,
    summarize_dicom_folder,
    write_dicom_series,
)
from meddiff.data.demo import write_decoy_series

from .conftest import save_nifti

AXIAL = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-identity orientation, like scanners write axial CT
CORONAL = np.array([[-0.8, 0, 0, 0], [0, 0, 2.5, 0], [0, -0.8, 0, 0], [0, 0, 0, 1.0]])


def _ct(folder: Path, slices: int, patient_id: str = "P1", affine: np.ndarray = AXIAL, **kwargs) -> Path:
    """A small CT series of ``slices`` slices in ``folder`` (int16 stored, intercept -1024)."""
    volume = np.random.default_rng(slices).integers(-1000, 1500, size=(6, 5, slices)).astype(np.float32)
    write_dicom_series(volume, affine, folder, modality="CT", patient_id=patient_id, rescale_intercept=-1024.0,
                       **kwargs)
    return folder


def _patient(root: Path, patient_id: str, decoys: tuple[str, ...] = ("CR", "SR", "SEG")) -> Path:
    """``root/<id>/study/{ct-main (20 slices), decoys}``; returns the main CT folder."""
    study = root / patient_id / "01-01-2000-study"
    uid = generate_uid()
    for kind in decoys:
        write_decoy_series(study / f"{kind}-series", kind, patient_id, uid)
    return _ct(study / "3000-ct-main", 20, patient_id)


def test_rule_picks_the_axial_ct_with_most_slices_and_logs_the_others(tmp_path: Path, caplog) -> None:
    patient = tmp_path / "LIDC-IDRI-0001"
    main = _patient(tmp_path, "LIDC-IDRI-0001")
    study = main.parent
    _ct(study / "3001-thick", 8)  # fewer than min_slices
    _ct(study / "3002-fewer", 18)  # a candidate, but fewer slices
    _ct(study / "3003-coronal", 30, affine=CORONAL)
    _ct(study / "3004-scout", 25, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with caplog.at_level(logging.INFO, logger="meddiff.data.ct_series"):
        assert select_ct_series(patient) == main
    log = caplog.text
    assert f"using CT series {main}" in log
    assert "3001-thick (CT, 8 files" in log and "only 8 slices (fewer than min_slices=16)" in log
    assert "3002-fewer" in log and "not chosen: 3000-ct-main has more slices" in log
    assert "3003-coronal" in log and "not axial" in log
    assert "3004-scout" in log and "localizer" in log
    assert "CR-series (CR, 1 file" in log and "modality CR, not CT" in log
    assert "modality SR, not CT" in log and "modality SEG, not CT" in log
    # a lower bar makes the thick series a candidate, but the rule still prefers more slices
    assert select_ct_series(patient, min_slices=2) == main


def test_ties_go_to_thinner_slices_then_lower_series_number(tmp_path: Path) -> None:
    patient = tmp_path / "p"
    _ct(patient / "a", 20, extra={"SliceThickness": "2.5", "SeriesNumber": 5})
    b = _ct(patient / "b", 20, extra={"SliceThickness": "1.25", "SeriesNumber": 7})
    assert select_ct_series(patient) == b
    shutil.rmtree(b)
    c = _ct(patient / "c", 20, extra={"SliceThickness": "2.5", "SeriesNumber": 3})
    assert select_ct_series(patient) == c


def test_summary_reads_headers_only(tmp_path: Path) -> None:
    folder = _ct(tmp_path / "s", 17, series_description="CHEST")
    summary = summarize_dicom_folder(folder)
    assert summary is not None and summary.reason is None
    assert (summary.modality, summary.num_files, summary.patient_id, summary.series_description) == (
        "CT", 17, "P1", "CHEST")
    assert summary.slice_thickness == pytest.approx(2.5)
    (tmp_path / "empty").mkdir()
    assert summarize_dicom_folder(tmp_path / "empty") is None


def test_find_ct_volumes_one_series_per_patient_plus_nifti(tmp_path: Path, caplog) -> None:
    root = tmp_path / "LIDC-IDRI"
    chosen = [_patient(root, f"LIDC-IDRI-000{i}") for i in (1, 2)]
    _ct(chosen[0].parent / "3005-second-recon", 17, "LIDC-IDRI-0001")
    save_nifti(root / "extra_ct.nii.gz", np.zeros((4, 4, 4), np.float32), AXIAL)
    np.save(root / "stack.npy", np.zeros((4, 4, 4), np.float32))
    with caplog.at_level(logging.INFO):
        found = find_ct_volumes(root)
    assert found == sorted([*chosen, root / "extra_ct.nii.gz"])
    assert "stack.npy: not a CT input" in caplog.text
    assert "3 CT volumes (2 patients with DICOM, 1 NIfTI files)" in caplog.text
    # every DICOM image folder is a volume for the MRI finder, CR decoys included; SR and SEG objects are not
    assert len(find_volumes(root)) == 2 * 2 + 3  # + the second recon, the NIfTI and the .npy files
    assert len(find_volumes(root, skip_objects=False)) == 2 * 4 + 3


def test_patients_are_top_level_folders_then_patient_ids(tmp_path: Path) -> None:
    data = tmp_path / "manifest" / "LIDC-IDRI"
    chosen = [_patient(data, name) for name in ("case-a", "case-b")]
    # anonymised exports often give every patient the same PatientID: their folders still separate them
    same_id = [_ct(data / f"anon-{i}" / "series", 20, "ANONYMOUS") for i in range(2)]
    assert find_ct_volumes(data) == sorted(chosen + same_id)
    # from a wrapper folder (TCIA manifest) holding all patients, PatientID separates them
    assert find_ct_volumes(tmp_path / "manifest") == sorted([*chosen, same_id[0]])


def test_non_ct_only_patient_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    _patient(tmp_path, "LIDC-IDRI-0001")
    study = tmp_path / "LIDC-IDRI-0002" / "study"
    for kind in ("CR", "SR", "SEG"):
        write_decoy_series(study / kind, kind, "LIDC-IDRI-0002", "1.2.3")
    with pytest.raises(DataError) as err:
        find_ct_volumes(tmp_path)
    assert err.value.path == str(tmp_path / "LIDC-IDRI-0002")
    assert "patient LIDC-IDRI-0002 has no usable axial CT series" in err.value.problem
    assert "modality CR, not CT" in err.value.problem and "modality SEG, not CT" in err.value.problem
    with pytest.raises(DataError, match=r"LIDC-IDRI-0002/study: patient LIDC-IDRI-0002 has no usable axial CT"):
        select_ct_series(study)


def test_mixed_series_folder_is_an_error(tmp_path: Path) -> None:
    main = _patient(tmp_path / "bad", "P1")
    other = _ct(tmp_path / "elsewhere", 20, "P1")
    for i, f in enumerate(sorted(other.iterdir())[:3]):
        shutil.copy(f, main / f"other_{i}.dcm")
    with pytest.raises(DataError, match=r"3000-ct-main: contains 2 DICOM series, put each in its own folder"):
        find_ct_volumes(tmp_path / "bad")


def test_non_ct_series_sharing_a_folder_are_skipped(tmp_path: Path) -> None:
    main = _patient(tmp_path, "P1", decoys=())
    mixed = tmp_path / "P1" / "mixed"
    write_decoy_series(mixed / "a", "CR", "P1", "1.2.3")
    write_decoy_series(mixed / "b", "CR", "P1", "1.2.3")
    (mixed / "a" / "000001.dcm").rename(mixed / "b" / "000002.dcm")
    summary = summarize_dicom_folder(mixed / "b")
    assert summary is not None and "holds 2 series, none of them CT" in summary.reason
    assert find_ct_volumes(tmp_path) == [main]
    # an SR beside one CR is a non-image object, not a second series
    write_decoy_series(mixed / "c", "SR", "P1", "1.2.3")
    (mixed / "c" / "000001.dcm").rename(mixed / "b" / "000003.dcm")
    (mixed / "b" / "000002.dcm").unlink()
    summary = summarize_dicom_folder(mixed / "b")
    assert summary is not None and summary.reason == "modality CR, not CT" and summary.num_files == 1


def test_unreadable_header_names_the_file(tmp_path: Path) -> None:
    main = _patient(tmp_path, "P1")
    bad = sorted(main.iterdir())[4]
    bad.write_bytes(bad.read_bytes()[:200])  # cut inside the header
    with pytest.raises(DataError) as err:
        find_ct_volumes(tmp_path)
    assert err.value.path == str(bad) and "cannot be read (truncated or corrupt?)" in err.value.problem


@pytest.mark.parametrize("damage", ["truncated", "gap", "duplicate"])
def test_bad_chosen_series_fails_the_checks_and_writes_no_datalist(tmp_path: Path, damage: str) -> None:
    data = tmp_path / "data"
    main = _patient(data, "P1")
    _patient(data, "P2")
    files = sorted(main.iterdir())
    if damage == "truncated":
        files[7].write_bytes(files[7].read_bytes()[:-100])
        problem, name = r"truncated", files[7].name
    elif damage == "gap":
        files[10].unlink()
        problem, name = r"inconsistent slice spacing: 5 mm between .* \(missing slice\?\)", files[9].name
    else:
        shutil.copy(files[3], main / "copy_of_slice.dcm")
        problem, name = r"duplicated slice position", "copy_of_slice.dcm"
    assert select_ct_series(data / "P1") == main  # headers alone pass
    with pytest.raises(DataError, match=problem) as err:
        select_ct_series(data / "P1", check=True)
    assert name in str(err.value)
    out = tmp_path / "models" / "datalist.json"
    with pytest.raises(DataError, match=problem):
        load_or_make_datalist(data, out, volume_finder=find_ct_volumes)
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_datalist_with_the_ct_finder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    chosen = [_patient(data, f"P{i}") for i in range(4)]
    made = make_datalist(data, tmp_path / "d.json", val_fraction=0.25, volume_finder=find_ct_volumes, verify=True)
    listed = sorted(data / i["image"] for i in made["training"] + made["validation"])
    assert listed == chosen and len(made["validation"]) == 1
    split = load_or_make_datalist(data, tmp_path / "d.json")  # reused as written
    assert sorted(Path(i["image"]) for i in split["training"] + split["validation"]) == chosen
    assert json.loads((tmp_path / "d.json").read_text())["meddiff"]["num_training"] == 3
    image = LoadVolume()(chosen[0])
    assert image.meta["modality"] == "CT" and tuple(image.shape) == (1, 6, 5, 20)


def test_ct_demo_trees_go_through_the_selection(tmp_path: Path) -> None:
    from meddiff.data.demo import ct_head_path, make_ct_demo

    source = ct_head_path()
    assert source.stat().st_size < 2 * 1024 * 1024 and (source.parent / "README.md").is_file()
    written = make_ct_demo(tmp_path, num_volumes=2, spacing=(6.0, 6.0, 6.0), decoys=("CR", "SR", "SEG"))
    assert find_ct_volumes(tmp_path) == written
    assert sorted(p.name for p in written[0].parent.iterdir()) == ["cr-decoy", "ct-axial", "seg-decoy", "sr-decoy"]
    image = LoadVolume()(written[0])
    assert image.meta["modality"] == "CT" and -1024 <= float(image.min()) < -900 and 0 < float(image.max()) < 500
