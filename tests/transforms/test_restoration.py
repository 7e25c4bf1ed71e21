# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Restoration corruptions, contrastive views, pretext losses and the saved augmentation random state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, RandFlipd

from meddiff.engines.pretext_trainer import ContrastivePretext, RestorationPretext, make_pretext, nt_xent_loss
from meddiff.engines.transform_state import set_transform_rng_state, transform_rng_state
from meddiff.transforms.restoration import (
    RandBezierRemap,
    RandBezierRemapd,
    RandLocalShuffle,
    RandLocalShuffled,
    RandPaint,
    RandPaintd,
    RestorationCorruptiond,
    bezier_curve,
)
from meddiff.transforms.views import ContrastiveViewsd


def _image(seed: int = 0, shape=(1, 24, 20, 12)) -> MetaTensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    return MetaTensor(x, affine=torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0])), meta={"filename_or_obj": "x.nii"})


def test_bezier_curve_runs_from_origin_to_one_sorted():
    xs, ys = bezier_curve((0.2, 0.9), (0.8, 0.1), num_points=200)
    assert np.all(np.diff(xs) >= 0)
    assert np.allclose([xs[0], ys[0], xs[-1], ys[-1]], [0, 0, 1, 1])


ARRAY_TRANSFORMS = [
    lambda p: RandBezierRemap(prob=p),
    lambda p: RandLocalShuffle(prob=p, coverage=1.0, max_block_fraction=0.25),
    lambda p: RandPaint(prob=p),
]


@pytest.mark.parametrize("make", ARRAY_TRANSFORMS)
def test_array_transforms_probability_seeding_and_metadata(make):
    img = _image()
    assert torch.equal(make(0.0)(img), img)
    a, b = make(1.0).set_random_state(7), make(1.0).set_random_state(7)
    out_a, out_b = a(img), b(img)
    assert isinstance(out_a, MetaTensor) and out_a.shape == img.shape and out_a.dtype == img.dtype
    assert torch.equal(out_a.affine, img.affine) and out_a.meta["filename_or_obj"] == "x.nii"
    assert torch.equal(out_a, out_b), "same seed, same corruption"
    assert not torch.equal(out_a, img)
    assert not torch.equal(out_a, a(img)), "a second draw differs"
    numpy_out = make(1.0).set_random_state(7)(img.numpy())
    assert isinstance(numpy_out, np.ndarray) and np.allclose(numpy_out, out_a.numpy())


def test_bezier_remap_stays_in_unit_range_and_is_a_function_of_intensity():
    img = _image()
    out = RandBezierRemap(prob=1.0).set_random_state(3)(img)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    flat_in, flat_out = img.flatten().numpy(), out.flatten().numpy()
    order = np.argsort(flat_in)
    assert np.allclose(np.interp(flat_in, flat_in[order], flat_out[order]), flat_out, atol=1e-5)


def test_local_shuffle_only_permutes_voxels():
    img = _image()
    out = RandLocalShuffle(prob=1.0, coverage=1.0, max_block_fraction=0.25).set_random_state(1)(img)
    assert np.allclose(np.sort(out.flatten().numpy()), np.sort(img.flatten().numpy()))
    assert (out != img).float().mean() > 0.2


def test_inpainting_and_outpainting():
    img = torch.zeros(1, 30, 30, 30)
    inpaint = RandPaint(prob=1.0, inpaint_prob=1.0, fill_range=(1.0, 2.0)).set_random_state(0)(img)
    changed = float((inpaint > 0).float().mean())
    assert 0.0 < changed < 0.5, "a few boxes are painted"
    outpaint = RandPaint(prob=1.0, inpaint_prob=0.0, fill_range=(1.0, 2.0)).set_random_state(0)(img)
    kept = float((outpaint == 0).float().mean())
    assert 0.0 < kept < 0.8, "everything but a few boxes is painted"


def test_dict_transforms_corrupt_every_key_alike():
    img = _image()
    for t in (RandBezierRemapd(["a", "b"], prob=1.0), RandLocalShuffled(["a", "b"], prob=1.0), RandPaintd(["a", "b"], prob=1.0)):
        out = t.set_random_state(5)({"a": img, "b": img.clone(), "c": 1})
        assert torch.equal(out["a"], out["b"]) and out["c"] == 1
        assert not torch.equal(out["a"], img)


