# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Labels from clinical DICOM: an RTSTRUCT (contours from each slice's header) and a SEG (highdicom) written for a
synthetic CT are read back onto the CT grid (Dice, affine), image folders holding RT objects are read as their one
image series, and bad structure sets are one clear error."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from meddiff.data import (
    DataError,
    LoadVolume,
    find_ct_volumes,
    find_volumes,
    make_datalist,
    read_dicom_series,
    summarize_dicom_folder,
    write_dicom_series,
)
from meddiff.data.dicom_labels import (
    _fill_polygon,
    dicom_label_to_nifti,
    find_label_objects,
    read_dicom_seg,
    read_rtstruct,
)
from meddiff.data.segmentation import LoadSegmentationPaird
from tests.helpers import dice

from .rt_helpers import (
    SHAPE,
    source_masks,
    write_ct,
    write_rtdose,
    write_rtplan,
    write_rtstruct,
    write_seg,
)

LABELS = {"background": 0, "Tumour": 1, "Ring": 2}


def _check_labels(labels: np.ndarray, affine: np.ndarray, ct_folder: Path) -> None:
    """Same grid and affine as the CT reader, Dice >= 0.98 per label against the source masks."""
    _, ct_affine, _ = read_dicom_series(ct_folder)
    assert labels.shape == SHAPE
    np.testing.assert_allclose(affine, ct_affine, atol=1e-9)
    np.testing.assert_allclose(LoadVolume()(ct_folder).affine.numpy(), affine, atol=1e-6)
    for name, mask in source_masks().items():
        score = dice(labels == LABELS[name], mask)
        assert score >= 0.98, (name, score)
    assert set(np.unique(labels).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_rtstruct_and_seg_round_trip_onto_the_ct_grid(tmp_path: Path, oblique: bool) -> None:
    ct = tmp_path / "patient" / "CT"
    files = write_ct(ct, oblique=oblique)
    rtstruct = write_rtstruct(ct / "RS.dcm", files)  # in the image folder, as planning exports do
    seg = write_seg(tmp_path / "patient" / "SEG" / "seg.dcm", files)

    labels, affine = read_rtstruct(rtstruct, ct, LABELS)
    _check_labels(labels, affine, ct)
    assert (labels == 2).sum() == source_masks()["Ring"].sum()  # the hole is cut (even-odd), voxel-exact

    seg_labels, seg_affine = read_dicom_seg(seg, ct, {"Tumour": 1, "Ring": 2})
    _check_labels(seg_labels, seg_affine, ct)
    np.testing.assert_array_equal(seg_labels, np.select(list(reversed([m for m in source_masks().values()])),
                                                        [2, 1], 0))
    default, _ = read_dicom_seg(seg, ct)  # default: segment numbers, in the SEG's order (Tumour 1, Ring 2)
    np.testing.assert_array_equal(default, seg_labels)

    # a SEG that does not reference the source slices is placed by its plane positions
    ds = pydicom.dcmread(seg)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    ds.save_as(seg)
    by_position, by_position_affine = read_dicom_seg(seg, ct, {"Tumour": 1, "Ring": 2})
    np.testing.assert_array_equal(by_position, seg_labels)
    np.testing.assert_allclose(by_position_affine, seg_affine)


def test_label_objects_are_found_and_written_as_nifti(tmp_path: Path) -> None:
    study = tmp_path / "patient"
    files = write_ct(study / "CT")
    rtstruct = write_rtstruct(study / "RTSTRUCT" / "RS.dcm", files)
    write_rtplan(study / "RTPLAN" / "RP.dcm", files[0])
    other = write_ct(tmp_path / "other" / "CT", patient_id="RT2")
    write_rtstruct(study / "RTSTRUCT-other" / "RS.dcm", other)  # outlines another scan: not this one's
    assert find_label_objects(study / "CT") == [rtstruct]

    out = dicom_label_to_nifti(study / "CT", None, LABELS, tmp_path / "labels" / "patient.nii.gz")
    img = nib.load(out)
    labels = np.asarray(img.dataobj)
    assert labels.dtype == np.uint8
    _check_labels(labels, img.affine, study / "CT")
    assert [p.name for p in out.parent.iterdir()] == ["patient.nii.gz"]  # written atomically, nothing else left
    pair = LoadSegmentationPaird(label_names=LABELS, require_label=True)({"image": str(study / "CT"), "label": str(out)})
    assert pair["image"].shape == pair["label"].shape == (1, *SHAPE)  # the pair checks (shape, affine, values) pass

    with pytest.raises(DataError, match=r"is an RTSTRUCT: pass label_names"):
        dicom_label_to_nifti(study / "CT", rtstruct, None, tmp_path / "x.nii.gz")
    write_seg(study / "SEG" / "seg.dcm", files)
    with pytest.raises(DataError, match=r"CT: 2 RTSTRUCT/SEG objects reference series .*; pass label_obj"):
        dicom_label_to_nifti(study / "CT", None, LABELS, tmp_path / "x.nii.gz")


def test_missing_roi_and_foreign_objects_are_one_clear_error(tmp_path: Path) -> None:
    files = write_ct(tmp_path / "CT")
    rtstruct = write_rtstruct(tmp_path / "RS" / "rs.dcm", files)
    with pytest.raises(DataError) as err:
        read_rtstruct(rtstruct, tmp_path / "CT", {"GTV": 1})
    assert err.value.path == str(rtstruct)
    assert err.value.problem == "has no ROI 'GTV' (from label_names); its ROIs are 'Ring', 'Tumour'"
    labels, _ = read_rtstruct(rtstruct, tmp_path / "CT", {" tumour ": 3})  # case and spaces are forgiven
    assert dice(labels == 3, source_masks()["Tumour"]) >= 0.98 and set(np.unique(labels).tolist()) == {0, 3}

    foreign_uid = generate_uid()
    foreign = write_rtstruct(tmp_path / "RS2" / "rs.dcm", files, series_uid=foreign_uid)
    with pytest.raises(DataError) as err:
        read_rtstruct(foreign, tmp_path / "CT", LABELS)
    ct_uid = read_dicom_series(tmp_path / "CT")[2].series_instance_uid
    assert err.value.path == str(foreign)
    assert f"references series {foreign_uid}, not the image series {ct_uid}" in err.value.problem

    other_frame = write_rtstruct(tmp_path / "RS3" / "rs.dcm", files, frame_uid=generate_uid())
    with pytest.raises(DataError, match=r"rs.dcm: ROI 'Tumour' is drawn in frame of reference .*, not the image "
                                        r"series' .*it belongs to another scan"):
        read_rtstruct(other_frame, tmp_path / "CT", LABELS)

    other_files = write_ct(tmp_path / "other", patient_id="RT2")
    seg = write_seg(tmp_path / "SEG" / "seg.dcm", other_files)
    with pytest.raises(DataError) as err:
        read_dicom_seg(seg, tmp_path / "CT")
    assert err.value.path == str(seg) and "frame of reference" in err.value.problem and ct_uid in err.value.problem
    seg = write_seg(tmp_path / "SEG2" / "seg.dcm", files)
    with pytest.raises(DataError, match=r"seg.dcm: has no segment 'Liver' \(from label_names\); its segments are "
                                        r"1: 'Tumour', 2: 'Ring'"):
        read_dicom_seg(seg, tmp_path / "CT", {"Liver": 1})
    with pytest.raises(DataError, match=r"rs.dcm: is not a DICOM SEG \(Modality RTSTRUCT"):
        read_dicom_seg(rtstruct, tmp_path / "CT")


def test_contour_off_the_slice_planes_is_named(tmp_path: Path) -> None:
    files = write_ct(tmp_path / "CT")
    tilted = np.array([[10.0, 10.0], [20.0, 10.0], [20.0, 20.0]])
    rtstruct = write_rtstruct(tmp_path / "rs.dcm", files, rois={"Bad": {4: [tilted]}})
    ds = pydicom.dcmread(rtstruct)
    data = [float(v) for v in ds.ROIContourSequence[0].ContourSequence[0].ContourData]
    data[-1] += 5.0  # the third point 5 mm off the slice plane (2 slices)
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = [f"{v:.4f}" for v in data]
    ds.save_as(rtstruct)
    with pytest.raises(DataError, match=r"rs.dcm: ROI 'Bad': contour 1 is not in a slice plane of the image series"):
        read_rtstruct(rtstruct, tmp_path / "CT", {"Bad": 1})


def test_even_odd_fill_on_voxel_centres() -> None:
    square = _fill_polygon(np.array([0.5, 3.5, 3.5, 0.5]), np.array([0.5, 0.5, 2.5, 2.5]), (5, 4))
    expected = np.zeros((5, 4), bool)
    expected[1:4, 1:3] = True
    np.testing.assert_array_equal(square, expected)
    # a self-overlapping star: its centre is covered twice, so even-odd leaves it out
    t = np.radians(90 + 144 * np.arange(5))
    star = _fill_polygon(20 + 15 * np.cos(t), 20 + 15 * np.sin(t), (41, 41))
    assert star[20, 33] and not star[20, 20]


def test_image_folder_with_rt_objects_is_read_as_its_one_series(tmp_path: Path, caplog) -> None:
    patient = tmp_path / "data" / "RT-001"
    ct = patient / "planning"
    files = write_ct(ct)
    write_rtstruct(ct / "RS.1.dcm", files)
    write_rtplan(ct / "RP.1.dcm", files[0])
    write_rtdose(ct / "RD.1.dcm", files[0])
    write_seg(ct / "SEG.1.dcm", files)
    with caplog.at_level(logging.INFO):
        summary = summarize_dicom_folder(ct, min_slices=8)
        volume = LoadVolume()(ct)
        found = find_ct_volumes(tmp_path / "data", min_slices=8)
    assert summary is not None and summary.reason is None and summary.num_files == SHAPE[2]
    assert tuple(volume.shape) == (1, *SHAPE) and found == [ct]
    assert "not part of the image series, skipped: RD.1.dcm (RTDOSE), RP.1.dcm (RTPLAN), RS.1.dcm (RTSTRUCT), " \
           "SEG.1.dcm (SEG)" in caplog.text
    # a real second image series in the folder is still an error
    other = write_ct(tmp_path / "other", patient_id="RT-001")
    for f in other[:3]:
        shutil.copy(f, ct / f"other_{f.name}")
    with pytest.raises(DataError, match=r"planning: contains 2 DICOM series, put each in its own folder"):
        find_ct_volumes(tmp_path / "data", min_slices=8)
    with pytest.raises(DataError, match=r"planning: contains 2 DICOM series"):
        LoadVolume()(ct)


def test_folder_of_objects_only_is_not_a_volume(tmp_path: Path) -> None:
    files = write_ct(tmp_path / "CT")
    rs = write_rtstruct(tmp_path / "RS" / "rs.dcm", files)
    write_rtplan(tmp_path / "RS" / "rp.dcm", files[0])
    with pytest.raises(DataError) as err:
        LoadVolume()(rs.parent)
    assert err.value.problem == "holds no image series, only non-image DICOM objects: rp.dcm (RTPLAN), rs.dcm (RTSTRUCT)"
    summary = summarize_dicom_folder(rs.parent)
    assert summary is not None and summary.reason is not None
    assert summary.reason.startswith("holds only non-image DICOM objects (RTPLAN, RTSTRUCT), no image series")


def test_mri_study_with_label_objects_gives_one_volume(tmp_path: Path, caplog) -> None:
    """The MRI bundles' finder (every DICOM image folder): a SEG series folder is not a volume, an RTSTRUCT inside
    the MR folder is not a second series, and the SEG reads back onto the MR grid."""
    study = tmp_path / "data" / "Breast_MRI_001" / "study"
    volume = np.zeros((20, 18, 8), dtype=np.float32)
    volume[5:12, 4:10, 2:6] = 500.0
    affine = np.diag([-0.9, -0.9, 2.0, 1.0])
    mr_files = write_dicom_series(volume, affine, study / "ax_t1", modality="MR", patient_id="Breast_MRI_001")
    write_rtstruct(study / "ax_t1" / "RS.dcm", mr_files, rois={"Lesion": {3: [np.array([[4.5, 3.5], [11.5, 3.5],
                                                                                       [11.5, 9.5], [4.5, 9.5]])]}})
    seg = write_seg(study / "seg" / "1-1.dcm", mr_files, masks={"Lesion": volume > 0})
    with caplog.at_level(logging.INFO):
        assert find_volumes(tmp_path / "data") == [study / "ax_t1"]
        datalist = make_datalist(tmp_path / "data", tmp_path / "datalist.json", val_fraction=0.0, verify=True)
    assert datalist["training"] == [{"image": "Breast_MRI_001/study/ax_t1"}]
    assert "seg: holds only non-image DICOM objects (1-1.dcm), not a volume" in caplog.text
    labels, label_affine = read_dicom_seg(seg, study / "ax_t1")
    np.testing.assert_array_equal(labels, (volume > 0).astype(np.uint8))
    np.testing.assert_allclose(label_affine, affine, atol=1e-6)
    rs_labels, _ = read_rtstruct(study / "ax_t1" / "RS.dcm", study / "ax_t1", {"Lesion": 1})
    np.testing.assert_array_equal(rs_labels[..., 3], (volume > 0)[..., 3])


def test_labels_follow_the_image_of_a_tilted_gantry_series(tmp_path: Path) -> None:
    """Slices shifted in-plane (gantry tilt) are put back on a stack by the reader; the labels move with them."""
    ct = tmp_path / "CT"
    files = write_ct(ct)
    for k, f in enumerate(files):  # slice k shifted by k rows (0.8 mm each) along the column direction
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.4f}", f"{y + 0.8 * k:.4f}", f"{z:.4f}"]
        ds.save_as(f)
    rtstruct = write_rtstruct(tmp_path / "rs.dcm", files)  # contours placed from the shifted headers
    seg = write_seg(tmp_path / "seg.dcm", files)
    image, _, info = read_dicom_series(ct)
    assert np.asarray(info.shear).any()
    from_image = {"Tumour": np.isclose(image, 40.0), "Ring": np.isclose(image, 300.0)}  # where the reader put them
    assert dice(source_masks()["Ring"], from_image["Ring"]) < 0.5  # the shift matters
    for labels, _ in (read_rtstruct(rtstruct, ct, LABELS), read_dicom_seg(seg, ct, LABELS)):
        for name, mask in from_image.items():
            assert dice(labels == LABELS[name], mask) >= 0.98, name
    # a SEG of sheared frames that does not reference the slices cannot be placed: said, not guessed
    ds = pydicom.dcmread(seg)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    ds.save_as(seg)
    with pytest.raises(DataError, match=r"seg.dcm: frames reference no slice of .*CT and do not form a regular volume"):
        read_dicom_seg(seg, ct, LABELS)


def test_real_rt_objects_beside_a_ct_are_skipped_and_a_foreign_structure_set_is_named(tmp_path: Path) -> None:
    """pydicom's real RTSTRUCT (no preamble), RTPLAN and multi-frame RTDOSE files in a CT folder."""
    from pydicom.data import get_testdata_file

    real = {name: get_testdata_file(name, download=False) for name in ("rtstruct.dcm", "rtplan.dcm", "rtdose.dcm")}
    if not all(real.values()):
        pytest.skip("pydicom's RT test files are not installed")
    ct = tmp_path / "CT"
    write_ct(ct)
    for name, path in real.items():
        shutil.copy(path, ct / name)
    summary = summarize_dicom_folder(ct, min_slices=8)
    assert summary is not None and summary.reason is None and summary.num_files == SHAPE[2]
    assert tuple(LoadVolume()(ct).shape) == (1, *SHAPE)
    with pytest.raises(DataError) as err:
        read_rtstruct(ct / "rtstruct.dcm", ct, {"Tumour": 1})
    assert err.value.path == str(ct / "rtstruct.dcm")
    assert "references series" in err.value.problem and "not the image series" in err.value.problem
