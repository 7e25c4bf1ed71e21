# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""bench/class_conditioning.py at toy size: rows per guidance setting, the bands, and reuse of trained weights."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_bench

TOY = ["--steps", "4", "--ae_steps", "2", "--num_train", "4", "--num_heldout", "4", "--seeds", "8"]


def test_class_conditioning_bench_toy(tmp_path):
    bench = load_bench("class_conditioning")
    out, md, work = tmp_path / "cc.json", tmp_path / "cc.md", tmp_path / "work"
    args = [*TOY, "--workdir", str(work), "--out", str(out), "--markdown", str(md)]
    results = bench.main([*args, "--guidance", "1.0,2.0:interval=0-0.5:rescale=0.7"])
    assert json.loads(out.read_text()) == results
    uncond, plain, tempered = results["rows"]
    assert [r["row"] for r in results["rows"]] == ["uncond", "g=1.0", "g=2.0 interval 0-0.5 rescale 0.7"]
    assert tempered["guidance_interval"] == [0.0, 0.5] and tempered["guidance_rescale"] == 0.7
    assert "guidance_scale" not in uncond and plain["guidance_scale"] == 1.0
    assert set(results["band_uncond"]) == {"msssim", "nn_ncc", "msssim_within_class"}
    for row in results["rows"]:
        assert set(row["inside_band"]) == set(results["band_uncond"])
        assert 0.0 <= row["measured_lesion_fraction"] <= 1.0 and -1.0 <= row["nn_ncc"] <= 1.0
    assert all(0.0 <= r["agreement"] <= 1.0 for r in (plain, tempered))
    assert "| g=2.0 interval 0-0.5 rescale 0.7 |" in md.read_text()
    # the fine-tuned autoencoder and the denoiser in --workdir are reused: same weights, same samples
    again = bench.main([*args, "--guidance", "1.0"])
    assert again["train_seconds"] == results["train_seconds"]
    assert again["rows"][1]["statistic"] == plain["statistic"]
    assert len(list(work.glob("diffusion_model_*.pt"))) == 1
    # another denoiser setting trains another denoiser (the autoencoder is still reused)
    bench.main([*args, "--guidance", "1.0", "--lr", "0.001"])
    assert len(list(work.glob("diffusion_model_*.pt"))) == 2 and len(list(work.glob("autoencoder_*.pt"))) == 1
    with pytest.raises(ValueError, match="unknown option"):
        bench.parse_guidance_rows("3.0:scale=2")
