# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Denoiser cost at the paper's latents: our pseudo-3D UNet against MONAI's full-3D DiffusionModelUNet.

For each latent (knee 8x32x32x4, LIDC 8x16^3, brain 8x32^3 by default) both networks are built at the
paper's width for that latent (``unet_channels`` = latent in-plane size x [1, 2, 4, 8], attention on
the three deeper levels, 2 ResNet blocks, 32-channel heads, 8 norm groups: the bundles' settings) and
measured in this process, one after the other, on the same input:

* ``infer_ms_fp32`` / ``infer_ms_bf16``: milliseconds per sampling step (batch 1, no grad; bf16 =
  ``torch.autocast``);
* ``train_steps_s_fp32`` / ``train_steps_s_bf16``: Adam training steps per second (batch 2, L1 loss;
  ``bf16_train_ratio`` = bf16 step time / fp32 step time);
* ``activations_mib``: memory of the tensors autograd saves for backward in one fp32 training step
  (a device-independent measure of training memory), and ``peak_mib`` on CUDA;
* ``params_m``: parameters in millions.

Ratios are against the baseline network (``--baseline``, MONAI's full-3D UNet) measured in the same
process. A network that cannot take a latent (MONAI's UNet halves the depth too: 4 slices cannot go
through three downsamplings) gets its error instead of numbers.

    python bench/unet.py --out bench/results/unet.json
    python bench/unet.py --case toy 4 8 8 4 --channels 8 16 --repeats 1   # a custom latent (C H W D)
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

from meddiff.networks import Pseudo3DUNet
from meddiff.utils import CLOCKS, atomic_write_json, machine_info, timed

logger = logging.getLogger("bench.unet")

#: name -> latent (C, H, W, D)
LATENTS = {"knee": (8, 32, 32, 4), "lidc": (8, 16, 16, 16), "brain": (8, 32, 32, 32)}
NETWORKS: dict[str, Callable[..., torch.nn.Module]] = {"pseudo3d": Pseudo3DUNet, "monai_3d": DiffusionModelUNet}


def paper_channels(latent: Sequence[int]) -> list[int]:
    """The paper's denoiser width for a latent: its in-plane size x [1, 2, 4, 8]."""
    return [latent[1] * m for m in (1, 2, 4, 8)]


def build(kind: str, latent: Sequence[int], channels: Sequence[int], head_channels: int = 32,
          norm_groups: int = 8) -> torch.nn.Module:
    """One denoiser with the bundles' settings (attention on every level but the first, 2 ResNet blocks)."""
    levels = [False] + [True] * (len(channels) - 1)
    return NETWORKS[kind](spatial_dims=3, in_channels=latent[0], out_channels=latent[0], channels=list(channels),
                          attention_levels=levels, num_res_blocks=2, num_head_channels=min(head_channels, channels[1]),
                          norm_num_groups=min(norm_groups, channels[0]))


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device, clock: str) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, device, clock)[1] for _ in range(repeats))


