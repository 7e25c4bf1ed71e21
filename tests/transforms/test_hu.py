# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The CT bundle's HU mapping: its configured forward transform and the sampler's inverse round-trip within 1 HU."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from meddiff.data import write_dicom_series
from meddiff.sampling import affine_from_geometry, save_nifti
from meddiff.transforms import scale_from_unit_range

CT_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "ct_generative_diffusion"


def _ct_config(**overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CT_BUNDLE / "configs" / name) for name in ("common.json", "train_autoencoder.json")])
    parser.update(overrides)
    return parser


def test_defaults_window_and_outputs() -> None:
    parser = _ct_config()
    window = parser.get_parsed_content("intensity_range")
    assert window == [-1024.0, 1024.0]
    assert window[0] <= -1000 and window[1] >= 240  # air (lung) and soft tissue fit inside
    assert parser.get_parsed_content("output_dtype") == "int16"
    assert parser.get_parsed_content("mosaic_windows") == {"lung": [-1350.0, 150.0], "soft_tissue": [-160.0, 240.0]}
    writers = parser.get_parsed_content("extra_output_writers")
    # DICOM output is opt-in (--write_dicom true): the series, then the SEG of a mask-conditioned sample's labels
    assert [(type(w).__name__, w.enabled) for w in writers] == [("DicomSeriesOutput", False),
                                                               ("DicomSegOutput", False)]


def test_forward_then_inverse_within_one_hu() -> None:
    parser = _ct_config()
    low, high = parser.get_parsed_content("intensity_range")
    forward = parser.get_parsed_content("intensity_transform")
    hu = np.linspace(low - 500, high + 500, 4097, dtype=np.float32).reshape(1, 17, 241, 1)
    unit = forward({"image": torch.as_tensor(hu)})["image"]
    assert float(unit.min()) == -1.0 and float(unit.max()) == 1.0
    back = scale_from_unit_range(unit, low, high).numpy()
    inside = (hu >= low) & (hu <= high)
    assert np.abs(back - hu)[inside].max() < 1.0
    np.testing.assert_array_equal(back[hu < low], low)  # clipped to the window
    np.testing.assert_array_equal(back[hu > high], high)


def test_preprocessing_of_a_dicom_ct_round_trips_to_hu(tmp_path: Path) -> None:
    """DICOM (stored + intercept) -> bundle preprocessing -> [-1, 1] -> inverse -> int16 NIfTI: within 1 HU."""
    rng = np.random.default_rng(0)
    shape, spacing = (12, 10, 8), (2.0, 2.0, 2.0)
    hu = rng.integers(-1024, 1025, size=shape).astype(np.float32)
    affine = affine_from_geometry(spacing, "RAS", origin=(-11.0, -9.0, -7.0))
    folder = tmp_path / "ct"
    write_dicom_series(hu, affine, folder, modality="CT", rescale_intercept=-1024.0, dtype=np.uint16)
    parser = _ct_config(pixdim=list(spacing), spatial_size=list(shape), num_workers=0)
    low, high = parser.get_parsed_content("intensity_range")
    unit = parser.get_parsed_content("preprocessing")({"image": str(folder)})["image"]
    assert tuple(unit.shape) == (1, *shape) and float(unit.min()) >= -1 and float(unit.max()) <= 1
    back = scale_from_unit_range(unit, low, high)
    np.testing.assert_allclose(back[0].numpy(), hu, atol=1.0)
    nifti = save_nifti(back, affine, tmp_path / "ct.nii.gz", dtype=parser.get_parsed_content("output_dtype"))
    stored = np.asarray(nib.load(nifti).dataobj)
    assert stored.dtype == np.int16
    np.testing.assert_array_equal(stored, hu.astype(np.int16))


@pytest.mark.parametrize("window", [(-1024.0, 1024.0), (-1000.0, 400.0), (-160.0, 240.0)])
def test_int16_output_is_exact_for_integer_hu(tmp_path: Path, window: tuple[float, float]) -> None:
    low, high = window
    parser = _ct_config(intensity_range=list(window))
    forward = parser.get_parsed_content("intensity_transform")
    ints = np.arange(low, high + 1, dtype=np.float32).reshape(1, -1, 1, 1)
    unit = forward({"image": torch.as_tensor(ints)})["image"]
    path = save_nifti(scale_from_unit_range(unit, low, high)[0], np.eye(4), tmp_path / "x.nii.gz", dtype="int16")
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), ints[0].astype(np.int16))
