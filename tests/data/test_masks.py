# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Mask sources for mask-conditioned generation (NIfTI, DICOM SEG, RTSTRUCT folder) read onto one grid with their
hashes, and the DICOM SEG written beside a synthetic CT series read back onto that series' grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from meddiff.data import DataError, LoadVolume, read_dicom_seg, read_dicom_series, save_nifti
from meddiff.data.dicom_seg_writer import SEG_SERIES_DESCRIPTION, write_dicom_seg
from meddiff.data.masks import file_sha256, find_masks, load_mask_volume, mask_case_name, read_mask
from meddiff.sampling import DicomSegOutput, DicomSeriesOutput
from tests.helpers import dice

from .rt_helpers import SHAPE, ct_affine, source_masks, write_ct, write_rtstruct, write_seg

LABELS = {"background": 0, "Tumour": 1, "Ring": 2}


def _label_map() -> np.ndarray:
    masks = source_masks()
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[masks["Tumour"]] = 1
    labels[masks["Ring"]] = 2
    return labels


@pytest.mark.parametrize("reversed_slices", [False, True], ids=["slices-along-normal", "slices-against-normal"])
def test_seg_beside_a_synthetic_ct_series_reads_back_onto_its_grid(tmp_path: Path, reversed_slices: bool) -> None:
    affine = ct_affine()
    if reversed_slices:  # slice axis against the plane normal: the DICOM reader's grid has Z reversed
        affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1.0]])
    labels = _label_map()
    hu = np.where(labels > 0, 40.0, -800.0).astype(np.float32)
    stem = tmp_path / "case1_000_image"  # as mask-conditioned sampling names its outputs
    label_tensor = torch.from_numpy(labels.astype(np.float32))[None]  # (1, X, Y, Z), as the sampler holds it
    save_nifti(label_tensor, affine, tmp_path / "case1_000_label.nii.gz", dtype=np.uint8)
    series = DicomSeriesOutput()(torch.from_numpy(hu)[None], affine, stem)
    names = {"Tumour": 1, "Ring": 2}
    # from the label file beside the image, or given directly
    given = {"labels": label_tensor} if reversed_slices else {}
    (seg_file,) = DicomSegOutput(label_names=names)(torch.from_numpy(hu)[None], affine, stem, **given)
    folder = series[0].parent
    assert seg_file == folder / "seg.dcm"

    _, series_affine, _ = read_dicom_series(folder)  # the folder holds the series and its SEG: still one series
    back, back_affine = read_dicom_seg(seg_file, folder, names)
    np.testing.assert_allclose(back_affine, series_affine, atol=1e-9)
    expected = labels[:, :, ::-1] if reversed_slices else labels
    np.testing.assert_array_equal(back, expected)
    np.testing.assert_allclose(back_affine, ct_affine(), atol=1e-4)  # slices along the normal, either way
    default, _ = read_dicom_seg(seg_file, folder)  # values 1..N: the segment numbers are the label values
    np.testing.assert_array_equal(default, back)

    ds = pydicom.dcmread(seg_file)
    ct = pydicom.dcmread(series[0], stop_before_pixels=True)
    assert ds.SeriesDescription == SEG_SERIES_DESCRIPTION and "SYNTHETIC" in ds.SeriesDescription
    assert ds.ContentLabel == "SYNTHETIC" and ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Tumour", "Ring"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.PatientID) == (
        ct.StudyInstanceUID, ct.FrameOfReferenceUID, ct.PatientID)
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert not list(tmp_path.glob("**/.*tmp*"))  # written through a temporary file, nothing left behind

    # the series folder with its SEG is a mask source itself: same labels, same grid
    again, again_affine, meta = read_mask(folder, names)
    np.testing.assert_array_equal(again, back)
    assert meta["kind"] == "seg" and meta["sha256"] == file_sha256(seg_file)


def test_write_dicom_seg_errors(tmp_path: Path) -> None:
    files = write_ct(tmp_path / "CT")
    labels = _label_map()
    with pytest.raises(DataError, match=r"label values \[2\] are not in label_names"):
        write_dicom_seg(tmp_path / "CT", labels, {"Tumour": 1}, tmp_path / "seg.dcm")
    with pytest.raises(DataError, match=r"CT \(shape \(48, 40, 12\)"):
        write_dicom_seg(tmp_path / "CT", labels[:, :, :6], None, tmp_path / "seg.dcm", affine=ct_affine())
    with pytest.raises(DataError, match=r"is not the shape"):
        write_dicom_seg(tmp_path / "CT", labels[:, :, :6], None, tmp_path / "seg.dcm")
    with pytest.raises(DataError, match=r"non-integer values"):
        write_dicom_seg(tmp_path / "CT", labels + 0.5, None, tmp_path / "seg.dcm")
    with pytest.raises(ValueError, match=r"series_description must contain 'SYNTHETIC'"):
        write_dicom_seg(tmp_path / "CT", labels, None, tmp_path / "seg.dcm", series_description="CT labels")
    with pytest.raises(DataError, match=r"no DICOM series to attach the SEG to: list meddiff.sampling.DicomSeriesOutput"):
        DicomSegOutput()(labels, ct_affine(), tmp_path / "nothing_image", labels=labels)
    assert not (tmp_path / "seg.dcm").exists()
    # an empty declared segment is written (empty) and read back as absent
    out = write_dicom_seg(tmp_path / "CT", labels, {"Tumour": 1, "Ring": 2, "Liver": 3}, tmp_path / "seg.dcm")
    back, _ = read_dicom_seg(out, tmp_path / "CT", {"Tumour": 1, "Ring": 2, "Liver": 3})
    np.testing.assert_array_equal(back, labels)
    assert len(files) == SHAPE[2]


