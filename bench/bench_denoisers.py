# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Training-step time and peak memory of the paper's pseudo-3D UNet against MONAI's full-3D DiffusionModelUNet.

Both run in this process on the same latent batch with matched channels and attention levels;
the output is each network's median step time and the ratio pseudo-3D / full-3D.

    python bench/bench_denoisers.py --latent 16 16 16 --channels 32 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.networks.nets import DiffusionModelUNet

from meddiff.networks import Pseudo3DUNet


def _step_time(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    device = x.device
    t = torch.randint(0, 300, (x.shape[0],), device=device)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        loss = (net(x=x, timesteps=t) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, nargs=3, default=[16, 16, 16], help="latent H W D")
    parser.add_argument("--latent_channels", type=int, default=8)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    levels = [False] + [True] * (len(args.channels) - 1)
    common = dict(spatial_dims=3, in_channels=args.latent_channels, out_channels=args.latent_channels,
                  channels=args.channels, attention_levels=levels, num_head_channels=16, norm_num_groups=8)
    nets = {"pseudo3d": Pseudo3DUNet(num_res_blocks=1, **common),
            "monai_3d": DiffusionModelUNet(num_res_blocks=1, **common)}
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.latent_channels, *args.latent, device=device)
    results = {}
    for name, net in nets.items():
        params = sum(p.numel() for p in net.parameters()) / 1e6
        seconds, peak = _step_time(net.to(device), x, args.repeats)
        results[name] = seconds
        print(f"{name:9s} {params:6.2f} M params  {seconds * 1000:8.1f} ms/step  peak {peak:8.1f} MiB  ({device})")
    print(f"ratio pseudo3d / monai_3d step time: {results['pseudo3d'] / results['monai_3d']:.2f}")


if __name__ == "__main__":
    main()
