# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Clinical-style DICOM through the real ``python -m monai.bundle run`` CLI: scanner jitter trains, a removed
slice stops the run with the file named on the last line of the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from meddiff.data import write_dicom_series
from tests.bundles.conftest import MRI_BUNDLE, run_bundle
from tests.helpers import blob_volume


def _jittered_series(folder: Path, seed: int, jitter_mm: float = 0.03) -> list[Path]:
    """A 2D MR series whose stored positions are off their 3 mm grid by up to ``jitter_mm`` (1 % of a slice)."""
    ras = np.diag([1.5, 1.5, 3.0, 1.0])
    ras[:3, 3] = [-15.0, -12.0, 4.0]
    files = write_dicom_series(blob_volume((22, 22, 12), seed=seed), ras, folder, modality="MR",
                               series_description="AX T1 2D")
    rng = np.random.default_rng(seed)
    for f in files[1:-1]:
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.2f}", f"{y:.2f}", f"{z + rng.uniform(-jitter_mm, jitter_mm):.2f}"]
        ds.save_as(f)
    return files


@pytest.fixture
def clinical_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for i in range(3):
        _jittered_series(data / f"sub-0{i}" / "ax_t1", seed=i)
    return data


def test_series_with_scanner_jitter_trains(clinical_data: Path, tmp_path: Path) -> None:
    for series in sorted(clinical_data.glob("sub-*/ax_t1")):  # each beyond the 1 % of the median gap once required
        z = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in series.iterdir())
        gaps = np.diff(z)
        assert np.abs(gaps / np.median(gaps) - 1).max() > 0.01
    models = tmp_path / "models"
    proc = run_bundle(MRI_BUNDLE, "train_autoencoder", {"dataset_dir": str(clinical_data), "ckpt_dir": str(models),
                                                        "max_steps": "2", "val_fraction": "0.34"})
    output = proc.stdout + proc.stderr
    assert "uneven slice positions: largest deviation" in output  # accepted, with the warning
    datalist = json.loads((models / "datalist.json").read_text())
    assert len(datalist["training"]) == 2 and len(datalist["validation"]) == 1
    assert (models / "autoencoder.pt").is_file()
    log = [json.loads(line) for line in (models / "autoencoder_log.jsonl").read_text().splitlines()]
    losses = [v for r in log for k, v in r.items() if "loss" in k and isinstance(v, float)]
    assert losses and all(np.isfinite(losses))


def test_series_with_a_removed_slice_stops_naming_the_file(clinical_data: Path, tmp_path: Path) -> None:
    series = clinical_data / "sub-01" / "ax_t1"
    (series / "slice_0006.dcm").unlink()
    models = tmp_path / "models"
    proc = run_bundle(MRI_BUNDLE, "train_autoencoder", {"dataset_dir": str(clinical_data), "ckpt_dir": str(models),
                                                        "max_steps": "2"}, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"meddiff.data.errors.DataError: {series}: inconsistent slice spacing: "), last
    assert "between slice_0005.dcm and slice_0007.dcm" in last and "(missing slice?)" in last, last
    assert not [p for p in models.rglob("*") if p.is_file()], "a failed run left files behind"


def test_ct_bundle_trains_on_planning_exports_with_rt_objects_beside_the_ct(tmp_path: Path) -> None:
    """A radiotherapy planning export (CT + RTSTRUCT + RTPLAN + RTDOSE in one folder) is one CT series."""
    from tests.bundles.conftest import CT_BUNDLE, ct_phantom, write_ct_patient
    from tests.data.rt_helpers import write_rtdose, write_rtplan, write_rtstruct

    axial = np.diag([-3.2, -3.2, 3.5, 1.0])  # LPS-identity, as scanners write axial CT (as in the CT bundle tests)
    axial[:3, 3] = [30.0, 30.0, -60.0]
    data = tmp_path / "data"
    series = []
    for i in range(2):
        ct = write_ct_patient(data, f"RT-{i}", ct_phantom(seed=i), axial, decoys=())
        files = sorted(ct.glob("slice_*.dcm"))
        square = np.array([[4.5, 4.5], [12.5, 4.5], [12.5, 12.5], [4.5, 12.5]])
        write_rtstruct(ct / "RS.dcm", files, rois={"Body": {k: [square] for k in range(4, 12)}})
        write_rtplan(ct / "RP.dcm", files[0])
        write_rtdose(ct / "RD.dcm", files[0])
        series.append(ct)
    models = tmp_path / "models"
    proc = run_bundle(CT_BUNDLE, "train_autoencoder", {"dataset_dir": str(data), "ckpt_dir": str(models),
                                                       "max_steps": "2", "val_fraction": "0.5",
                                                       "pixdim": "[4.0,4.0,4.0]", "autoencoder_channels": "[8,16,16]"})
    output = proc.stdout + proc.stderr
    datalist = json.loads((models / "datalist.json").read_text())
    images = sorted(data / item["image"] for split in ("training", "validation") for item in datalist[split])
    assert images == sorted(series)
    assert f"{series[0]}: not part of the image series, skipped: RD.dcm (RTDOSE), RP.dcm (RTPLAN), RS.dcm " \
           "(RTSTRUCT)" in output, output[-3000:]
    assert (models / "autoencoder.pt").is_file()