def test_seg_output_for_unconditional_and_class_index_samples(tmp_path: Path) -> None:
    hu = torch.full((1, *SHAPE), -800.0)
    DicomSeriesOutput()(hu, ct_affine(), tmp_path / "sample_000")  # unconditional sampling: no label map
    assert DicomSegOutput(num_label_classes=3)(hu, ct_affine(), tmp_path / "sample_000") == []
    with pytest.raises(DataError, match=r"sample_000: cannot find the label map of this sample: its stem does not"):
        DicomSegOutput(require_labels=True)(hu, ct_affine(), tmp_path / "sample_000")
    # ControlNet class indices: segments class_1 .. class_<n-1> for every sample, absent classes empty
    tumour = source_masks()["Tumour"].astype(np.uint8)
    save_nifti(tumour, ct_affine(), tmp_path / "c_001_label.nii.gz", dtype=np.uint8)
    DicomSeriesOutput()(hu, ct_affine(), tmp_path / "c_001_image")
    (seg,) = DicomSegOutput(num_label_classes=3)(hu, ct_affine(), tmp_path / "c_001_image")
    assert [x.SegmentLabel for x in pydicom.dcmread(seg).SegmentSequence] == ["class_1", "class_2"]
    back, _ = read_dicom_seg(seg, seg.parent)
    np.testing.assert_array_equal(back, tumour)
    with pytest.raises(ValueError, match=r"num_label_classes must be >= 2"):
        DicomSegOutput(num_label_classes=1)