def measure(net: torch.nn.Module, latent: Sequence[int], repeats: int, device: torch.device,
            clock: str = "wall") -> dict[str, float]:
    """Inference and training cost of one network on one latent (see the module docstring)."""
    net = net.to(device)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, *latent, generator=gen).to(device)
    x2 = torch.randn(2, *latent, generator=gen).to(device)
    t1 = torch.tensor([150], device=device)
    t2 = torch.tensor([20, 250], device=device)
    out: dict[str, float] = {"params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3)}
    net.eval()
    for name, bf16 in (("fp32", False), ("bf16", True)):
        def infer(bf16: bool = bf16) -> None:
            with torch.no_grad(), _autocast(device, bf16):
                net(x1, timesteps=t1)
        out[f"infer_ms_{name}"] = round(_median_seconds(infer, repeats, device, clock) * 1000, 2)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), 1e-5)
    for name, bf16 in (("fp32", False), ("bf16", True)):
        def train(bf16: bool = bf16) -> None:
            with _autocast(device, bf16):
                prediction = net(x2, timesteps=t2)
            loss = (prediction.float() - x2).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        out[f"train_steps_s_{name}"] = round(1.0 / _median_seconds(train, repeats, device, clock), 3)
    out["bf16_infer_ratio"] = round(out["infer_ms_bf16"] / out["infer_ms_fp32"], 3)
    out["bf16_train_ratio"] = round(out["train_steps_s_fp32"] / out["train_steps_s_bf16"], 3)
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = (net(x2, timesteps=t2) - x2).abs().mean()
    loss.backward()
    out["activations_mib"] = round(saved[0] / 2**20, 1)
    if device.type == "cuda":
        out["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def run(cases: dict[str, tuple[Sequence[int], Sequence[int]]], repeats: int, baseline: str,
        device: torch.device, clock: str = "wall") -> dict[str, Any]:
    """Measure every network on every case; ratios against ``baseline`` in the same case."""
    results: dict[str, Any] = {}
    for case, (latent, channels) in cases.items():
        rows: dict[str, Any] = {}
        for kind in NETWORKS:
            torch.manual_seed(0)
            try:
                rows[kind] = measure(build(kind, latent, channels), latent, repeats, device, clock)
            except (RuntimeError, ValueError) as err:  # a latent this network cannot take
                rows[kind] = {"error": str(err).splitlines()[0][:200]}
            logger.info("%s %s: %s", case, kind, rows[kind])
        base = rows.get(baseline, {})
        for kind, row in rows.items():
            if kind != baseline and "error" not in row and "error" not in base:
                row["infer_fp32_speedup_vs_" + baseline] = round(base["infer_ms_fp32"] / row["infer_ms_fp32"], 2)
                row["train_fp32_speedup_vs_" + baseline] = round(row["train_steps_s_fp32"] / base["train_steps_s_fp32"],
                                                                 2)
                row["activation_ratio_vs_" + baseline] = round(row["activations_mib"] / base["activations_mib"], 3)
        results[case] = {"latent": list(latent), "unet_channels": list(channels), "networks": rows}
    return results


def _table(results: dict[str, Any]) -> str:
    head = (f"{'case':7s} {'net':9s} {'latent':14s} {'params M':>8s} {'ms fp32':>8s} {'ms bf16':>8s} "
            f"{'train/s fp32':>12s} {'train/s bf16':>12s} {'bf16/fp32 train':>15s} {'act MiB':>8s}")
    lines = [head]
    for case, res in results.items():
        for kind, row in res["networks"].items():
            latent = "x".join(map(str, res["latent"]))
            if "error" in row:
                lines.append(f"{case:7s} {kind:9s} {latent:14s} n/a: {row['error'][:80]}")
                continue
            lines.append(f"{case:7s} {kind:9s} {latent:14s} {row['params_m']:8.2f} {row['infer_ms_fp32']:8.1f} "
                         f"{row['infer_ms_bf16']:8.1f} {row['train_steps_s_fp32']:12.2f} "
                         f"{row['train_steps_s_bf16']:12.2f} {row['bf16_train_ratio']:15.2f} "
                         f"{row['activations_mib']:8.1f}")
            speed = [f"{k}={v}" for k, v in row.items() if "_vs_" in k]
            if speed:
                lines.append(" " * 18 + "  ".join(speed))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", nargs="+", default=list(LATENTS), choices=list(LATENTS),
                        help="built-in latents to measure")
    parser.add_argument("--case", nargs=5, metavar=("NAME", "C", "H", "W", "D"),
                        help="measure this latent instead of the built-in ones")
    parser.add_argument("--channels", type=int, nargs="+", help="unet_channels for --case (default: paper width)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default="monai_3d", choices=list(NETWORKS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help="wall time, or CPU time of this process")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        latent = tuple(int(v) for v in args.case[1:])
        cases = {args.case[0]: (latent, args.channels or paper_channels(latent))}
    else:
        cases = {name: (LATENTS[name], paper_channels(LATENTS[name])) for name in args.latents}
    device = torch.device(args.device)
    results = {"bench": "unet", "device": str(device), "machine": machine_info(),
               "repeats": args.repeats, "baseline": args.baseline, "clock": args.clock,
               "cases": run(cases, args.repeats, args.baseline, device, args.clock)}
    print(_table(results["cases"]))
    if args.out:
        atomic_write_json(args.out, results)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
