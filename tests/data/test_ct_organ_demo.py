# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Labelled real CT: the shipped abdominal CT with its TotalSegmentator organ map, its demo variants as NIfTI pairs
and as DICOM series with a SEG, and the same organs as an RTSTRUCT of real, irregular outlines read back onto the
series' grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from meddiff.cli.main import main
from meddiff.data import LoadVolume, read_dicom_series, read_mask
from meddiff.data.demo import CT_ORGAN_LABELS, ct_abdomen_paths, ct_organ_labels, make_ct_organ_demo
from meddiff.data.dicom_labels import read_dicom_seg, read_rtstruct
from tests.helpers import dice

from .conftest import assert_same_world
from .rt_helpers import contours_from_mask, write_rtstruct

NAMES = {name: int(v) for v, name in CT_ORGAN_LABELS.items() if int(v)}


def _mean_hu(ct: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {name: float(ct[labels == v].mean()) for name, v in NAMES.items()}


def test_organ_labels_of_the_shipped_ct_match_its_intensities() -> None:
    ct_path, seg_path = ct_abdomen_paths()
    ct_img, seg_img = nib.load(ct_path), nib.load(seg_path)
    np.testing.assert_allclose(ct_img.affine, seg_img.affine)
    ct = np.asarray(ct_img.dataobj, dtype=np.float32)
    labels = ct_organ_labels(np.asarray(seg_img.dataobj), ct)
    assert labels.shape == ct.shape == (122, 101, 30) and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {int(v) for v in CT_ORGAN_LABELS}
    hu = _mean_hu(ct, labels)
    assert float(ct[labels == 0].mean()) < -850 and hu["lung"] < -500  # air outside, aerated lung bases
    assert hu["bone"] > hu["liver"] > hu["muscle"] > hu["body"] > hu["bowel"] > hu["lung"]
    assert -20 < hu["muscle"] < 80 and -20 < hu["liver"] < 80  # unenhanced soft tissue
    assert (ct[labels == 7] > 150).mean() > 0.4 and (ct[labels == 1] > 150).mean() < 0.02  # bone is dense, body not


def test_nifti_variants_move_image_and_labels_together(tmp_path: Path) -> None:
    dataset = json.loads(make_ct_organ_demo(tmp_path / "a", num_volumes=2, seed=0).read_text())
    again = make_ct_organ_demo(tmp_path / "b", num_volumes=1, seed=0)
    other = make_ct_organ_demo(tmp_path / "c", num_volumes=1, seed=1)
    assert dataset["labels"] == CT_ORGAN_LABELS and dataset["numTraining"] == 2
    source, _ = ct_abdomen_paths()
    arrays = []
    for item in dataset["training"]:
        image, label = nib.load(tmp_path / "a" / item["image"]), nib.load(tmp_path / "a" / item["label"])
        np.testing.assert_allclose(image.affine, nib.load(source).affine)
        np.testing.assert_array_equal(image.affine, label.affine)
        ct, labels = np.asarray(image.dataobj), np.asarray(label.dataobj)
        assert ct.dtype == np.int16 and labels.dtype == np.uint8 and ct.shape == labels.shape == (122, 101, 30)
        hu = _mean_hu(ct.astype(np.float32), labels)  # labels still sit on their organs after the motion
        assert hu["bone"] > hu["liver"] > hu["muscle"] > hu["bowel"] > hu["lung"], hu
        arrays.append(labels)
    assert dice(arrays[0] == 2, arrays[1] == 2) < 0.98  # variants differ
    first = tmp_path / "a" / dataset["training"][0]["label"]
    np.testing.assert_array_equal(nib.load(first).dataobj, nib.load(again.parent / "labelsTr" / first.name).dataobj)
    assert dice(arrays[0] == 2, np.asarray(nib.load(other.parent / "labelsTr" / first.name).dataobj) == 2) < 0.98


def test_dicom_variants_with_their_seg_equal_the_nifti_variants(tmp_path: Path) -> None:
    nifti = json.loads(make_ct_organ_demo(tmp_path / "nifti", num_volumes=1, seed=3).read_text())["training"][0]
    main(["ct-organ-demo", "--output_dir", str(tmp_path / "dicom"), "--num_volumes", "1", "--seed", "3",
          "--layout", "dicom"])
    dicom = json.loads((tmp_path / "dicom" / "dataset.json").read_text())
    item = dicom["training"][0]
    series, seg = tmp_path / "dicom" / item["image"], tmp_path / "dicom" / item["label"]
    assert seg.parent == series and pydicom.dcmread(seg).Modality == "SEG"
    ct, ct_affine, _ = read_dicom_series(series)  # the SEG in the folder is not a second series
    ref = nib.load(tmp_path / "nifti" / nifti["image"])
    assert_same_world(np.asarray(ct), ct_affine, np.asarray(ref.dataobj, np.float32), ref.affine, atol=0.5)
    labels, affine, meta = read_mask(seg, NAMES)
    np.testing.assert_allclose(affine, ct_affine, atol=1e-6)
    ref_labels = nib.load(tmp_path / "nifti" / nifti["label"])
    assert_same_world(labels, affine, np.asarray(ref_labels.dataobj), ref_labels.affine, atol=0)
    assert meta["kind"] == "seg"
    with pytest.raises(ValueError, match="layout"):
        make_ct_organ_demo(tmp_path / "bad", layout="nrrd")


def test_organ_outlines_as_rtstruct_read_back_onto_the_series_grid(tmp_path: Path) -> None:
    """Real anatomy, drawn as contours: every organ's RTSTRUCT outline fills back to its voxels (Dice >= 0.98)."""
    item = json.loads(make_ct_organ_demo(tmp_path, num_volumes=1, seed=0, layout="dicom").read_text())["training"][0]
    series = tmp_path / item["image"]
    labels, affine = read_dicom_seg(tmp_path / item["label"], series, NAMES)  # on the series' grid
    files = sorted((f for f in series.iterdir() if f.name != "seg.dcm"),
                   key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
    _, ct_affine, _ = read_dicom_series(series)
    positions = [np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float) for f in files]
    normal = ct_affine[:3, 2] * [-1, -1, 1]  # RAS -> LPS: the slice direction as the files store it
    assert np.all(np.diff([p @ normal for p in positions]) > 0)  # files[k] is slice k of the grid
    rois = {name: contours_from_mask(labels == v) for name, v in NAMES.items()}
    rtstruct = write_rtstruct(series / "RS.dcm", files, rois)
    read, read_affine = read_rtstruct(rtstruct, series, NAMES)
    np.testing.assert_allclose(read_affine, affine, atol=1e-9)
    np.testing.assert_allclose(LoadVolume()(series).affine.numpy(), read_affine, atol=1e-6)
    for name, v in NAMES.items():
        assert dice(read == v, labels == v) >= 0.98, (name, dice(read == v, labels == v))
    assert (read != labels).mean() < 0.005
