# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Tiny test data and network settings shared by the tests."""

from __future__ import annotations

import ast
import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from monai.networks.nets import VQVAE, PatchDiscriminator

from meddiff.networks import Pseudo3DUNet, SliceDiscriminator

# Overrides that shrink the bundles to seconds on a CPU (volumes 16^3, latents 4^3).
TINY_OVERRIDES: dict[str, str] = {
    "pixdim": "[2.0,2.0,2.0]",
    "spatial_size": "[16,16,16]",
    "autoencoder_channels": "[8,16]",
    "autoencoder_res_layers": "1",
    "codebook_size": "32",
    "embedding_dim": "4",
    "discriminator_channels": "8",
    "discriminator_layers": "2",
    "unet_channels": "[8,16]",
    "unet_attention_levels": "[False,True]",
    "unet_res_blocks": "1",
    "unet_head_channels": "8",
    "num_workers": "0",
    "progress": "false",
    "log_interval": "1",
}


def cli_value(value: str) -> Any:
    """A command-line override string as the Python value ``python -m monai.bundle run`` (fire) parses it into."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(value.lower(), value)


#: :data:`TINY_OVERRIDES` as values, for a ``ConfigParser`` or an in-process run
TINY_VALUES: dict[str, Any] = {k: cli_value(v) for k, v in TINY_OVERRIDES.items()}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks."""
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def blob_volume(shape: tuple[int, int, int] = (20, 18, 14), seed: int = 0) -> np.ndarray:
    """A smooth positive 'anatomy': a few Gaussian blobs on a dim ellipsoid, float32."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (sum(g**2 for g in grids) < 0.8).astype(np.float32) * 200
    for _ in range(4):
        centre = rng.uniform(-0.5, 0.5, 3)
        width = rng.uniform(0.15, 0.35)
        body += 600 * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * width**2))
    return (body + rng.normal(0, 5, shape)).clip(0).astype(np.float32)


def tiny_autoencoder() -> VQVAE:
    return VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16], num_res_layers=1,
                 num_res_channels=[8, 16], downsample_parameters=[(2, 4, 1, 1)] * 2,
                 upsample_parameters=[(2, 4, 1, 1, 0)] * 2, num_embeddings=32, embedding_dim=4)


def tiny_discriminators() -> tuple[PatchDiscriminator, SliceDiscriminator]:
    return PatchDiscriminator(spatial_dims=3, channels=8, in_channels=1, num_layers_d=2), SliceDiscriminator(1, 8, 2)


def tiny_unet(channels: int = 4) -> Pseudo3DUNet:
    return Pseudo3DUNet(3, channels, channels, channels=[8, 16], attention_levels=[False, True], num_head_channels=8)


def unit_batch(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size, size) blob volumes scaled to [-1, 1]."""
    vols = [blob_volume((size,) * 3, seed=seed + i) for i in range(n)]
    x = torch.as_tensor(np.stack(vols))[:, None]
    return (x / x.amax() * 2 - 1).float()


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """Import the bench script ``bench/<name>.py`` (not a package) as the module ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The real ``torchrun`` (``python -m torch.distributed.run``) for ``nproc`` local ranks on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
