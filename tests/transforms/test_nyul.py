# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Tests for meddiff.transforms.nyul (Nyúl & Udupa histogram standardisation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImage

from meddiff.sampling import affine_from_geometry, save_nifti
from meddiff.transforms import (
    DEFAULT_PERCENTILES,
    NyulLandmarks,
    NyulStandardize,
    NyulStandardized,
    fit_nyul_landmarks,
    learn_nyul_landmarks,
)

SHAPE = (24, 24, 20)


def _anatomy(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Random "anatomy": dark background, a body of a few overlapping tissue blobs, noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    body = np.sqrt((((grid - centre) / (centre * 0.8)) ** 2).sum(0)) < 1
    vol = np.where(body, 80.0, 5.0).astype(np.float32)
    for _ in range(4):
        c = rng.uniform(0.3, 0.7, size=3)[:, None, None, None] * np.array(shape)[:, None, None, None]
        r = rng.uniform(2.5, 5.0)
        vol[np.sqrt(((grid - c) ** 2).sum(0)) < r] = rng.uniform(120, 300)
    return vol + rng.normal(0, 4, size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def landmarks() -> NyulLandmarks:
    return fit_nyul_landmarks([_anatomy(s) * (1 + s) + 10 * s for s in range(4)])


def test_fit_landmarks_increasing_and_span_range(landmarks: NyulLandmarks) -> None:
    s = np.asarray(landmarks.standard_landmarks)
    assert np.all(np.diff(s) > 0)
    assert s[0] == pytest.approx(0.0) and s[-1] == pytest.approx(100.0)
    assert landmarks.percentiles == list(DEFAULT_PERCENTILES)
    assert landmarks.n_images == 4 and landmarks.foreground == "mean"

    custom = fit_nyul_landmarks([_anatomy(0)], percentiles=[2, 50, 98], standard_range=(-1, 1), foreground=None)
    assert custom.standard_landmarks[0] == -1 and custom.standard_landmarks[-1] == 1
    assert len(custom.standard_landmarks) == 3 and custom.foreground is None


def test_fit_rejects_tied_landmarks_and_bad_args() -> None:
    binary = np.zeros((10, 10, 10), np.float32)
    binary[5:] = 1.0  # percentiles tie at 0 and 1 over all voxels
    with pytest.raises(ValueError, match="strictly increasing"):
        fit_nyul_landmarks([binary], foreground=None)
    with pytest.raises(ValueError, match="no usable image"):
        fit_nyul_landmarks([np.ones((4, 4, 4))])
    with pytest.raises(ValueError, match="percentiles"):
        fit_nyul_landmarks([_anatomy(0)], percentiles=[50, 10])
    with pytest.raises(ValueError, match="foreground"):
        fit_nyul_landmarks([_anatomy(0)], foreground="otsu")
    with pytest.raises(ValueError, match="strictly increasing"):
        NyulLandmarks(standard_landmarks=[0, 1, 1], percentiles=[1, 50, 99])


def test_affine_intensity_changes_standardise_alike(landmarks: NyulLandmarks) -> None:
    x = _anatomy(42)
    t = NyulStandardize(landmarks)
    out_x, out_y = t(x), t(3 * x + 50)
    assert isinstance(out_x, np.ndarray) and out_x.dtype == np.float32
    np.testing.assert_allclose(out_x, out_y, atol=1e-3)
    # the raw inputs differ a lot; the foreground lands on the standard scale (background extrapolates below)
    assert np.abs(x - (3 * x + 50)).mean() > 100
    assert 0 < np.median(out_x[x > x.mean()]) < 100
    assert np.median(out_x[x <= x.mean()]) < 0


def test_piecewise_linear_with_linear_extrapolation() -> None:
    ramp = np.linspace(0.0, 1.0, 10001)
    lm = fit_nyul_landmarks([ramp], foreground=None)
    out = NyulStandardize(lm, dtype=None)(ramp)
    assert out.dtype == np.float64
    # a uniform ramp maps linearly, also below the 1st / above the 99th percentile
    np.testing.assert_allclose(out, (ramp - 0.01) / 0.98 * 100, atol=1e-6)


def test_torch_and_metatensor_types_preserved(landmarks: NyulLandmarks) -> None:
    x = torch.from_numpy(_anatomy(1))[None]
    out = NyulStandardize(landmarks)(x)
    assert type(out) is torch.Tensor and out.shape == x.shape and out.dtype == torch.float32

    affine = torch.as_tensor(affine_from_geometry((1.5, 1.5, 2.0), "LPS", spatial_size=SHAPE))
    img = MetaTensor(x.clone(), affine=affine, meta={"filename_or_obj": "case0.nii.gz"})
    d = NyulStandardized(keys="image", landmarks=landmarks)({"image": img, "label": 3})
    assert isinstance(d["image"], MetaTensor) and d["label"] == 3
    torch.testing.assert_close(d["image"].affine, affine)
    assert d["image"].meta["filename_or_obj"] == "case0.nii.gz"
    np.testing.assert_allclose(d["image"].numpy(), out.numpy(), atol=1e-5)
    with pytest.raises(KeyError):
        NyulStandardized(keys="missing", landmarks=landmarks)({"image": img})
    assert "missing" not in NyulStandardized("missing", landmarks, allow_missing_keys=True)({"image": img})


def test_json_round_trip(tmp_path: Path, landmarks: NyulLandmarks) -> None:
    path = landmarks.save(tmp_path / "sub" / "nyul.json")
    data = json.loads(path.read_text())
    assert data["format"] == "meddiff.nyul_landmarks" and data["version"] == 1
    assert data["standard_range"] == [0.0, 100.0]
    assert NyulLandmarks.load(path) == landmarks
    assert NyulLandmarks.from_dict(data) == landmarks
    assert NyulStandardize(str(path)).landmarks == landmarks
    assert NyulStandardize(data).landmarks == landmarks
    assert [p.name for p in path.parent.iterdir()] == ["nyul.json"]  # no temp files left


def test_missing_and_invalid_file_errors_name_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "nyul.json"
    with pytest.raises(FileNotFoundError, match="train_autoencoder") as err:
        NyulStandardized(keys="image", landmarks=missing)
    assert str(missing) in str(err.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        NyulLandmarks.load(bad)
    bad.write_text(json.dumps({"standard_landmarks": [0, 2, 1], "percentiles": [1, 50, 99]}))
    with pytest.raises(ValueError, match="bad.json"):
        NyulStandardize(bad)


class _CountingLoader:
    def __init__(self, images: dict[str, np.ndarray]) -> None:
        self.images = images
        self.calls = 0

    def __call__(self, item: str) -> np.ndarray:
        self.calls += 1
        return self.images[item]


def test_learn_writes_then_reuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loader = _CountingLoader({f"case{i}": _anatomy(i) * (i + 1) for i in range(3)})
    target = tmp_path / "models" / "nyul.json"
    with caplog.at_level("INFO", logger="meddiff.transforms.nyul"):
        out = learn_nyul_landmarks(list(loader.images), str(target), loader=loader)
    assert out == str(target) and target.is_file() and loader.calls == 3
    assert "3 images" in caplog.text
    first = target.read_text()

    again = learn_nyul_landmarks(list(loader.images), target, loader=loader)
    assert again == str(target) and loader.calls == 3 and target.read_text() == first

    learn_nyul_landmarks(list(loader.images)[:2], target, loader=loader, overwrite=True)
    assert loader.calls == 5 and NyulLandmarks.load(target).n_images == 2
    with pytest.raises(ValueError, match="no training files"):
        learn_nyul_landmarks([], tmp_path / "other.json", loader=loader)


def _write_cases(tmp_path: Path, n: int = 3) -> tuple[list[str], np.ndarray]:
    affine = affine_from_geometry((1.0, 1.0, 2.0), "RAS", spatial_size=SHAPE)
    paths = [str(save_nifti(_anatomy(i) * (1 + i), affine, tmp_path / f"case{i}.nii.gz")) for i in range(n)]
    return paths, affine


def test_learn_with_default_loader_on_paths(tmp_path: Path) -> None:
    paths, _ = _write_cases(tmp_path, 2)
    out = learn_nyul_landmarks(paths, tmp_path / "nyul.json", percentiles=[1, 25, 50, 75, 99])
    lm = NyulLandmarks.load(out)
    assert lm.n_images == 2 and lm.percentiles == [1, 25, 50, 75, 99]


def test_bundle_config_compose(tmp_path: Path) -> None:
    paths, affine = _write_cases(tmp_path)
    config = {
        "nyul_file": str(tmp_path / "models" / "nyul.json"),
        "train_files": [{"image": p} for p in paths],
        "load_image": {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        "nyul_landmarks": {
            "_target_": "meddiff.transforms.learn_nyul_landmarks",
            "files": "@train_files",
            "landmarks_file": "@nyul_file",
            "loader": "@load_image",
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                "@load_image",
                {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
                {"_target_": "meddiff.transforms.NyulStandardized", "keys": "image", "landmarks": "@nyul_landmarks"},
            ],
        },
    }
    parser = ConfigParser(config)
    parser.parse()
    pre = parser.get_parsed_content("preprocessing")
    assert isinstance(pre, Compose) and Path(config["nyul_file"]).is_file()
    a = pre({"image": paths[0]})["image"]
    b = pre({"image": paths[2]})["image"]  # same anatomy family, 3x the intensity
    assert isinstance(a, MetaTensor) and a.shape == (1, *SHAPE)
    np.testing.assert_allclose(a.affine.numpy(), affine, atol=1e-5)
    assert NyulLandmarks.load(config["nyul_file"]).n_images == 3
    for out in (a, b):
        fg = out[out > out.mean()]
        assert 0 < float(fg.median()) < 100
    # case 2 is stored at 3x intensity: standardisation removes the scaling
    raw = LoadImage(image_only=True)(paths[2])
    assert float(raw.max()) > 300 and float(b.max()) < 150


def test_tied_and_constant_images_stay_finite_and_monotone() -> None:
    lm = fit_nyul_landmarks([np.linspace(0.0, 1.0, 1001)], foreground=None)
    x = np.zeros(1000, np.float32)
    x[500:] = np.linspace(1.0, 2.0, 500)  # half the voxels tie at 0: several landmarks coincide
    out = NyulStandardize(lm)(x)
    assert np.all(np.isfinite(out)) and np.all(np.diff(out) >= 0)
    const = NyulStandardize(lm)(torch.full((4, 4), 3.0))
    assert torch.isfinite(const).all() and float(const.std()) == 0.0
