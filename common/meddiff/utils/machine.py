# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""What a measurement ran on, recorded beside benchmark results, and how it is timed."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CLOCKS", "machine_info", "timed"]

#: ``"wall"``: elapsed time; ``"cpu"``: this process's CPU time (robust on a shared, loaded CPU; with one torch
#: thread it equals the compute time of one core)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def machine_info() -> dict[str, Any]:
    """Platform, Python and torch versions, torch threads, CPU count and model, and the GPU if one is visible."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> tuple[Any, float]:
    """``fn()`` and its duration in seconds on ``clock`` (a key of :data:`CLOCKS`), CUDA synchronised around it."""
    read = CLOCKS[clock]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = read()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, read() - tic
