# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The memorization audit: shifted copies are flagged, independent volumes are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.metrics import (
    MemorizationAudit,
    audit_downsample_factor,
    cosine_similarity_matrix,
    flag_threshold,
    shift_tolerant_ncc,
    to_audit_grid,
)
from tests.helpers import blob_volume


def _blobs(seeds: range, size: int = 16) -> torch.Tensor:
    """(N, 1, size, size, size) 'anatomies' in [-1, 1] (independent per seed, alike in layout)."""
    vols = np.stack([blob_volume((size,) * 3, seed=s) for s in seeds])
    return torch.as_tensor(vols / vols.max() * 2 - 1, dtype=torch.float32)[:, None]


def _translate(volume: torch.Tensor, shift: tuple[int, int, int], fill: float = -1.0) -> torch.Tensor:
    """Translate (1, 1, H, W, D) by whole voxels, filling the uncovered border with background (no wrap)."""
    out = torch.full_like(volume, fill)
    src, dst = [], []
    for t, n in zip(shift, volume.shape[2:]):
        src.append(slice(max(0, -t), n - max(0, t)))
        dst.append(slice(max(0, t), n - max(0, -t)))
    out[:, :, dst[0], dst[1], dst[2]] = volume[:, :, src[0], src[1], src[2]]
    return out


def test_ncc_is_one_for_a_shifted_copy_and_finds_the_shift():
    refs = _blobs(range(4))
    query = torch.roll(refs[2:3], shifts=(2, -1, 1), dims=(2, 3, 4)) * 3.0 + 0.5  # gain and offset too
    sim, shift = shift_tolerant_ncc(query, refs, max_shift=2)
    assert sim.shape == (1, 4) and int(sim.argmax()) == 2
    assert float(sim[0, 2]) == pytest.approx(1.0, abs=1e-5)
    assert shift[0, 2].tolist() == [2, -1, 1]


def test_ncc_without_shift_search_misses_the_shifted_copy():
    refs = _blobs(range(3))
    query = _translate(refs[1:2], (2, 2, 0))
    rigid, _ = shift_tolerant_ncc(query, refs, max_shift=0)
    tolerant, _ = shift_tolerant_ncc(query, refs, max_shift=2)
    assert float(tolerant[0, 1]) > 0.99 > float(rigid[0, 1])


def test_ncc_matches_a_direct_pearson_correlation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 1, 10, 10, 10, generator=gen), torch.rand(1, 1, 10, 10, 10, generator=gen)
    sim, shift = shift_tolerant_ncc(a, b, max_shift=1)
    t = shift[0, 0].tolist()
    window = a[0, 0, 1 + t[0] : 9 + t[0], 1 + t[1] : 9 + t[1], 1 + t[2] : 9 + t[2]].flatten().double()
    crop = b[0, 0, 1:9, 1:9, 1:9].flatten().double()
    assert float(sim[0, 0]) == pytest.approx(float(np.corrcoef(window, crop)[0, 1]), abs=1e-5)


def test_constant_volume_correlates_zero():
    sim, _ = shift_tolerant_ncc(torch.zeros(1, 1, 8, 8, 8), _blobs(range(2), 8), max_shift=1)
    assert torch.all(sim == 0)


def test_audit_flags_a_shifted_copy_and_not_independent_noise():
    train = _blobs(range(0, 8))
    validation = _blobs(range(100, 106))
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 1, 16, 16, 16, generator=gen) * 2 - 1
    copy = _translate(train[5:6], (1, -2, 1))
    independent = _blobs(range(200, 202))
    synthetic = torch.cat([copy, noise, independent])
    result = MemorizationAudit(max_shift=2, percentile=95.0)(synthetic, validation, train)
    image = result.image
    assert image.flagged.tolist() == [True, False, False, False, False, False]
    assert result.flagged.tolist() == image.flagged.tolist()
    assert int(image.nearest[0]) == 5 and image.shift[0].tolist() == [1, -2, 1]
    assert float(image.similarity[0]) > 0.999 > image.threshold
    assert image.threshold == pytest.approx(float(np.percentile(image.baseline_similarity.numpy(), 95.0)))
    assert torch.all(image.similarity[1:4] < 0.3)
    assert result.settings == {"max_shift": [2, 2, 2], "percentile": 95.0, "flag_spaces": ["image"]}


def test_feature_space_audit_and_flag_spaces():
    train, validation = _blobs(range(6)), _blobs(range(50, 90))
    synthetic = torch.cat([train[:1], _blobs(range(90, 92))])  # an image copy, then two independent volumes
    gen = torch.Generator().manual_seed(0)
    train_f, val_f = torch.randn(6, 32, generator=gen), torch.randn(40, 32, generator=gen)
    syn_f = torch.stack([torch.randn(32, generator=gen), train_f[3], torch.randn(32, generator=gen)])  # feature copy
    features = (syn_f, val_f, train_f)
    image_only = MemorizationAudit(max_shift=1, percentile=99.0)(synthetic, validation, train, *features)
    both = MemorizationAudit(max_shift=1, percentile=99.0, flag_spaces=["image", "feature"])(
        synthetic, validation, train, *features)
    feature_only = MemorizationAudit(max_shift=1, percentile=99.0, flag_spaces="feature")(
        synthetic, validation, train, *features)
    assert image_only.image.flagged.tolist() == [True, False, False]
    assert image_only.feature.flagged.tolist() == [False, True, False] and int(image_only.feature.nearest[1]) == 3
    assert float(image_only.feature.similarity[1]) == pytest.approx(1.0)
    assert image_only.flagged.tolist() == [True, False, False]
    assert both.flagged.tolist() == [True, True, False]
    assert feature_only.flagged.tolist() == [False, True, False]


def test_audit_rejects_bad_inputs():
    train = _blobs(range(3))
    with pytest.raises(ValueError, match="at least one validation volume"):
        MemorizationAudit()(train[:1], train[:0], train)
    with pytest.raises(ValueError, match="differ in shape"):
        shift_tolerant_ncc(train[:, :, :12], train)
    with pytest.raises(ValueError, match="leaves fewer than 2 voxels"):
        shift_tolerant_ncc(train, train, max_shift=8)
    with pytest.raises(ValueError, match="needs synthetic, validation and training features"):
        MemorizationAudit()(train[:1], train[1:2], train, torch.zeros(1, 4), None, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="percentile"):
        MemorizationAudit(percentile=101)
    with pytest.raises(ValueError, match="flag_spaces"):
        MemorizationAudit(flag_spaces=["pixels"])
    with pytest.raises(ValueError, match="baseline is empty"):
        flag_threshold([], 95.0)
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        cosine_similarity_matrix(torch.zeros(2, 3), torch.zeros(2, 4))


def test_audit_grid_downsampling():
    assert audit_downsample_factor((128, 128, 128), 64) == 2
    assert audit_downsample_factor((16, 16, 16), 64) == 1
    assert audit_downsample_factor((160, 128, 96), 64) == 3
    assert to_audit_grid(torch.rand(2, 1, 128, 128, 96), 2).shape == (2, 1, 64, 64, 48)
    assert to_audit_grid(torch.rand(1, 16, 16, 16), 1).shape == (1, 1, 16, 16, 16)
