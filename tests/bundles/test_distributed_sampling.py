# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sampling with real `torchrun` (2 gloo ranks, CPU) through the bundle CLI, unconditioned and mask-conditioned:
same bytes as one process, one merged manifest, resume."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from meddiff.networks import controlnet_from_denoiser
from tests.bundles.conftest import MRI_BUNDLE, STAGE_CONFIGS, run_bundle
from tests.helpers import TINY_VALUES, torchrun

pytestmark = pytest.mark.slow

SAMPLING = {"num_samples": "5", "sample_batch_size": "2", "num_inference_steps": "2", "sample_seed": "20"}
MULTI = ["configs/multi_gpu_inference.json"]
SAMPLE_CONTROLNET = ["configs/inference_controlnet.json"]


def _write_weights(ckpt_dir: Path) -> None:
    """Freshly initialised tiny networks (non-zero denoiser output) and their latent record in ``ckpt_dir``."""
    parser = ConfigParser()
    parser.read_config([str(MRI_BUNDLE / "configs" / f"{c}.json") for c in STAGE_CONFIGS["inference"]])
    parser.update(TINY_VALUES)
    parser.update({"bundle_root": str(MRI_BUNDLE), "ckpt_dir": str(ckpt_dir)})
    torch.manual_seed(0)
    autoencoder = parser.get_parsed_content("autoencoder_def")
    latent = autoencoder.encode_stage_2_inputs(torch.zeros(1, 1, *parser["spatial_size"]))
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "diffusion_model.json").write_text(json.dumps({
        "scale_factor": 1.0, "latent_shape": list(latent.shape[1:]), "objective": "rflow",
        "num_train_timesteps": parser["num_train_timesteps"]}))
    unet = parser.get_parsed_content("network_def")  # may read the latent record
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)  # zero-initialised: give it a non-trivial output
    torch.save(autoencoder.state_dict(), ckpt_dir / "autoencoder.pt")
    torch.save(unet.state_dict(), ckpt_dir / "diffusion_model.pt")


def _files(folder: Path, pattern: str = "sample_*") -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob(pattern))}


def test_two_ranks_write_the_bytes_of_one_process_and_resume(tmp_path):
    models = tmp_path / "models"
    _write_weights(models)
    one, two = tmp_path / "one", tmp_path / "two"
    run_bundle(MRI_BUNDLE, "inference", {**SAMPLING, "ckpt_dir": str(models), "output_dir": str(one)})
    proc = run_bundle(MRI_BUNDLE, "inference", {**SAMPLING, "ckpt_dir": str(models), "output_dir": str(two)},
                      extra_configs=MULTI, launcher=torchrun())
    log = proc.stdout + proc.stderr
    # batches [0, 1] [2, 3] [4] go round-robin: rank 0 writes 3 volumes, rank 1 two, none twice
    assert "rank 0/2: 3 samples written, 0 kept" in log and "rank 1/2: 2 samples written, 0 kept" in log, log[-3000:]
    for i in range(5):
        assert log.count(f"wrote {two / f'sample_{i:03d}.nii.gz'}") == 1

    expected = _files(one)
    assert len(expected) == 10  # NIfTI + PNG per volume
    assert expected["sample_000.nii.gz"][1] != expected["sample_001.nii.gz"][1]  # seeds give different volumes
    written = _files(two)
    assert {n: b for n, (_, b) in written.items()} == {n: b for n, (_, b) in expected.items()}  # byte-identical
    manifest = json.loads((two / "samples.json").read_text())
    single = json.loads((one / "samples.json").read_text())
    assert [r["seed"] for r in manifest["samples"]] == [20, 21, 22, 23, 24]
    assert [r["sha256"] for r in manifest["samples"]] == [r["sha256"] for r in single["samples"]]
    assert all(r["seconds"] >= 0 for r in manifest["samples"])
    assert not list(two.glob("samples.part-*"))
    for folder in (one, two):
        for i in range(5):
            descrip = nib.load(folder / f"sample_{i:03d}.nii.gz").header["descrip"].item().decode()
            assert descrip == f"SYNTHETIC meddiff rflow2 seed={20 + i}"

    # a rerun after a preemption or corruption (one volume lost, one PNG truncated) keeps every written and
    # verified volume (its files not rewritten) and writes only those two again (one process: the unit tests)
    (two / "sample_003.nii.gz").unlink()
    (two / "sample_000.png").write_bytes(written["sample_000.png"][1][:100])
    proc = run_bundle(MRI_BUNDLE, "inference", {**SAMPLING, "ckpt_dir": str(models), "output_dir": str(two)},
                      extra_configs=MULTI, launcher=torchrun())
    log = proc.stdout + proc.stderr
    assert "rank 0/2: 1 samples written, 2 kept" in log and "rank 1/2: 1 samples written, 1 kept" in log, log[-3000:]
    again = _files(two)
    assert {n: b for n, (_, b) in again.items()} == {n: b for n, (_, b) in expected.items()}
    redone = {n for n in again if again[n][0] != written[n][0]}
    assert redone == {"sample_000.nii.gz", "sample_000.png", "sample_003.nii.gz", "sample_003.png"}
    assert [r["seed"] for r in json.loads((two / "samples.json").read_text())["samples"]] == [20, 21, 22, 23, 24]


