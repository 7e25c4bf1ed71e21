# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/ct_organ_controlnet.py: its segmenter-free fidelity measures on real abdominal CT variants."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from meddiff.data.demo import make_ct_organ_demo
from tests.helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("ct_organ_controlnet")


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Two real variants (HU image, organ label map)."""
    root = tmp_path_factory.mktemp("ct_organ")
    make_ct_organ_demo(root, num_volumes=2, seed=1)
    out = []
    for name in ("abdomen_00.nii.gz", "abdomen_01.nii.gz"):
        image = np.asarray(nib.load(str(root / "imagesTr" / name)).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(root / "labelsTr" / name)).dataobj).astype(np.int64)
        out.append((image, label))
    return out


def test_real_variant_against_its_own_mask(bench, variants):
    image, label = variants[0]
    means = bench.label_means(image, label)
    score = bench.score_image(image, label, means)
    assert score["hu_mae"] == 0.0 and set(score["hu_abs_error"]) == set(bench.EVAL_LABELS)
    # the thresholds find the labelled tissue on real CT (the ceiling of the sampled rows)
    assert score["dice"]["bone"] > 0.65 and score["dice"]["lung"] > 0.55 and score["dice"]["body"] > 0.95
    assert all(score["contrast"].values()), score["contrast"]
    assert -200 < means["lung"] + 500 < 0 and 0 < means["liver"] < 80 and means["bone"] > 100
    # another real variant: small HU errors (same anatomy, other motion and noise), same Dice range
    other = bench.score_image(*variants[1], means)
    assert 0.0 < other["hu_mae"] < 20.0 and other["dice"]["bone"] > 0.65


def test_shifted_mask_lowers_dice(bench, variants):
    image, label = variants[0]
    true = bench.threshold_dice(image, label)
    shifted = bench.threshold_dice(image, np.roll(label, 5, axis=0))  # 15 mm
    assert shifted["bone"] < true["bone"] - 0.3 and shifted["lung"] < true["lung"] - 0.3
    assert shifted["body"] < true["body"]
    # an image of uniform soft tissue follows no mask: no bone, no lung, all "body"
    flat = np.full_like(image, 40.0)
    assert bench.threshold_dice(flat, label)["bone"] == 0.0 and bench.threshold_dice(flat, label)["lung"] == 0.0
    assert not all(bench.contrast_order(bench.label_means(flat, label)).values())


def test_summary_table_and_arguments(bench, variants):
    image, label = variants[0]
    reference = bench.label_means(image, label)
    scores = [bench.score_image(image, label, reference), bench.score_image(*variants[1], reference)]
    row = bench.summarise(scores)
    assert row["n"] == 2 and 0.0 < row["hu_mae"] < 20.0 and 0.0 <= row["contrast_ok"] <= 1.0
    assert math.isclose(row["dice"]["bone"], np.mean([s["dice"]["bone"] for s in scores]))
    result = {"rows": {"real": {**row, "seconds_per_volume": None}, "ControlNet": {**row, "seconds_per_volume": 1.5}},
              "stage_seconds": {"autoencoder": 10.0}, "thresholds": bench.THRESHOLDS,
              "real_between_variant_hu_mae": 3.0, "intensity_range": [-1024.0, 1024.0]}
    table = bench.format_table(result)
    assert table.count("\n| ") == 2 and "| ControlNet | 2 |" in table and "| 1.50 |" in table
    assert bench.dice(np.zeros(3, bool), np.zeros(3, bool)) != bench.dice(np.zeros(3, bool), np.zeros(3, bool))
    with pytest.raises(ValueError, match="shape"):
        bench.label_means(image, label[:-1])
    args = bench.parse_args(["--cn_steps", "7", "--workdir", "/tmp/x"])
    assert args.cn_steps == 7 and args.ae_steps == 2000 and args.spatial_size == "[128,96,32]"
    with pytest.raises(SystemExit):
        bench.parse_args(["--dm_steps", "0"])
