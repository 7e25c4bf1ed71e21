# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Clinical DICOM end to end through `python -m monai.bundle run`: CT folders with their RTSTRUCT train all three
stages of the CT bundle and condition sampling, as do a real CT's variants whose folders hold a DICOM SEG of their
organs; the DICOM SEG written beside each synthetic CT series reads back onto that series' grid."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from meddiff.data import read_dicom_seg
from meddiff.data.demo import CT_ORGAN_LABELS, make_ct_organ_demo
from meddiff.data.masks import file_sha256
from tests.bundles.conftest import CT_BUNDLE, run_bundle
from tests.data.rt_helpers import write_ct, write_rtstruct

pytestmark = pytest.mark.slow  # stages 1-3 and sampling through the CLI

LABEL_NAMES = "{'Tumour':1,'Ring':2}"


def test_ct_rtstruct_folders_train_and_condition_sampling_with_seg_output(tmp_path):
    patients = tmp_path / "patients"
    for pid in ("RT1", "RT2"):  # planning exports: the CT series and its RTSTRUCT in one folder
        write_rtstruct(patients / pid / "RS.dcm", write_ct(patients / pid, patient_id=pid))
    # ControlNet datalist: the label is the folder holding the RTSTRUCT, or the RTSTRUCT file itself
    (patients / "dataset.json").write_text(json.dumps({"training": [{"image": "RT1", "label": "RT1"},
                                                                    {"image": "RT2", "label": "RT2/RS.dcm"}]}))
    bundle = shutil.copytree(CT_BUNDLE, tmp_path / "bundle", ignore=shutil.ignore_patterns(
        "datalist.json", "checkpoints", "autoencoder*", "diffusion_model*", "controlnet*", "nyul_landmarks.json"))
    overrides = {"bundle_root": None, "dataset_dir": str(patients), "val_fraction": "0.5", "ct_min_slices": "8"}
    steps = {"max_steps": "1", "val_interval": "1", "ckpt_interval": "1"}
    ema = {"ema_start_step": "10", "ema_update_every": "1", "warmup_steps": "1"}
    run_bundle(bundle, "train_autoencoder", {**overrides, **steps})
    run_bundle(bundle, "train_diffusion", {**overrides, **steps, **ema})
    cn = {**overrides, "controlnet_datalist_file": str(patients / "dataset.json"), "num_label_classes": "3",
          "mask_label_names": LABEL_NAMES, **ema}
    run_bundle(bundle, "train_diffusion", {**cn, **steps}, extra_configs=["configs/train_controlnet.json"])
    log = [json.loads(line) for line in (bundle / "models" / "controlnet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1] and all(np.isfinite(r["loss"]) for r in log if "loss" in r)

    # masks: a CT folder with its RTSTRUCT, and a NIfTI label map
    masks = tmp_path / "masks"
    shutil.copytree(patients / "RT1", masks / "rt_case")
    nifti = np.zeros((16, 16, 16), np.uint8)
    nifti[4:12, 4:12, 4:12], nifti[6:9, 6:9, 6:9] = 1, 2
    nib.save(nib.Nifti1Image(nifti, np.diag([2.0, 2.0, 2.0, 1.0])), masks / "nifti_case.nii.gz")
    out = tmp_path / "generated"
    run_bundle(bundle, "inference", {**cn, "mask_dir": str(masks), "output_dir": str(out), "num_inference_steps": "2",
                                     "write_dicom": "true"}, extra_configs=["configs/inference_controlnet.json"])
    manifest = json.loads((out / "samples.json").read_text())
    records = {r["file"]: r for r in manifest["samples"]}
    assert sorted(records) == ["nifti_case_000_image.nii.gz", "rt_case_000_image.nii.gz"]
    rt = records["rt_case_000_image.nii.gz"]
    assert rt["mask_kind"] == "rtstruct" and rt["mask_sha256"] == file_sha256(masks / "rt_case" / "RS.dcm")
    for record in records.values():
        image, label = nib.load(out / record["file"]), nib.load(out / record["label_file"])
        np.testing.assert_array_equal(image.affine, label.affine)
        written = np.asarray(label.dataobj).astype(np.uint8)
        assert image.shape == written.shape == (16, 16, 16)
        assert set(np.unique(written).tolist()) == {0, 1, 2}  # both ROIs survive resampling onto the model grid
        series = out / (record["file"].removesuffix(".nii.gz") + "_dicom")
        seg = series / "seg.dcm"
        assert seg.is_file() and f"{series.name}/seg.dcm" in record["sha256"]
        slice_header = pydicom.dcmread(next(f for f in sorted(series.iterdir()) if f.name != "seg.dcm"))
        assert "SYNTHETIC" in slice_header.SeriesDescription
        header = pydicom.dcmread(seg, stop_before_pixels=True)
        assert header.Modality == "SEG" and [s.SegmentLabel for s in header.SegmentSequence] == ["Tumour", "Ring"]
        # the SEG read back onto the synthetic series' grid: the label map written beside the image
        labels, affine = read_dicom_seg(seg, series)
        np.testing.assert_allclose(affine, label.affine, atol=1e-3)
        for value in (1, 2):
            a, b = labels == value, written == value
            assert 2.0 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98, (record["file"], value)
    # the unconditioned sampler's DICOM output: a series, no SEG
    plain = tmp_path / "plain"
    run_bundle(bundle, "inference", {**overrides, "output_dir": str(plain), "num_samples": "1",
                                     "num_inference_steps": "2", "write_dicom": "true"})
    folders = [p for p in plain.iterdir() if p.is_dir() and p.name.endswith("_dicom")]
    assert len(folders) == 1 and not (folders[0] / "seg.dcm").exists()


def test_real_ct_with_organ_seg_trains_the_controlnet_and_conditions_sampling(tmp_path):
    """Real anatomy: the shipped abdominal CT's variants as DICOM series, each holding a SEG of 9 organs."""
    data = tmp_path / "organs"
    dataset = make_ct_organ_demo(data, num_volumes=2, layout="dicom")
    bundle = shutil.copytree(CT_BUNDLE, tmp_path / "bundle", ignore=shutil.ignore_patterns(
        "datalist.json", "checkpoints", "autoencoder*", "diffusion_model*", "controlnet*", "nyul_landmarks.json"))
    names = {name: int(v) for v, name in CT_ORGAN_LABELS.items() if int(v)}
    overrides = {"bundle_root": None, "dataset_dir": str(data), "val_fraction": "0.5", "pixdim": "[12.0,12.0,6.0]",
                 "spatial_size": "[32,24,16]", "num_label_classes": str(len(CT_ORGAN_LABELS)),
                 "mask_label_names": str(names).replace(" ", ""), "controlnet_datalist_file": str(dataset)}
    steps = {"max_steps": "1", "val_interval": "1", "ckpt_interval": "1"}
    ema = {"ema_start_step": "10", "ema_update_every": "1", "warmup_steps": "1"}
    run_bundle(bundle, "train_autoencoder", {**overrides, **steps})
    run_bundle(bundle, "train_diffusion", {**overrides, **steps, **ema})
    run_bundle(bundle, "train_diffusion", {**overrides, **steps, **ema}, extra_configs=["configs/train_controlnet.json"])
    assert json.loads((bundle / "models" / "controlnet.json").read_text())["num_label_classes"] == 10

    masks = tmp_path / "masks"  # an image folder holding its SEG is a mask source
    shutil.copytree(data / "CTORGAN-01", masks / "CTORGAN-01")
    out = tmp_path / "generated"
    run_bundle(bundle, "inference", {**overrides, **ema, "mask_dir": str(masks), "output_dir": str(out),
                                     "num_inference_steps": "2", "write_dicom": "true"},
               extra_configs=["configs/inference_controlnet.json"])
    (record,) = json.loads((out / "samples.json").read_text())["samples"]
    assert record["mask_kind"] == "seg"
    written = np.asarray(nib.load(out / record["label_file"]).dataobj).astype(np.uint8)
    assert written.shape == (32, 24, 16) and {0, 1, 2, 3, 7, 8} <= set(np.unique(written).tolist())
    seg = out / (record["file"].removesuffix(".nii.gz") + "_dicom") / "seg.dcm"
    header = pydicom.dcmread(seg, stop_before_pixels=True)
    present = [name for name, v in names.items() if (written == v).any()]
    assert [s.SegmentLabel for s in header.SegmentSequence] == list(names)[: len(header.SegmentSequence)]
    labels, _ = read_dicom_seg(seg, seg.parent, {name: names[name] for name in present})
    np.testing.assert_array_equal(labels, written)
