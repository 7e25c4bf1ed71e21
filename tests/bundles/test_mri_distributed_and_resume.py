# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Real `torchrun` DDP (gloo, CPU) and kill-then-resume through the bundle CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.bundles.conftest import MRI_BUNDLE, bundle_command, run_bundle, write_mixed_mri_dataset
from tests.helpers import torchrun

pytestmark = pytest.mark.slow


def _rank_dump_overlay(path, network_id: str) -> str:
    """An extra config that makes every rank save its own copy of the trained weights at the end."""
    path.write_text(json.dumps({
        "+finalize": [f"$torch.save(@{network_id}.state_dict(), @ckpt_dir + '/rank' + os.environ['RANK'] + '.pt')"],
    }))
    return str(path)


def test_ddp_two_ranks_agree(tmp_path):
    data = write_mixed_mri_dataset(tmp_path / "data")
    common = {"dataset_dir": str(data), "ckpt_dir": str(tmp_path / "models"), "npy_spacing": "[1.2,1.2,2.5]",
              "max_steps": "3", "val_interval": "3", "ckpt_interval": "3", "val_fraction": "0.25"}
    overlay = _rank_dump_overlay(tmp_path / "dump_ae.json", "autoencoder_def")
    run_bundle(MRI_BUNDLE, "train_autoencoder", {**common, "adversarial_start_step": "1"},
               extra_configs=["configs/multi_gpu_train.json", overlay], launcher=torchrun())
    w0 = torch.load(tmp_path / "models" / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "models" / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "autoencoder weights differ between ranks"
    saved = torch.load(tmp_path / "models" / "autoencoder.pt", weights_only=True)
    assert all(torch.equal(w0[k], saved[k]) for k in w0)
    log = [json.loads(line) for line in (tmp_path / "models" / "autoencoder_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "l1" in r] == [1, 2, 3]  # one log per step: only rank 0 writes

    overlay = _rank_dump_overlay(tmp_path / "dump_dm.json", "diffusion_def")
    run_bundle(MRI_BUNDLE, "train_diffusion", {**common, "ema_start_step": "1", "warmup_steps": "1"},
               extra_configs=["configs/multi_gpu_train.json", overlay], launcher=torchrun())
    w0 = torch.load(tmp_path / "models" / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "models" / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "diffusion weights differ between ranks"


def test_sigkill_then_resume_continues_exactly(tmp_path):
    data = write_mixed_mri_dataset(tmp_path / "data")
    base = {"dataset_dir": str(data), "npy_spacing": "[1.2,1.2,2.5]", "val_fraction": "0.25", "val_interval": "2",
            "ckpt_interval": "2", "keep_last": "10"}
    # one autoencoder shared by both diffusion runs
    run_bundle(MRI_BUNDLE, "train_autoencoder", {**base, "ckpt_dir": str(tmp_path / "ref"), "max_steps": "2"})
    stage2 = {"max_steps": "8", "ema_start_step": "1", "ema_update_every": "1", "warmup_steps": "4"}
    for run in ("straight", "killed"):
        (tmp_path / run).mkdir()
        for name in ("autoencoder.pt", "datalist.json", "nyul_landmarks.json"):
            (tmp_path / run / name).write_bytes((tmp_path / "ref" / name).read_bytes())
    run_bundle(MRI_BUNDLE, "train_diffusion", {**base, **stage2, "ckpt_dir": str(tmp_path / "straight")})

    # the same run, killed with SIGKILL once its step-4 checkpoint exists
    killed = tmp_path / "killed"
    slow = {**base, **stage2, "ckpt_dir": str(killed), "max_steps": "100000", "ckpt_interval": "2"}
    cmd = bundle_command(MRI_BUNDLE, "train_diffusion", slow)
    proc = subprocess.Popen(cmd, cwd=MRI_BUNDLE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    target = killed / "checkpoints" / "diffusion_model_step00000004.pt"
    deadline = time.time() + 300
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run never wrote its step-4 checkpoint"
    for ckpt in (killed / "checkpoints").glob("*.pt"):
        torch.load(ckpt, weights_only=True)  # atomic writes: every .pt left behind is whole
        if ckpt != target:
            ckpt.unlink()  # resume from exactly the step-4 state, even if step 6 landed before the kill
    # what a kill in the middle of the step-6 write leaves (the race above may or may not have made one)
    (killed / "checkpoints" / ".diffusion_model_step00000006.k1ll3d.tmp").write_bytes(b"half a checkpoint")

    run_bundle(MRI_BUNDLE, "train_diffusion", {**base, **stage2, "ckpt_dir": str(killed)})
    assert not [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")], "partial writes remain"
    log = [json.loads(line) for line in (killed / "diffusion_model_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    resumed_at = len(steps) - 1 - steps[::-1].index(5)  # the resumed run logs 5, 6, 7, 8 last
    assert steps[resumed_at:] == [5, 6, 7, 8]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "diffusion_model_step00000008.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "diffusion_model_step00000008.pt", weights_only=True)
    assert b["step"] == 8
    for module in ("diffusion_model", "ema", "optimizer", "lr_scheduler"):
        flat_a, flat_b = _flatten(a["modules"][module]), _flatten(b["modules"][module])
        assert flat_a.keys() == flat_b.keys()
        assert all(_same(flat_a[k], flat_b[k]) for k in flat_a), f"{module} differs after resume"


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix: obj}


def _same(x, y):
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
