# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/light_decoder.py at toy size: decode rows per width in child processes, VQ-GANs trained through the CLI."""

from __future__ import annotations

import json

from tests.helpers import load_bench


def test_light_decoder_bench_toy(tmp_path):
    bench = load_bench("light_decoder")
    out, md = tmp_path / "ld.json", tmp_path / "ld.md"
    results = bench.main(["--spatial_size", "64", "64", "32", "--widths", "16", "8", "--psnr_widths", "8", "4",
                          "--steps", "4", "--num_volumes", "3", "--threads", "1", "--workdir", str(tmp_path / "work"),
                          "--out", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text()) == results
    assert [r["autoencoder_channels"] for r in results["time_rows"]] == [[16, 128, 256], [8, 128, 256]]
    assert all(r["image_shape"] == [64, 64, 32] and r["peak_rss_mb"] > 100 for r in results["time_rows"])
    narrow, narrower = results["psnr_rows"]
    assert narrow["autoencoder_channels"] == [8, 32] and narrower["autoencoder_channels"] == [4, 32]
    assert narrow["decoder_parameters"] > narrower["decoder_parameters"]  # the finest level is the one narrowed
    assert narrow["val_steps"] == [2, 4] and all(0 < p < 60 for p in narrow["val_psnr"] + narrower["val_psnr"])
    assert (tmp_path / "work" / "vqgan_4" / "autoencoder.pt").is_file()
    assert "| [4, 32] |" in md.read_text()
