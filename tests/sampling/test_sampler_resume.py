# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""LatentDiffusionSampler.run in one process: resume from samples.json or a preempted run's part file, NIfTI descrip."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from meddiff.data.writers import save_nifti
from tests.sampling.test_latent_sampler import _sampler

NAMES = [f"sample_{i:03d}{ext}" for i in range(5) for ext in (".nii.gz", ".png")]


def _run(folder, **kw):
    sampler = _sampler(batch=2, output_dir=folder, spacing=[1.0, 1.0, 2.0], seed=10, num_samples=5, **kw)
    return sampler, sampler.run()


def _state(folder) -> dict[str, tuple[int, bytes]]:
    return {n: ((folder / n).stat().st_mtime_ns, (folder / n).read_bytes()) for n in NAMES}


def test_rerun_rewrites_only_missing_or_altered_volumes(tmp_path):
    _run(tmp_path)
    before = _state(tmp_path)
    manifest = json.loads((tmp_path / "samples.json").read_text())
    assert [r["seed"] for r in manifest["samples"]] == [10, 11, 12, 13, 14]
    assert set(manifest["samples"][1]["sha256"]) == {"sample_001.nii.gz", "sample_001.png"}
    assert all(r["seconds"] >= 0 for r in manifest["samples"])

    _run(tmp_path)  # nothing to do: no file rewritten
    assert _state(tmp_path) == before

    (tmp_path / "sample_001.nii.gz").unlink()  # lost, in a batch with sample_000
    png = tmp_path / "sample_004.png"
    png.write_bytes(png.read_bytes()[:-10])  # truncated
    _, files = _run(tmp_path)
    assert [f.name for f in files] == [f"sample_{i:03d}.nii.gz" for i in range(5)]
    after = _state(tmp_path)
    redone = {"sample_001.nii.gz", "sample_001.png", "sample_004.nii.gz", "sample_004.png"}
    for name in NAMES:
        assert after[name][1] == before[name][1], f"{name} differs from the first run's"  # byte-identical
        assert (after[name][0] != before[name][0]) == (name in redone), name
    again = json.loads((tmp_path / "samples.json").read_text())["samples"]
    assert [r["sha256"] for r in again] == [r["sha256"] for r in manifest["samples"]]
    assert [again[i] for i in (0, 2, 3)] == [manifest["samples"][i] for i in (0, 2, 3)]  # kept records
    assert not list(tmp_path.glob("samples.part-*")) and not list(tmp_path.glob(".*tmp*"))


def test_preempted_run_resumes_from_its_part_file(tmp_path):
    def preempt(volume, affine, stem):
        if stem.name == "sample_002":
            raise KeyboardInterrupt("preempted")

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, extra_writers=[preempt])
    assert not (tmp_path / "samples.json").exists()
    part = json.loads(next(tmp_path.glob("samples.part-rank0-*.json")).read_text())
    assert [r["seed"] for r in part["samples"]] == [10, 11]  # the batch finished before the preemption
    first = {n: (tmp_path / n).stat().st_mtime_ns for n in NAMES[:4]}

    _run(tmp_path)
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in NAMES[:4]} == first
    manifest = json.loads((tmp_path / "samples.json").read_text())
    assert [r["seed"] for r in manifest["samples"]] == [10, 11, 12, 13, 14]
    assert not list(tmp_path.glob("samples.part-*"))

    fresh = tmp_path / "fresh"
    _run(fresh)
    for name in NAMES:
        assert (fresh / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_other_settings_or_no_resume_sample_again(tmp_path):
    _run(tmp_path)
    before = _state(tmp_path)
    sampler = _sampler(batch=2, output_dir=tmp_path, spacing=[1.0, 1.0, 2.0], seed=10, num_samples=5)
    sampler.num_inference_steps = 3
    sampler.run()
    changed = _state(tmp_path)
    assert all(changed[n][0] != before[n][0] for n in NAMES)
    assert json.loads((tmp_path / "samples.json").read_text())["num_inference_steps"] == 3
    _run(tmp_path, resume=False)
    assert all(_state(tmp_path)[n][0] != changed[n][0] for n in NAMES)


def test_nifti_descrip_says_synthetic_method_and_seed(tmp_path):
    sampler, files = _run(tmp_path)
    for seed, path in zip(range(10, 15), files):
        descrip = nib.load(path).header["descrip"].item().decode()
        assert descrip == f"SYNTHETIC meddiff dpmpp_2m4 seed={seed}"
    text = sampler.nifti_description(3, **{"class": "x" * 100, "g": "3"})
    assert len(text) == 80 and text.startswith("SYNTHETIC meddiff dpmpp_2m4 seed=3 class=xx")
    assert sampler.nifti_description(3, note="é") == "SYNTHETIC meddiff dpmpp_2m4 seed=3 note=?"


def test_save_nifti_description_limits(tmp_path):
    volume = np.zeros((2, 3, 4), np.float32)
    assert nib.load(save_nifti(volume, None, tmp_path / "a.nii.gz")).header["descrip"].item() == b""
    with pytest.raises(ValueError, match="80 bytes"):
        save_nifti(volume, None, tmp_path / "b.nii.gz", description="S" * 81)
    with pytest.raises(ValueError, match="ASCII"):
        save_nifti(volume, None, tmp_path / "c.nii.gz", description="SYNTHETIC é")
    assert not list(tmp_path.glob("[bc]*"))
