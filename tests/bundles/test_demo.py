# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""`make demo`'s generation part: the shipped demo weights sampled through the real bundle CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from meddiff.cli.demo import run_mri_demo
from meddiff.cli.demo_ct import run_ct_demo


def test_mri_demo_samples_the_shipped_weights(tmp_path):
    samples = tmp_path / "samples"
    assert run_mri_demo(str(tmp_path)) == str(samples)
    manifest = json.loads((samples / "samples.json").read_text())
    assert manifest["sampling_method"] == "rflow" and manifest["num_inference_steps"] == 10
    assert manifest["synthetic"] and set(manifest["weights"]) == {"model_autoencoder.pt", "model.pt"}
    volumes = sorted(samples.glob("sample_*.nii.gz"))
    assert len(volumes) == 2 and len(list(samples.glob("sample_*.png"))) == 2
    for path in volumes:
        image = nib.load(path)
        assert image.shape == (64, 64, 64)
        np.testing.assert_allclose(image.header.get_zooms(), (3.0, 3.0, 3.0))
        data = image.get_fdata()
        assert np.isfinite(data).all() and data.std() > 1.0  # a volume with content, not a constant


def test_ct_demo_samples_the_shipped_weights_in_hounsfield_units(tmp_path):
    samples = tmp_path / "samples"
    run_ct_demo(str(tmp_path))
    volumes = sorted(samples.glob("sample_*.nii.gz"))
    assert len(volumes) == 2
    for path in volumes:
        image = nib.load(path)
        assert image.get_data_dtype() == np.int16 and image.shape == (64, 64, 64)
        hu = np.asarray(image.dataobj)
        assert hu.min() >= -1024 and hu.max() <= 1024
        assert 0.02 < (hu > -500).mean() < 0.6  # a head surrounded by air, not all air or all tissue
        assert len(list((samples / f"{path.name.removesuffix('.nii.gz')}_dicom").glob("*.dcm"))) == 64
