# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The shared evaluation workflow end to end on the MRI bundle, through `python -m monai.bundle run`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

from meddiff.sampling import affine_from_geometry, save_nifti
from meddiff.transforms import scale_from_unit_range
from tests.bundles.conftest import MRI_BUNDLE, REPO, run_bundle, write_mixed_mri_dataset
from tests.helpers import TINY_OVERRIDES

EVALUATE = ["configs/evaluate.json"]
# the bundles `make configs` copies the shared generation configs into
GENERATION_BUNDLES = [REPO / "bundles" / name for name in re.search(
    r"^GENERATIVE_BUNDLES\s*:=(.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()]


@pytest.mark.parametrize("bundle", GENERATION_BUNDLES, ids=lambda p: p.name)
def test_every_generation_bundle_resolves_the_shared_evaluate_config(bundle):
    """The one shared evaluate.json finds every id it references in each bundle's merge (MRI, CT)."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in ("common.json", "train_autoencoder.json",
                                                              "evaluate.json")])
    parser.parse()
    for ref in ReferenceResolver.find_refs_in_config(parser.get(), id=""):
        assert ref in parser, f"{bundle.name}: evaluate.json references missing id @{ref}"
    assert isinstance(parser["intensity_units"], str) and len(parser["intensity_range"]) == 2
    assert parser["evaluate#evaluator#_target_"] == "meddiff.evaluation.GenerationEvaluator"


def _preprocessed_training_volume(overrides: dict[str, str], index: int) -> tuple[str, torch.Tensor]:
    """A training volume exactly as the workflows see it, built from the bundle's own config."""
    parser = ConfigParser()
    parser.read_config([str(MRI_BUNDLE / "configs" / f) for f in ("common.json", "train_autoencoder.json")])
    for key, value in {**TINY_OVERRIDES, **overrides}.items():
        try:
            parser[key] = json.loads(value)  # numbers, lists, booleans as the CLI parses them
        except json.JSONDecodeError:
            parser[key] = value  # paths
    parser["bundle_root"] = str(MRI_BUNDLE)
    item = parser.get_parsed_content("train_files")[index]
    volume = parser.get_parsed_content("preprocessing")(dict(item))["image"]
    return str(item["image"]), torch.as_tensor(volume, dtype=torch.float32)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = write_mixed_mri_dataset(root / "data")
    overrides = {"dataset_dir": str(data), "ckpt_dir": str(root / "models"), "output_dir": str(root / "samples"),
                 "npy_spacing": "[1.2,1.2,2.5]", "val_fraction": "0.25", "eval_dir": str(root / "eval")}
    short = {"max_steps": "3", "val_interval": "3", "ckpt_interval": "3"}
    run_bundle(MRI_BUNDLE, "train_autoencoder", {**overrides, **short, "adversarial_start_step": "2"})
    run_bundle(MRI_BUNDLE, "train_diffusion", {**overrides, **short, "ema_start_step": "2", "warmup_steps": "1"})
    run_bundle(MRI_BUNDLE, "inference", {**overrides, "num_samples": "3", "num_inference_steps": "2"})

    # plant a copy of a training volume shifted by one voxel, and a noise volume, with the samples' geometry
    source, volume = _preprocessed_training_volume(overrides, index=1)
    affine = affine_from_geometry([2.0, 2.0, 2.0], "RAS", spatial_size=volume.shape[1:])
    shifted = torch.roll(volume, shifts=(1, -1, 1), dims=(1, 2, 3))
    save_nifti(scale_from_unit_range(shifted, 0.0, 100.0), affine, root / "samples" / "sample_900_copy.nii.gz")
    noise = np.random.default_rng(0).uniform(0.0, 100.0, volume.shape[1:]).astype(np.float32)
    save_nifti(noise, affine, root / "samples" / "sample_901_noise.nii.gz")

    proc = run_bundle(MRI_BUNDLE, "train_autoencoder", {**overrides, "eval_num_pairs": "5"}, extra_configs=EVALUATE)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    return root, overrides, metrics, source, proc


def test_metrics_json_holds_every_section(evaluated):
    root, _, metrics, _, _ = evaluated
    assert {"config", "settings", "checkpoints", "data", "reconstruction", "diversity", "distribution",
            "memorization", "meddiff_version"} <= set(metrics)
    data = metrics["data"]
    assert (data["num_training"], data["num_validation"], data["num_synthetic"]) == (3, 1, 5)
    assert data["spatial_shape"] == [16, 16, 16]
    assert set(metrics["checkpoints"]) == {"autoencoder", "diffusion_model"}
    assert all(len(c["sha256"]) == 64 for c in metrics["checkpoints"].values())
    rec = metrics["reconstruction"]
    assert rec["units"] == "Nyul standard scale" and rec["intensity_range"] == [0.0, 100.0]
    assert len(rec["per_volume"]) == 1 and set(rec["summary"]) == {"psnr", "ssim", "mae"}
    assert 0.0 <= rec["per_volume"][0]["mae"] <= 100.0 and -1.0 <= rec["per_volume"][0]["ssim"] <= 1.0
    div = metrics["diversity"]
    assert len(div["synthetic"]["values"]) == 5 and len(div["real"]["values"]) == 3  # 3 training volumes: 3 pairs
    assert all(0.0 <= v <= 1.0 for v in div["synthetic"]["values"] + div["real"]["values"])
    dist = metrics["distribution"]
    assert dist["mmd_intensity"]["computed"] is True and isinstance(dist["mmd_intensity"]["value"], float)
    assert dist["fid"] == {"computed": False, "value": None, "reason": dist["fid"]["reason"]}
    assert "fid_weights_file" in dist["fid"]["reason"]
    assert dist["features"]["space"] == "autoencoder_latent"
    assert not list((root / "eval").glob("*.tmp*"))


def test_audit_flags_the_planted_copy_not_the_noise(evaluated):
    _, _, metrics, source, _ = evaluated
    mem = metrics["memorization"]
    image = {e["file"]: e for e in mem["image"]["synthetic"]}
    copy = image["sample_900_copy.nii.gz"]
    assert copy["flagged"] and copy["similarity"] > 0.999
    assert copy["nearest_training"] == source and copy["shift_voxels"] == [1, -1, 1]
    assert "sample_900_copy.nii.gz" in mem["flagged"]
    assert not image["sample_901_noise.nii.gz"]["flagged"] and "sample_901_noise.nii.gz" not in mem["flagged"]
    assert mem["flag_spaces"] == ["image"]
    assert image["sample_901_noise.nii.gz"]["similarity"] < mem["image"]["threshold"]
    assert len(mem["image"]["baseline"]) == 1 and mem["feature"]["space"] == "autoencoder_latent"


def test_report_is_self_contained_html_with_figures(evaluated):
    root, _, _, _, _ = evaluated
    text = (root / "eval" / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    for heading in ("Reconstruction", "Diversity (MS-SSIM)", "Distribution distance", "Memorization audit",
                    "Samples"):
        assert f"<h2>{heading}</h2>" in text
    assert text.count("data:image/png;base64,") >= 5
    assert "sample_900_copy.nii.gz" in text and 'class="flag"' in text
    assert "src=\"http" not in text and "<script" not in text


def test_empty_synthetic_folder_fails_clearly(evaluated, tmp_path):
    _, overrides, _, _, _ = evaluated
    empty = tmp_path / "no_samples"
    empty.mkdir()
    proc = run_bundle(MRI_BUNDLE, "train_autoencoder",
                      {**overrides, "synthetic_dir": str(empty), "eval_dir": str(tmp_path / "eval")},
                      extra_configs=EVALUATE, check=False)
    assert proc.returncode != 0
    assert f"{empty}: no synthetic volumes matching 'sample_*.nii.gz'" in proc.stdout + proc.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()
