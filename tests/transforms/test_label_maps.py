# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Label maps as ControlNet conditions: seeded augmentation that keeps label values, one-hot encoding checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from meddiff.data.errors import DataError
from meddiff.transforms import MaskAugmentation, one_hot_labels


def _label_map() -> MetaTensor:
    x, y, z = torch.meshgrid(*[torch.linspace(-1, 1, 24)] * 3, indexing="ij")
    label = (x**2 + y**2 + z**2 < 0.7).to(torch.uint8)
    label[(x - 0.2) ** 2 + y**2 + z**2 < 0.1] = 2
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0], dtype=torch.float64))
    return MetaTensor(label[None], affine=affine)


@pytest.mark.parametrize("mode", ["affine", "elastic"])
def test_augmentation_is_seeded_keeps_values_and_grid(mode):
    label = _label_map()
    augment = MaskAugmentation(mode)
    a, b, c = augment(label, 7), augment(label, 7), augment(label, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)  # same seed, same map; another seed, another map
    assert a.shape == label.shape and a.dtype == label.dtype
    assert set(torch.unique(a).tolist()) <= set(torch.unique(label).tolist())  # nearest neighbour: no new values
    assert not torch.equal(a, label)
    assert set(torch.unique(a).tolist()) == {0, 1, 2}
    assert (a == 2).sum() > 0.5 * (label == 2).sum()  # a deformation, not a wipe-out
    np.testing.assert_array_equal(np.asarray(a.affine), np.asarray(label.affine))


def test_off_returns_the_map_and_unknown_mode_raises():
    label = _label_map()
    assert MaskAugmentation("off")(label, 3) is label
    with pytest.raises(ValueError, match="mask_augmentation must be one of"):
        MaskAugmentation("rigid")


def test_one_hot_labels():
    label = _label_map()
    encoded = one_hot_labels(label[None], 3)
    assert encoded.shape == (1, 3, 24, 24, 24) and torch.equal(encoded.sum(1), torch.ones(1, 24, 24, 24))
    assert torch.equal(encoded.argmax(1, keepdim=True), label[None].long().as_subclass(torch.Tensor))
    assert one_hot_labels(label, 3).shape == (3, 24, 24, 24)
    with pytest.raises(DataError, match=r"^mask.nii: label values \[2\] are outside 0..1"):
        one_hot_labels(label, 2, "mask.nii")
    with pytest.raises(ValueError, match="non-integer"):
        one_hot_labels(label.float() * 0.5, 3)