def test_read_mask_nifti_seg_and_rtstruct_agree(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    # an RT planning export: CT and RTSTRUCT in one folder
    ct_files = write_ct(masks / "rt_case")
    write_rtstruct(masks / "rt_case" / "RS.dcm", ct_files)
    # a research export: the CT and its SEG in sibling folders
    seg_ct = write_ct(masks / "seg_case" / "CT")
    seg = write_seg(masks / "seg_case" / "SEG" / "seg.dcm", seg_ct)
    # a NIfTI label map on the reader's grid of the same CT
    _, affine, _ = read_dicom_series(masks / "rt_case")
    nifti = save_nifti(_label_map(), affine, masks / "nifti_case.nii.gz", dtype=np.uint8)

    sources = find_masks(masks)
    assert sources == sorted([nifti, masks / "rt_case", seg])
    assert [mask_case_name(s, masks) for s in sources] == ["nifti_case", "rt_case", "seg_case_SEG_seg"]

    read = {mask_case_name(s, masks): read_mask(s, LABELS) for s in sources}
    expected = _label_map()
    for name, (labels, label_affine, meta) in read.items():
        assert labels.shape == SHAPE and labels.dtype == np.uint8, name
        np.testing.assert_allclose(label_affine, affine, atol=1e-6)
        for value in (1, 2):
            assert dice(labels == value, expected == value) >= 0.98, (name, value)
        assert len(meta["sha256"]) == 64 and meta["sha256"] == file_sha256(meta["label_file"]), name
    assert read["nifti_case"][2]["kind"] == "nifti" and read["nifti_case"][2]["image"] is None
    assert read["rt_case"][2]["kind"] == "rtstruct" and read["rt_case"][2]["label_file"].endswith("RS.dcm")
    assert read["seg_case_SEG_seg"][2]["image"] == str(masks / "seg_case" / "CT")
    np.testing.assert_array_equal(read["nifti_case"][0], expected)
    np.testing.assert_array_equal(read["seg_case_SEG_seg"][0], expected)

    # as the sampler loads it: a (1, X, Y, Z) MetaTensor with the affine LoadVolume gives the NIfTI file
    tensor, meta = load_mask_volume(nifti)
    assert tuple(tensor.shape) == (1, *SHAPE) and meta["kind"] == "nifti"
    np.testing.assert_allclose(tensor.affine.numpy(), LoadVolume()(nifti).affine.numpy(), atol=1e-6)
    np.testing.assert_array_equal(tensor[0].numpy(), expected)


def test_mask_source_errors_name_the_file(tmp_path: Path) -> None:
    ct_files = write_ct(tmp_path / "case" / "CT")
    rs = write_rtstruct(tmp_path / "case" / "CT" / "RS.dcm", ct_files)
    with pytest.raises(DataError, match=r"RS.dcm: is an RTSTRUCT: pass label_names"):
        read_mask(rs)
    with pytest.raises(DataError, match=r"RS.dcm: is an RTSTRUCT: pass label_names"):
        read_mask(tmp_path / "case" / "CT")  # the folder source needs them too
    with pytest.raises(DataError, match=r"slice_0001.dcm: is not a mask: a DICOM CT object, not a SEG or RTSTRUCT"):
        read_mask(ct_files[0])
    (tmp_path / "notes.txt").write_text("not a mask")
    with pytest.raises(DataError, match=r"notes.txt: is not a mask: neither NIfTI nor DICOM"):
        read_mask(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"missing.nii.gz: mask source does not exist"):
        read_mask(tmp_path / "missing.nii.gz")
    image = save_nifti(np.full(SHAPE, 0.25, dtype=np.float32), ct_affine(), tmp_path / "image.nii.gz")
    with pytest.raises(DataError, match=r"image.nii.gz: label map has non-integer values"):
        read_mask(image)
    with pytest.raises(DataError, match=r"label values \[2\] are outside the declared classes"):
        read_mask(save_nifti(_label_map(), ct_affine(), tmp_path / "m.nii.gz", dtype=np.uint8), {"Tumour": 1})

    # a SEG whose image series is not beside it
    seg = write_seg(tmp_path / "case" / "SEG" / "seg.dcm", ct_files)
    lone = tmp_path / "elsewhere" / "only" / "seg.dcm"
    lone.parent.mkdir(parents=True)
    shutil.copy(seg, lone)
    uid = pydicom.dcmread(ct_files[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(DataError, match=rf"only/seg.dcm: the image series it labels \(series {uid}\) is not beside "):
        read_mask(lone)
    labels, _, meta = read_mask(lone, image=tmp_path / "case" / "CT")  # unless given
    np.testing.assert_array_equal(labels, _label_map())
    assert meta["image"] == str(tmp_path / "case" / "CT")

    # folders: none or several label objects
    with pytest.raises(DataError, match=r"elsewhere: mask source folder holds no RTSTRUCT/SEG objects"):
        read_mask(tmp_path / "elsewhere")
    shutil.copy(seg, tmp_path / "case" / "CT" / "seg.dcm")
    with pytest.raises(DataError, match=r"CT: mask source folder holds 2 RTSTRUCT/SEG objects: RS.dcm, seg.dcm"):
        read_mask(tmp_path / "case" / "CT")
    with pytest.raises(DataError, match=r"empty: mask_dir holds no mask"):
        (tmp_path / "empty").mkdir()
        find_masks(tmp_path / "empty")
    with pytest.raises(DataError, match=r"nowhere: mask_dir is not a folder"):
        find_masks(tmp_path / "nowhere")


def test_training_pair_with_a_dicom_label_loads_on_the_image_grid(tmp_path: Path) -> None:
    """A datalist item {image: CT folder, label: its RTSTRUCT (file or the folder) / SEG} loads like a NIfTI pair."""
    from meddiff.data.masks import LoadDicomLabeld
    from meddiff.data.segmentation import LoadSegmentationPaird

    ct = tmp_path / "RT1"
    ct_files = write_ct(ct)
    rtstruct = write_rtstruct(ct / "RS.dcm", ct_files)
    seg = write_seg(tmp_path / "SEG" / "seg.dcm", ct_files)
    nifti = save_nifti(_label_map(), LoadVolume()(ct).affine.numpy(), tmp_path / "label.nii.gz", dtype=np.uint8)
    load = LoadDicomLabeld(label_names=LABELS)
    pair = LoadSegmentationPaird(label_names=LABELS, require_label=True)
    image = LoadVolume()(ct)
    for label in (ct, rtstruct, seg, nifti):
        item = pair(load({"image": str(ct), "label": str(label)}))
        assert item["image"].shape == item["label"].shape == (1, *SHAPE)
        np.testing.assert_allclose(item["label"].affine.numpy(), image.affine.numpy(), atol=1e-4)
        labels = item["label"][0].numpy().astype(np.uint8)
        if label in (seg, nifti):
            np.testing.assert_array_equal(labels, _label_map())
        for value in (1, 2):  # the RTSTRUCT: polygons rasterised
            assert dice(labels == value, _label_map() == value) >= 0.98, (label, value)
    assert load({"image": str(ct), "label": str(nifti)})["label"] == str(nifti)  # NIfTI: left to the pair loader
    with pytest.raises(DataError, match=r"RS.dcm: is an RTSTRUCT: pass label_names"):
        LoadDicomLabeld()({"image": str(ct), "label": str(rtstruct)})
