# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/controlnet.py on the demo widths, one repeat: both rows timed, JSON and Markdown written."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_bench


@pytest.mark.slow  # builds the demo networks and samples 8 volumes: ~10-20 s
def test_controlnet_bench_demo_widths(tmp_path):
    bench = load_bench("controlnet")
    out, md = tmp_path / "cn.json", tmp_path / "cn.md"
    assert bench.main(["--widths", "demo", "--repeats", "1", "--device", "cpu", "--out", str(out),
                       "--markdown", str(md)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["latent_shape"] == [4, 16, 16, 16] and row["spatial_size"] == [64, 64, 64]
    assert 0 < row["controlnet_parameters"] < row["denoiser_parameters"]
    times = row["seconds_per_volume"]
    assert all(times[k] > 0 for k in ("unconditioned", "controlnet", "loop_unconditioned", "loop_controlnet"))
    assert row["ratio"] == times["controlnet"] / times["unconditioned"]
    assert "| demo | 64x64x64 | 4x16x16x16 |" in md.read_text()
