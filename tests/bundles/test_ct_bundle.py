# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The CT generation bundle end to end through `python -m monai.bundle run`, on LIDC-IDRI-style DICOM trees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import ITKReader, PydicomReader
from monai.transforms import LoadImage
from PIL import Image

from meddiff.data.demo import write_decoy_series
from tests.bundles.conftest import CT_BUNDLE, ct_phantom, run_bundle, write_ct_patient

# on top of TINY_OVERRIDES (16^3 volumes): 4 mm voxels, and three autoencoder levels = 8x downsampling (latent 2^3)
CT_SIZES = {"pixdim": "[4.0,4.0,4.0]", "autoencoder_channels": "[8,16,16]"}
AXIAL = np.diag([-3.2, -3.2, 3.5, 1.0])  # LPS-identity, as scanners write axial CT
AXIAL[:3, 3] = [30.0, 30.0, -60.0]


def write_ct_dataset(root: Path) -> dict[str, Path]:
    """Three DICOM patients (CT + decoy CR/SR/SEG series, one with extra CT series) and one NIfTI CT.

    Returns:
        The CT volume each patient should contribute, by patient folder name.
    """
    chosen = {
        "LIDC-T-0001": write_ct_patient(root, "LIDC-T-0001", ct_phantom(seed=1), AXIAL),
        "LIDC-T-0002": write_ct_patient(root, "LIDC-T-0002", ct_phantom(seed=2), AXIAL, decoys=("SEG",)),
        "LIDC-T-0003": write_ct_patient(root, "LIDC-T-0003", ct_phantom(seed=3), AXIAL),
    }
    # competing CT series of patient 1: a thick-slice recon (too few slices) and a shorter one (fewer slices)
    write_ct_patient(root, "LIDC-T-0001", ct_phantom((20, 20, 6), seed=4), np.diag([-3.2, -3.2, 10.0, 1.0]),
                     decoys=(), series="ct-thick")
    write_ct_patient(root, "LIDC-T-0001", ct_phantom((20, 20, 16), seed=5), AXIAL, decoys=(), series="ct-short")
    nifti = root / "ct-0004.nii.gz"
    nib.save(nib.Nifti1Image(ct_phantom(seed=6), np.diag([3.0, 3.0, 3.5, 1.0])), nifti)
    chosen["ct-0004.nii.gz"] = nifti
    return chosen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A copy of the bundle run as a user would: from its folder, given only a data folder and sizes."""
    root = tmp_path_factory.mktemp("ct_bundle")
    chosen = write_ct_dataset(root / "data")
    bundle = shutil.copytree(CT_BUNDLE, root / "bundle")
    overrides = {"bundle_root": None, "dataset_dir": str(root / "data"), **CT_SIZES}
    run_bundle(bundle, "train_autoencoder", {**overrides, "max_steps": "4", "val_interval": "2",
                                             "ckpt_interval": "2", "adversarial_start_step": "2"})
    run_bundle(bundle, "train_diffusion", {**overrides, "max_steps": "4", "val_interval": "2",
                                           "ckpt_interval": "2", "ema_start_step": "2", "warmup_steps": "2"})
    run_bundle(bundle, "inference", {**overrides, "num_samples": "2", "num_inference_steps": "3",
                                     "write_dicom": "true"})
    return bundle, chosen


def test_defaults_are_the_papers_ct_setting():
    parser = ConfigParser()
    parser.read_config([str(CT_BUNDLE / "configs" / f) for f in ("common.json", "train_autoencoder.json")])
    size = parser.get_parsed_content("spatial_size")
    assert size == [128, 128, 128] and parser.get_parsed_content("axcodes") == "RAS"
    autoencoder = parser.get_parsed_content("autoencoder_def")
    with torch.no_grad():
        latent = autoencoder.encode_stage_2_inputs(torch.zeros(1, 1, 16, 16, 16))
    factor = 16 // latent.shape[-1]
    assert factor == 8 and [s // factor for s in size] == [16, 16, 16]  # latent 16^3 for 128^3 input
    assert latent.shape[1] == parser.get_parsed_content("embedding_dim") == 8
    assert parser.get_parsed_content("ct_min_slices") == 16


def test_training_uses_one_ct_series_per_patient(trained):
    bundle, chosen = trained
    models = bundle / "models"
    datalist = json.loads((models / "datalist.json").read_text())
    used = sorted(Path(datalist["meddiff"]["data_dir"]) / i["image"] for i in datalist["training"] + datalist["validation"])
    assert used == sorted(p.resolve() for p in chosen.values())
    assert len(datalist["training"]) == 3 and len(datalist["validation"]) == 1
    for name in ("autoencoder", "diffusion_model"):
        assert (models / f"{name}.pt").is_file() and (models / f"{name}_best.pt").is_file()
    info = json.loads((models / "diffusion_model.json").read_text())
    assert info["latent_shape"] == [4, 2, 2, 2]  # 16^3 / 8, embedding_dim 4
    assert not list(models.rglob("*.tmp*"))


def test_inference_writes_hu_nifti_pngs_and_dicom(trained):
    bundle, _ = trained
    out = bundle / "outputs"
    files = sorted(out.glob("sample_*.nii.gz"))
    assert [f.name for f in files] == ["sample_000.nii.gz", "sample_001.nii.gz"]
    for f in files:
        img = nib.load(f)
        assert img.get_data_dtype() == np.int16 and img.shape == (16, 16, 16)
        assert np.allclose(img.header.get_zooms(), (4.0, 4.0, 4.0)) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
        hu = np.asarray(img.dataobj)
        assert hu.min() >= -1024 and hu.max() <= 1024
        stem = f.name[: -len(".nii.gz")]
        for window in ("lung", "soft_tissue"):
            assert Image.open(out / f"{stem}_{window}.png").size[0] > 16

        # the DICOM series holds the same HU values on the same grid for every reader
        folder = out / f"{stem}_dicom"
        slices = sorted(folder.iterdir())
        assert len(slices) == 16
        ds = pydicom.dcmread(slices[0])
        assert ds.Modality == "CT" and "DERIVED" in ds.ImageType and "SYNTHETIC" in ds.PatientID
        assert "SYNTHETIC" in str(ds.PatientName) and "NOT FOR DIAGNOSIS" in ds.SeriesDescription
        stack = np.stack([(d := pydicom.dcmread(s)).pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept)
                          for s in slices], -1)
        np.testing.assert_array_equal(stack, hu)
        image = itk.imread(str(folder))
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
        np.testing.assert_allclose(np.asarray(image.GetOrigin()), lps[:3, 3], atol=1e-4)
        np.testing.assert_allclose(np.asarray(image.GetSpacing()), [4.0, 4.0, 4.0])
        np.testing.assert_allclose(itk.array_from_matrix(image.GetDirection()), lps[:3, :3] / 4.0, atol=1e-6)
        np.testing.assert_array_equal(itk.array_from_image(image).T, hu)
        for reader in (ITKReader(), PydicomReader()):
            loaded = LoadImage(reader=reader, image_only=True)(str(folder))
            np.testing.assert_allclose(loaded.numpy(), hu, atol=1e-3)
            np.testing.assert_allclose(loaded.affine.numpy(), img.affine, atol=1e-4)
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["synthetic"] is True and len(manifest["samples"]) == 2
    for f, record in zip(files, manifest["samples"]):
        method = f"{manifest['sampling_method']}{manifest['num_inference_steps']}"
        assert nib.load(f).header["descrip"].item().decode() == f"SYNTHETIC meddiff {method} seed={record['seed']}"
        # a rerun checks every written file, the DICOM slices included
        assert sum(name.startswith(f"{record['file'][:-7]}_dicom/") for name in record["sha256"]) == 16


def _gap(data: Path, series: Path) -> tuple[str, str]:
    sorted(series.iterdir())[9].unlink()
    return str(series), "inconsistent slice spacing"


def _mixed(data: Path, series: Path) -> tuple[str, str]:
    other = write_ct_patient(data / "elsewhere", "LIDC-T-0001", ct_phantom(seed=8), AXIAL, decoys=())
    for f in sorted(other.iterdir())[:4]:
        shutil.copy(f, series / f"other_{f.name}")
    shutil.rmtree(data / "elsewhere")
    return str(series), "contains 2 DICOM series"


def _non_ct_only(data: Path, series: Path) -> tuple[str, str]:
    study = data / "LIDC-T-0009" / "study-1"
    for kind in ("CR", "SR", "SEG"):
        write_decoy_series(study / f"{kind.lower()}-only", kind, "LIDC-T-0009", "1.2.826.0.1.3680043.8.498.9")
    return str(data / "LIDC-T-0009"), "has no usable axial CT series"


def _truncated(data: Path, series: Path) -> tuple[str, str]:
    victim = sorted(series.iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:-150])
    return str(victim), "truncated"


@pytest.mark.parametrize("damage", [_gap, _mixed, _non_ct_only, _truncated], ids=lambda f: f.__name__.strip("_"))
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, damage):
    data = tmp_path / "data"
    series = write_ct_patient(data, "LIDC-T-0001", ct_phantom(seed=1), AXIAL)
    write_ct_patient(data, "LIDC-T-0002", ct_phantom(seed=2), AXIAL)
    name, problem = damage(data, series)
    models = tmp_path / "models"
    proc = run_bundle(CT_BUNDLE, "train_autoencoder", {"dataset_dir": str(data), "ckpt_dir": str(models),
                                                       "max_steps": "2", **CT_SIZES}, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"DataError: {name}: " in output and problem in output, output[-3000:]
    assert not [p for p in models.rglob("*") if p.is_file()], "a failed run left files behind"
