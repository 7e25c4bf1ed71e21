# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""GenerationEvaluator in process: outputs, the FID path with local weights, and bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from meddiff.data.errors import DataError
from meddiff.evaluation import GenerationEvaluator, json_safe
from meddiff.sampling import affine_from_geometry, save_nifti
from meddiff.transforms import scale_from_unit_range
from tests.helpers import tiny_autoencoder, unit_batch

RANGE = (-1000.0, 1000.0)  # CT-like units, so the code is exercised with negative values


class _Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def _write_samples(folder, volumes: torch.Tensor) -> None:
    affine = affine_from_geometry([2.0, 2.0, 2.0], "RAS", spatial_size=volumes.shape[2:])
    for k, v in enumerate(volumes):
        save_nifti(scale_from_unit_range(v, *RANGE), affine, folder / f"sample_{k:03d}.nii.gz")


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    real = unit_batch(7, 16, seed=0)
    train = [{"image": v} for v in real[:5]]
    val = [{"image": v} for v in real[5:]]
    samples = tmp_path / "samples"
    synthetic = torch.cat([real[2:3], torch.rand(2, 1, 16, 16, 16) * 2 - 1])  # an exact copy of training volume 2
    _write_samples(samples, synthetic)

    def make(**kwargs):
        args = {"autoencoder": tiny_autoencoder(), "train_dataset": train, "val_dataset": val,
                "synthetic_dir": samples, "output_dir": tmp_path / "eval", "intensity_range": RANGE,
                "spatial_size": [16, 16, 16], "spacing": [2.0, 2.0, 2.0], "intensity_units": "HU",
                "num_pairs": 3, "progress": False, **kwargs}
        return GenerationEvaluator(**args)

    return tmp_path, make


def test_writes_metrics_and_report_with_fid_from_local_weights(setup):
    tmp_path, make = setup
    weights = tmp_path / "features.pt"
    torch.save(_Features().state_dict(), weights)
    ckpt = tmp_path / "autoencoder.pt"
    torch.save(tiny_autoencoder().state_dict(), ckpt)
    metrics = make(feature_network=_Features(), feature_weights=weights,
                   weights_files={"autoencoder": ckpt, "diffusion_model": tmp_path / "absent.pt",
                                  "fid_features": weights}).run()
    assert metrics == json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["data"]["num_training"], metrics["data"]["num_validation"], metrics["data"]["num_synthetic"]) \
        == (5, 2, 3)
    assert metrics["checkpoints"]["diffusion_model"]["missing"] is True
    assert len(metrics["checkpoints"]["fid_features"]["sha256"]) == 64
    dist = metrics["distribution"]
    assert dist["fid"]["computed"] is True and math.isfinite(dist["fid"]["value"])
    assert dist["fid"]["num_features"] == 8 and dist["mmd_features"]["computed"] is True
    assert dist["features"]["space"] == "feature_network"
    mem = metrics["memorization"]
    assert mem["flagged"] == ["sample_000.nii.gz"] and mem["feature"]["space"] == "feature_network"
    assert mem["image"]["synthetic"][0]["nearest_training"] == "volume_002"
    assert metrics["reconstruction"]["units"] == "HU" and len(metrics["reconstruction"]["per_volume"]) == 2
    assert metrics["diversity"]["synthetic"]["pairs"] == [[0, 1], [0, 2], [1, 2]]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert 'class="flag"><td>sample_000.nii.gz' in report
    assert report.count("data:image/png;base64,") == 5 and "MAE (HU)" in report


def test_json_safe_writes_strict_json():
    out = json_safe({"a": math.inf, "b": -math.inf, "c": math.nan, "d": np.float32(1.5), "e": torch.tensor([1, 2]),
                     "f": (np.bool_(True),)})
    assert out == {"a": "inf", "b": "-inf", "c": None, "d": 1.5, "e": [1, 2], "f": [True]}
    json.dumps(out, allow_nan=False)


def test_empty_synthetic_folder_is_a_clear_error(setup):
    tmp_path, make = setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no synthetic volumes matching 'sample_\*\.nii\.gz'"):
        make(synthetic_dir=tmp_path / "empty").run()
    with pytest.raises(DataError, match="synthetic folder does not exist"):
        make(synthetic_dir=tmp_path / "nowhere").run()
    assert not (tmp_path / "eval").exists()


def test_shape_mismatch_is_a_clear_error(setup):
    tmp_path, make = setup
    bad = tmp_path / "bad"
    save_nifti(np.zeros((16, 16, 12), np.float32), affine_from_geometry([2.0] * 3), bad / "sample_007.nii.gz")
    with pytest.raises(DataError, match=r"sample_007\.nii\.gz: shape \[16, 16, 12\] .* \[16, 16, 16\]"):
        make(synthetic_dir=bad).run()
    assert not (tmp_path / "eval").exists()


def test_nan_sample_and_bad_settings_are_clear_errors(setup):
    tmp_path, make = setup
    bad = tmp_path / "nan"
    vol = np.zeros((16, 16, 16), np.float32)
    vol[3, 3, 3] = np.nan
    save_nifti(vol, affine_from_geometry([2.0] * 3), bad / "sample_000.nii.gz")
    with pytest.raises(DataError, match="NaN or Inf"):
        make(synthetic_dir=bad).run()
    with pytest.raises(ValueError, match="no feature_network"):
        make(feature_weights=tmp_path / "w.pt")
    with pytest.raises(ValueError, match="audit_percentile"):
        make(audit_percentile=-1)
    with pytest.raises(ValueError, match="training and validation volumes"):
        make(val_dataset=[]).run()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        make(feature_network=_Features(), feature_weights=tmp_path / "missing.pt").run()