def test_restoration_corruption_keeps_the_clean_target_and_is_seeded():
    img = _image(shape=(1, 32, 32, 16))
    t = RestorationCorruptiond("image", remap_prob=1.0, shuffle_prob=1.0, paint_prob=1.0)
    a = t.set_random_state(11)({"image": img})
    b = RestorationCorruptiond("image", remap_prob=1.0, shuffle_prob=1.0, paint_prob=1.0).set_random_state(11)(
        {"image": img})
    assert torch.equal(a["target"], img) and a["target"] is not img
    assert not torch.equal(a["image"], img)
    assert torch.equal(a["image"], b["image"])
    none = RestorationCorruptiond("image", remap_prob=0.0, shuffle_prob=0.0, paint_prob=0.0)({"image": img})
    assert torch.equal(none["image"], img)
    with pytest.raises(ValueError, match="one image"):
        RestorationCorruptiond(["a", "b"])


def test_contrastive_views_differ_and_are_seeded():
    img = _image(shape=(1, 16, 16, 16))
    a = ContrastiveViewsd("image").set_random_state(2)({"image": img})
    b = ContrastiveViewsd("image").set_random_state(2)({"image": img})
    assert a["image"].shape == a["image_2"].shape == img.shape
    assert not torch.equal(a["image"], a["image_2"])
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_2"], b["image_2"])
    with pytest.raises(ValueError, match="gamma_range"):
        ContrastiveViewsd("image", gamma_range=(0.0, 1.0))


@pytest.mark.parametrize("kwargs", [{"coverage": 0.0}, {"max_block_fraction": 1.5}])
def test_shuffle_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        RandLocalShuffle(**kwargs)


def test_paint_rejects_bad_settings():
    with pytest.raises(ValueError, match="inpaint_size"):
        RandPaint(inpaint_size=(0.5, 0.2))
    with pytest.raises(ValueError, match="max_boxes"):
        RandPaint(max_boxes=0)


def test_saved_transform_state_continues_the_augmentation_stream():
    data = [{"image": _image(i, (1, 16, 16, 8))} for i in range(3)]
    pipeline = Compose([RandFlipd("image", prob=0.5, spatial_axis=0), RestorationCorruptiond("image")])

    def loader():
        torch.manual_seed(0)  # MONAI's DataLoader seeds the transforms from torch's RNG when built
        return DataLoader(Dataset(data, pipeline), batch_size=1, num_workers=0)

    first = loader()
    next(iter(first))
    state = transform_rng_state(first)
    assert len(state) >= 5  # compose, flip, corruption and its three corruptions
    expected = next(iter(first))["image"]
    second = loader()
    set_transform_rng_state(second, state)
    assert torch.equal(next(iter(second))["image"], expected)
    with pytest.raises(ValueError, match="random transforms"):
        set_transform_rng_state(second, state[:-1])


def test_pretext_losses():
    torch.manual_seed(0)
    z = torch.randn(4, 8)
    assert nt_xent_loss(z, z) < nt_xent_loss(z, torch.randn(4, 8))
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent_loss(z[:1], z[:1])
    net = torch.nn.Conv3d(1, 1, 1)
    batch = {"image": torch.rand(2, 1, 8, 8, 8), "target": torch.rand(2, 1, 8, 8, 8)}
    loss, logs = RestorationPretext()(net, batch, torch.device("cpu"))
    assert loss.ndim == 0 and "restoration" in logs
    with pytest.raises(ValueError, match="out_channels"):
        RestorationPretext()(torch.nn.Conv3d(1, 2, 1), batch, torch.device("cpu"))
    pair = {"image": torch.rand(3, 1, 8, 8, 8), "image_2": torch.rand(3, 1, 8, 8, 8)}
    loss, logs = ContrastivePretext(feature_channels=4)(torch.nn.Conv3d(1, 4, 1), pair, torch.device("cpu"))
    assert loss.ndim == 0 and "positive_cosine" in logs
    assert isinstance(make_pretext("contrastive", feature_channels=4), ContrastivePretext)
    with pytest.raises(ValueError, match="pretext must be one of"):
        make_pretext("jigsaw")