def _write_controlnet(ckpt_dir: Path, num_label_classes: int = 3) -> None:
    """A ControlNet copied from the denoiser in ``ckpt_dir``, its zero convolutions made non-zero (masks matter)."""
    parser = ConfigParser()
    parser.read_config([str(MRI_BUNDLE / "configs" / f"{c}.json") for c in STAGE_CONFIGS["inference"]])
    parser.update(TINY_VALUES)
    parser.update({"bundle_root": str(MRI_BUNDLE), "ckpt_dir": str(ckpt_dir), "num_label_classes": num_label_classes})
    unet = parser.get_parsed_content("network_def")
    unet.load_state_dict(torch.load(ckpt_dir / "diffusion_model.pt", weights_only=True))
    controlnet = controlnet_from_denoiser(parser.get_parsed_content("controlnet_def"), unet)
    torch.manual_seed(1)
    for param in controlnet.parameters():
        if not param.detach().abs().sum():
            torch.nn.init.normal_(param, std=0.05)
    torch.save(controlnet.state_dict(), ckpt_dir / "controlnet.pt")
    (ckpt_dir / "controlnet.json").write_text(json.dumps({"num_label_classes": num_label_classes,
                                                          "scale_factor": 1.0}))


def test_two_ranks_share_mask_conditioned_sampling_and_resume(tmp_path):
    models, masks = tmp_path / "models", tmp_path / "masks"
    _write_weights(models)
    _write_controlnet(models)
    masks.mkdir()
    for i in range(3):
        labels = np.zeros((16, 16, 16), np.uint8)
        labels[2 + i:12, 3:13, 4:10 + i], labels[5:9, 5:9, 5:9] = 1, 2
        nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0])), masks / f"case{i}.nii.gz")
    cn = {"ckpt_dir": str(models), "mask_dir": str(masks), "num_samples_per_mask": "2", "sample_batch_size": "1",
          "num_inference_steps": "2", "sample_seed": "30", "mask_label_names": "{'organ':1,'lesion':2}"}
    one, two = tmp_path / "one", tmp_path / "two"
    run_bundle(MRI_BUNDLE, "inference", {**cn, "output_dir": str(one)}, extra_configs=SAMPLE_CONTROLNET)
    proc = run_bundle(MRI_BUNDLE, "inference", {**cn, "output_dir": str(two)}, extra_configs=SAMPLE_CONTROLNET + MULTI,
                      launcher=torchrun())
    log = proc.stdout + proc.stderr
    # 6 batches of one volume go round-robin: each rank samples one volume of every mask, none twice
    assert "rank 0/2: 3 mask-conditioned samples written, 0 kept" in log, log[-3000:]
    assert "rank 1/2: 3 mask-conditioned samples written, 0 kept" in log, log[-3000:]
    names = [f"case{i}_{k:03d}_{kind}.nii.gz" for i in range(3) for k in range(2) for kind in ("image", "label")]
    for name in names:
        assert log.count(f"wrote {two / name}") == (name.endswith("_image.nii.gz"))
    expected, written = _files(one, "case*"), _files(two, "case*")
    assert sorted(expected) == sorted(names + [n.replace(".nii.gz", ".png") for n in names if "_image" in n])
    assert expected["case0_000_image.nii.gz"][1] != expected["case0_001_image.nii.gz"][1]  # seeds differ
    assert expected["case0_000_image.nii.gz"][1] != expected["case1_000_image.nii.gz"][1]  # masks differ
    assert {n: b for n, (_, b) in written.items()} == {n: b for n, (_, b) in expected.items()}  # byte-identical
    single, merged = (json.loads((d / "samples.json").read_text()) for d in (one, two))
    assert [r["seed"] for r in merged["samples"]] == list(range(30, 36))
    assert [r["sha256"] for r in merged["samples"]] == [r["sha256"] for r in single["samples"]]
    dataset = json.loads((two / "dataset.json").read_text())
    assert dataset == json.loads((one / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "organ", "2": "lesion"} and dataset["numTraining"] == 6
    assert not list(two.glob("samples.part-*"))

    (two / "case2_001_image.nii.gz").unlink()  # preempted: rank 1's last volume lost
    proc = run_bundle(MRI_BUNDLE, "inference", {**cn, "output_dir": str(two)}, extra_configs=SAMPLE_CONTROLNET + MULTI,
                      launcher=torchrun())
    log = proc.stdout + proc.stderr
    assert "rank 0/2: 0 mask-conditioned samples written, 3 kept" in log, log[-3000:]
    assert "rank 1/2: 1 mask-conditioned samples written, 2 kept" in log, log[-3000:]
    again = _files(two, "case*")
    assert {n: b for n, (_, b) in again.items()} == {n: b for n, (_, b) in expected.items()}
    assert {n for n in again if again[n][0] != written[n][0]} == {
        "case2_001_image.nii.gz", "case2_001_image.png", "case2_001_label.nii.gz"}
