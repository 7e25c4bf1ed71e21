# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Procedural breast-MRI phantoms: anatomy, determinism, geometry, files and the CLI command."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from meddiff.cli.main import main
from meddiff.data import find_volumes
from meddiff.data.phantoms import PHANTOM_DESCRIPTION, make_breast_phantom, write_breast_phantoms


@pytest.fixture(scope="module")
def phantom():
    return make_breast_phantom((64, 48, 32), seed=3)


def test_two_breasts_in_front_of_the_chest(phantom):
    mask = phantom.mask.astype(bool)
    assert phantom.image.shape == mask.shape == (64, 48, 32)
    _, n = ndimage.label(mask)
    assert n == 2, "expected one connected mask per breast"
    xs, ys, _ = np.nonzero(mask)
    assert (xs < 32).any() and (xs >= 32).any(), "one breast on each side"
    chest = (phantom.image > 200) & ~mask
    assert ys.mean() > np.nonzero(chest)[1].mean() + 5, "breasts lie anterior (high y) of the chest"
    # fat is bright in non-fat-saturated T1: the breast is mostly brighter than the background air
    air = phantom.image[:, :4, :]
    assert np.median(phantom.image[mask]) > 10 * np.median(air)
    # texture: fibroglandular tissue makes the breast intensities bimodal rather than constant
    assert np.percentile(phantom.image[mask], 90) > 1.5 * np.percentile(phantom.image[mask], 10)


def test_same_seed_same_phantom_other_seed_other_anatomy():
    a, b, c = (make_breast_phantom((32, 32, 16), seed=s) for s in (5, 5, 6))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.params == b.params
    assert not np.array_equal(a.mask, c.mask)
    assert a.params["breast_volume_ml"] != c.params["breast_volume_ml"]


def test_sizes_and_shapes_vary_over_seeds():
    volumes = [make_breast_phantom((48, 32, 24), seed=s).params["breast_volume_ml"] for s in range(8)]
    assert max(volumes) > 1.5 * min(volumes)


def test_anisotropic_and_oblique_geometry():
    ph = make_breast_phantom((40, 32, 20), fov_mm=(360, 220, 180), seed=1)
    spacing = np.linalg.norm(ph.affine[:3, :3], axis=0)
    assert np.allclose(spacing, [9.0, 6.875, 9.0])
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    tilted = make_breast_phantom((40, 32, 20), fov_mm=(360, 220, 180), seed=1, oblique_degrees=10)
    assert np.allclose(np.linalg.norm(tilted.affine[:3, :3], axis=0), spacing)
    assert not np.allclose(tilted.affine[:3, :3], ph.affine[:3, :3])
    assert np.array_equal(tilted.mask, ph.mask)  # anatomy is drawn in voxel space


@pytest.mark.parametrize("kwargs", [{"shape": (4, 32, 16)}, {"shape": (32, 32)}, {"fov_mm": (0, 1, 1)}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_breast_phantom(**kwargs)


def test_write_labelled_set(tmp_path):
    dataset = write_breast_phantoms(tmp_path, num_cases=4, num_test=1, shape=(32, 32, 16), seed=2)
    assert dataset["phantom"] is True and "PHANTOM" in dataset["description"]
    assert dataset["labels"] == {"0": "background", "1": "breast"}
    assert len(dataset["training"]) == 3 and len(dataset["test"]) == 1
    assert json.loads((tmp_path / "dataset.json").read_text()) == dataset
    for item in dataset["training"] + dataset["test"]:
        img, lab = nib.load(tmp_path / item["image"]), nib.load(tmp_path / item["label"])
        assert img.shape == lab.shape == (32, 32, 16)
        assert np.allclose(img.affine, lab.affine)
        assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == PHANTOM_DESCRIPTION
        assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1} and lab.get_data_dtype() == np.uint8
    assert not list(tmp_path.rglob("*.tmp*"))


def test_write_unlabelled_set_is_found_as_volumes(tmp_path):
    write_breast_phantoms(tmp_path, num_cases=3, labels=False, shape=(32, 32, 16))
    assert [p.name for p in find_volumes(tmp_path)] == [f"phantom_{i:03d}.nii.gz" for i in range(3)]
    assert json.loads((tmp_path / "phantoms.json").read_text())["phantom"] is True


def test_write_rejects_bad_split(tmp_path):
    with pytest.raises(ValueError, match="num_test"):
        write_breast_phantoms(tmp_path, num_cases=2, num_test=2, shape=(32, 32, 16))


def test_cli_command(tmp_path):
    main(["breast-phantoms", "--output_dir", str(tmp_path), "--num_cases", "2", "--num_test", "1",
          "--shape", "32,32,16", "--seed", "4"])
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert dataset["numTraining"] == 1 and dataset["numTest"] == 1
    assert dataset["meddiff"]["seed"] == 4
