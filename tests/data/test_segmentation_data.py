# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Labelled datalists and checked image/label loading."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiff.data import DataError
from meddiff.data.phantoms import write_breast_phantoms
from meddiff.data.segmentation import (
    LoadSegmentationPaird,
    check_label_values,
    load_labelled_datalist,
    parse_label_names,
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_breast_phantoms(root, num_cases=5, num_test=1, shape=(32, 32, 16))
    return root


def test_datalist_splits_with_absolute_paths(labelled):
    splits = load_labelled_datalist(labelled / "dataset.json", val_fraction=0.25, seed=0)
    assert [len(splits[k]) for k in ("training", "validation", "test")] == [3, 1, 1]
    for item in splits["training"] + splits["validation"] + splits["test"]:
        assert item["image"].startswith(str(labelled)) and "imagesT" in item["image"] and "labelsT" in item["label"]
    again = load_labelled_datalist(labelled / "dataset.json", val_fraction=0.25, seed=0)
    assert again == splits
    whole = load_labelled_datalist(labelled / "dataset.json", val_fraction=0.0)
    assert len(whole["training"]) == 4 and whole["validation"] == []


def test_datalist_errors_name_the_file(tmp_path, labelled):
    with pytest.raises(DataError, match="datalist file does not exist"):
        load_labelled_datalist(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: is not a readable JSON"):
        load_labelled_datalist(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match="no non-empty 'training'"):
        load_labelled_datalist(tmp_path / "empty.json")
    (tmp_path / "nolabel.json").write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(DataError, match=r"training\[0\] needs 'image' and 'label'"):
        load_labelled_datalist(tmp_path / "nolabel.json")
    (tmp_path / "missing.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}))
    with pytest.raises(DataError, match=r"a.nii.gz: listed as training\[0\]\['image'\] in .*missing.json"):
        load_labelled_datalist(tmp_path / "missing.json")
    with pytest.raises(DataError, match="no non-empty 'test'"):
        load_labelled_datalist(tmp_path / "missing.json", require_split="test")


def test_label_names_forms():
    assert parse_label_names({"background": 0, "breast": 1}) == {"background": 0, "breast": 1}
    assert parse_label_names({"0": "background", "1": "breast"}) == {"background": 0, "breast": 1}
    with pytest.raises(ValueError, match="distinct"):
        parse_label_names({"a": 1, "b": 1})
    with pytest.raises(ValueError, match="empty"):
        parse_label_names({})


def test_label_value_checks():
    names = {"background": 0, "breast": 1}
    check_label_values(torch.tensor([0.0, 1.0]), names, "ok.nii.gz")
    with pytest.raises(DataError, match="x.nii.gz: label has non-integer values"):
        check_label_values(torch.tensor([0.0, 0.5]), names, "x.nii.gz")
    with pytest.raises(DataError, match=r"label values \[2, 7\] are outside the declared classes \{0: background, 1"):
        check_label_values(np.array([0, 2, 7]), names, "x.nii.gz")


def test_loader_passes_unlabelled_items_and_checks_pairs(labelled, tmp_path):
    dataset = json.loads((labelled / "dataset.json").read_text())
    item = {k: str(labelled / v) for k, v in dataset["training"][0].items()}
    loader = LoadSegmentationPaird(label_names={"background": 0, "breast": 1})
    out = loader(item)
    assert out["image"].shape == out["label"].shape == (1, 32, 32, 16)
    image_only = loader({"image": item["image"]})
    assert "label" not in image_only
    with pytest.raises(DataError, match="has no 'label'"):
        LoadSegmentationPaird(require_label=True)({"image": item["image"]})
    lab = nib.load(item["label"])
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj) * 2, lab.affine), tmp_path / "two.nii.gz")
    mapped = LoadSegmentationPaird(label_names={"background": 0, "breast": 1}, label_mapping={"2": 1})(
        {"image": item["image"], "label": str(tmp_path / "two.nii.gz")})
    assert torch.equal(mapped["label"], out["label"])
