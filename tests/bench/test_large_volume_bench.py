# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/large_volume.py at toy size: whole and tiled decode rows in child processes, seam error, JSON, Markdown."""

from __future__ import annotations

import json

from tests.helpers import load_bench


def test_large_volume_bench_toy(tmp_path):
    bench = load_bench("large_volume")
    out, md = tmp_path / "lv.json", tmp_path / "lv.md"
    results = bench.main(["--spatial_size", "64", "64", "32", "--rows", "decode", "--threads", "1", "--sweep_tile",
                          "0", "--tiling", '{"decode_tile_size": [5, 5, 4], "decode_overlap": [2, 2, 0], '
                          '"decode_tile_threshold": 0}', "--out", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text()) == results
    whole, tiled = results["rows"]["decode whole"], results["rows"]["decode tiled"]
    assert not whole["tiled"] and tiled["tiled"]
    assert whole["image_shape"] == tiled["image_shape"] == [64, 64, 32]
    assert whole["peak_rss_mb"] > 100 and tiled["peak_rss_mb"] > 100  # each child's own peak, in MB
    assert 0 < results["seam_error"]["max_abs"] < 0.1  # tiles of 5 latent voxels: visible, bounded seams
    assert "decode tiled" in md.read_text()
