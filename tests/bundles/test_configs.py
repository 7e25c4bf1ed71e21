# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Static checks of the bundle configs: shared copies in sync, resolvable targets, valid metadata."""

from __future__ import annotations

import json
import pydoc
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.bundle.reference_resolver import ReferenceResolver

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / "common" / "configs" / "generative"
GENERATION_BUNDLES = sorted(p.parent for p in (REPO / "bundles").glob("*_generative_diffusion/configs"))
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def test_generation_bundles_exist():
    assert REPO / "bundles" / "mri_generative_diffusion" in GENERATION_BUNDLES


@pytest.mark.parametrize("bundle", GENERATION_BUNDLES, ids=lambda p: p.name)
def test_shared_configs_are_exact_copies(bundle):
    for shared in SHARED.glob("*.json"):
        copy = bundle / "configs" / shared.name
        assert copy.is_file(), f"{copy} missing: run `make configs`"
        assert copy.read_text() == shared.read_text(), f"{copy} drifted from {shared}: edit the shared file, run `make configs`"


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _targets(obj):
    if isinstance(obj, dict):
        if "_target_" in obj:
            yield obj["_target_"]
        for v in obj.values():
            yield from _targets(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _targets(v)


ALL_CONFIGS = sorted((REPO / "bundles").glob("*/configs/*.json")) + sorted((REPO / "common" / "configs").rglob("*.json"))


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_meddiff_only_through_full_targets(config):
    content = json.loads(config.read_text())
    for text in _strings(content):
        if text.startswith("$"):
            assert "meddiff" not in text, f"{config}: {text!r} reaches meddiff from an expression; use a _target_"
    for target in _targets(content):
        if target.startswith("meddiff"):
            assert pydoc.locate(target) is not None, f"{config}: cannot locate {target}"
        elif "." in target and not target.startswith("@"):
            assert pydoc.locate(target) is not None, f"{config}: cannot locate {target}"


@pytest.mark.parametrize("bundle", GENERATION_BUNDLES, ids=lambda p: p.name)
@pytest.mark.parametrize("stage", [["train_autoencoder"], ["train_autoencoder", "train_diffusion"],
                                   ["train_autoencoder", "inference"], ["train_autoencoder", "multi_gpu_train"],
                                   ["train_autoencoder", "inference", "multi_gpu_inference"],
                                   ["train_autoencoder", "train_diffusion", "train_controlnet"],
                                   ["train_autoencoder", "inference", "inference_controlnet"]])
def test_workflow_configs_parse_and_reference_defined_ids(bundle, stage):
    files = [bundle / "configs" / "common.json"] + [bundle / "configs" / f"{s}.json" for s in stage]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.parse()
    for key in ("run", "initialize", "train#trainer" if "inference" not in stage else "sampler"):
        assert key in parser, f"{stage}: {key} missing"
    # every @reference names an id that exists
    for ref in ReferenceResolver.find_refs_in_config(parser.get(), id=""):
        assert ref in parser, f"{stage}: reference to missing id @{ref}"


@pytest.mark.parametrize("bundle", GENERATION_BUNDLES, ids=lambda p: p.name)
def test_metadata_matches_zoo_schema(bundle):
    meta = bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta), filepath=str(SCHEMAS / "meta_schema_generator_ldm_20240318.json"))
    content = json.loads(meta.read_text())
    assert content["version"] in content["changelog"], "the current version needs a changelog entry"


def test_full_3d_monai_unet_is_selectable_by_config():
    bundle = REPO / "bundles" / "mri_generative_diffusion" / "configs"
    parser = ConfigParser()
    parser.read_config([str(bundle / "common.json"), str(bundle / "train_autoencoder.json"),
                        str(bundle / "train_diffusion.json")])
    parser.update({"diffusion_def": "@monai_unet_def", "unet_channels": [8, 16], "unet_attention_levels": [False, True],
                   "unet_res_blocks": 1, "unet_head_channels": 8, "embedding_dim": 4})
    net = parser.get_parsed_content("diffusion_def")
    assert type(net).__name__ == "DiffusionModelUNet"
    x = torch.randn(1, 4, 4, 4, 4)
    assert net(x=x, timesteps=torch.tensor([3])).shape == x.shape
    parser.update({"diffusion_def": "@pseudo3d_unet_def"})
    parser.parse()
    assert type(parser.get_parsed_content("diffusion_def")).__name__ == "Pseudo3DUNet"
