# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/unet.py and bench/pipeline.py at toy size: they run, measure both rows, and write their JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_bench

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_unet_bench_toy(tmp_path):
    unet = load_bench("unet")
    assert unet.paper_channels([8, 32, 32, 4]) == [32, 64, 128, 256]
    out = tmp_path / "unet.json"
    results = unet.main(["--case", "toy", "4", "8", "8", "4", "--channels", "8", "16", "--repeats", "1",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == results
    rows = results["cases"]["toy"]["networks"]
    for row in rows.values():
        assert row["infer_ms_fp32"] > 0 and row["train_steps_s_bf16"] > 0 and row["activations_mib"] > 0
    assert rows["pseudo3d"]["params_m"] < rows["monai_3d"]["params_m"]  # in-plane kernels: fewer weights
    assert "infer_fp32_speedup_vs_monai_3d" in rows["pseudo3d"]


def test_unet_bench_reports_a_latent_a_network_cannot_take():
    unet = load_bench("unet")
    rows = unet.run({"thin": ((4, 8, 8, 2), [8, 16, 16])}, repeats=1, baseline="monai_3d",
                    device=unet.torch.device("cpu"))["thin"]["networks"]
    assert "error" in rows["monai_3d"]  # depth 2 cannot be halved twice
    assert "error" not in rows["pseudo3d"]  # the pseudo-3D UNet keeps the depth


@pytest.mark.parametrize("paper_steps", [None, 4])
def test_pipeline_bench_toy(tmp_path, paper_steps):
    pipeline = load_bench("pipeline")
    toy = ["--set", "spatial_size=[16,16,8]", "--set", "autoencoder_channels=[8,16]", "--set", "unet_channels=[8,16]",
           "--set", "unet_attention_levels=[false,true]", "--set", "unet_head_channels=8", "--set", "codebook_size=16",
           "--set", "embedding_dim=4", "--set", "num_train_timesteps=12", "--set", "num_inference_steps=3"]
    extra = [] if paper_steps is None else ["--paper_steps", str(paper_steps)]
    out = tmp_path / "pipeline.json"
    results = pipeline.main([*toy, *extra, "--volumes", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    default, paper = results["rows"]["default"], results["rows"]["paper"]
    configured = json.loads((BENCH.parent / "common" / "configs" / "generative" / "inference.json").read_text())
    assert default["method"] == configured["sampling_method"] and default["evaluations"] == 3 and default["sampling_dtype"] == "bfloat16"
    assert paper["evaluations"] == 12 and paper["extrapolated"] == (paper_steps is not None)
    assert results["latent_shape"] == [4, 4, 4, 2]
    assert results["speedup_total"] > 0 and 0 <= results["decode_bf16_max_abs_error"] < 2
