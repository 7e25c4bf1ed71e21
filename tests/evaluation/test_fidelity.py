# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Conditioning fidelity: held-out breast phantoms as 'generated' images, segmented by the shipped breast bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff.cli.demo_breast import DEMO_MODEL_PHANTOMS
from meddiff.data.errors import DataError
from meddiff.data.phantoms import make_breast_phantom
from meddiff.evaluation import ConditioningFidelity, conditioning_label_file, dice_per_label

REPO = Path(__file__).resolve().parents[2]
BREAST_BUNDLE = REPO / "bundles" / "breast_mri_segmentation"
#: held-out demo phantoms (never seen by the shipped weights) whose Dice was 0.95 and 0.92 when trained
HELD_OUT = (20, 22)


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: type) -> None:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data.astype(dtype)), affine), path)


def write_conditioned_phantoms(folder: Path, cases: tuple[int, ...] = HELD_OUT, shift: int = 0) -> list[Path]:
    """Phantoms as mask-conditioned samples: ``case<i>_0_image.nii.gz`` with its mask ``case<i>_0_label.nii.gz``
    (the mask rolled by ``shift`` voxels along the posterior-anterior axis when ``shift`` is non-zero)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in cases:
        ph = make_breast_phantom(DEMO_MODEL_PHANTOMS["shape"], seed=DEMO_MODEL_PHANTOMS["seed"] * 100_003 + i)
        images.append(folder / f"case{i:03d}_0_image.nii.gz")
        _save(ph.image, ph.affine, images[-1], np.float32)
        _save(np.roll(ph.mask, shift, axis=1), ph.affine, folder / f"case{i:03d}_0_label.nii.gz", np.uint8)
    return images


@pytest.fixture(scope="module")
def fidelity():
    return ConditioningFidelity(BREAST_BUNDLE, device="cpu", progress=False)


@pytest.fixture(scope="module")
def scored(fidelity, tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    true = fidelity.evaluate(write_conditioned_phantoms(root / "true"))
    shifted = fidelity.evaluate(write_conditioned_phantoms(root / "shifted", shift=-10))
    return true, shifted


def test_dice_per_label_on_hand_made_maps():
    cond = np.zeros((4, 4, 4), dtype=np.int64)
    cond[:2] = 1
    cond[2:, :2] = 2
    seg = np.zeros_like(cond)
    seg[:1] = 1  # half of label 1
    seg[2:] = 3  # label 2 plus as much again
    dice = dice_per_label(cond, seg, {1: [1], 2: [3], 4: [4]})
    assert dice[1] == pytest.approx(2 * 16 / (32 + 16))
    assert dice[2] == pytest.approx(2 * 16 / (16 + 32))
    assert np.isnan(dice[4])  # absent from both: undefined
    assert dice_per_label(cond, seg, {2: [1, 3]})[2] == pytest.approx(2 * 16 / (16 + 48))
    with pytest.raises(ValueError, match="shape"):
        dice_per_label(cond, seg[:2], {1: [1]})


def test_true_masks_reach_the_segmenter_ceiling(scored):
    true, _ = scored
    assert true["num_cases"] == 2 and [c["image"] for c in true["cases"]] == ["case020_0_image.nii.gz",
                                                                              "case022_0_image.nii.gz"]
    assert true["label_map"] == {1: [1]} and true["per_label"][1]["name"] == "breast"
    dice = [c["dice"][1] for c in true["cases"]]
    assert min(dice) > 0.8, dice  # the shipped weights' held-out phantom Dice (docs: 0.88 on average)
    summary = true["per_label"][1]
    assert summary["mean"] == pytest.approx(np.mean(dice)) and summary["median"] == pytest.approx(np.median(dice))
    assert summary["n"] == 2 and summary["num_undefined"] == 0 and true["mean_dice"] == summary["mean"]


def test_shifted_masks_lower_dice_clearly(scored):
    true, shifted = scored
    for good, bad in zip(true["cases"], shifted["cases"]):
        assert bad["dice"][1] < good["dice"][1] - 0.25, (good, bad)


def test_segmentation_lies_on_the_image_grid(fidelity, tmp_path):
    image = write_conditioned_phantoms(tmp_path, cases=HELD_OUT[:1])[0]
    seg = fidelity.segment(image)
    img = nib.load(str(image))
    assert tuple(seg.shape) == (1, *img.shape)
    assert np.allclose(np.asarray(seg.affine), img.affine, atol=1e-4)
    assert set(np.unique(seg.numpy()).tolist()) == {0.0, 1.0}


def test_label_map_picks_the_segmenter_label(tmp_path):
    images = write_conditioned_phantoms(tmp_path, cases=HELD_OUT[:1])
    to_background = ConditioningFidelity(BREAST_BUNDLE, label_map={"1": 0}, progress=False).evaluate(images)
    assert to_background["label_map"] == {1: [0]} and to_background["per_label"][1]["name"] == "background"
    assert to_background["cases"][0]["dice"][1] < 0.5
    with pytest.raises(ValueError, match="segmentation_label_map entry 'x'"):
        ConditioningFidelity(BREAST_BUNDLE, label_map={"x": 1})


def test_missing_label_map_is_named(fidelity, tmp_path):
    image = write_conditioned_phantoms(tmp_path, cases=HELD_OUT[:1])[0]
    label = conditioning_label_file(image)
    assert label.name == "case020_0_label.nii.gz"
    label.unlink()
    with pytest.raises(DataError, match=f"{label}: conditioning label map of {image.name} not found"):
        fidelity.evaluate([image])
    with pytest.raises(DataError, match="sample_000.nii.gz: name has no '_image'"):
        conditioning_label_file(tmp_path / "sample_000.nii.gz")


def test_bundle_without_config_or_weights_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"segmentation_bundle {tmp_path / 'nope'} is not a folder"):
        ConditioningFidelity(tmp_path / "nope")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{bundle}: no configs/inference.json"):
        ConditioningFidelity(bundle)
    shutil.copytree(BREAST_BUNDLE / "configs", bundle / "configs")
    with pytest.raises(FileNotFoundError, match=f"weights file {bundle / 'models' / 'model.pt'} not found"):
        ConditioningFidelity(bundle)
