# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Initialise a segmentation network from self-supervised pre-trained weights, and say what was loaded.

Pre-training uses the same network definition with another number of output channels (one for
restoration, an embedding for contrastive learning), so every tensor fits except those of the output
block. Those are left at their fresh initialisation, as when Models Genesis replaces its output layer;
every other tensor must match by name and shape, so a wrong file or architecture is an error rather than
a silently ignored initialisation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meddiff.networks.pretrained import load_weights
from meddiff.utils import atomic_write_json

__all__ = ["transfer_weights"]

logger = logging.getLogger(__name__)


def transfer_weights(
    network: nn.Module,
    path: str | os.PathLike | None,
    device: str | torch.device | None = None,
    min_loaded_fraction: float = 0.9,
    report_file: str | os.PathLike | None = None,
) -> nn.Module:
    """Load the pre-trained tensors of ``path`` that fit ``network`` (all but the output block) and return it.

    Args:
        network: the freshly built segmentation network.
        path: plain state-dict file written by the pre-training stage, or ``None`` to train from scratch
            (the network is returned unchanged).
        device: move the network there afterwards (``None``: leave it).
        min_loaded_fraction: the loaded tensors must hold at least this fraction of the network's
            parameters (elements), else the file is for another architecture.
        report_file: optional JSON file recording the source file and the loaded and skipped tensors.

    Returns:
        The network, initialised from ``path``.

    Raises:
        FileNotFoundError: ``path`` is given but does not exist.
        ValueError: the file is not a state dict, has tensors the network lacks, or fits too little of it.
    """
    report: dict[str, Any] = {"pretrained_weights": None, "loaded": [], "skipped_shape_mismatch": [],
                              "not_in_file": []}
    if path is None or str(path) == "":
        logger.info("no pre-trained weights: %s starts from its random initialisation", type(network).__name__)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pre-trained weights file {path} not found: run the pretrain workflow "
                                    "(configs/pretrain.json) first or fix --pretrained_weights")
        state = load_weights(path)
        own = network.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} tensors do not exist in {type(network).__name__} "
                             f"(e.g. {unknown[:3]}): the file was written for another architecture")
        fitting = {k: v for k, v in state.items() if tuple(v.shape) == tuple(own[k].shape)}
        report.update(
            pretrained_weights=str(path.resolve()),
            loaded=sorted(fitting),
            skipped_shape_mismatch=sorted(k for k in state if k not in fitting),
            not_in_file=sorted(set(own) - set(state)),
        )
        params = dict(network.named_parameters())
        total = sum(p.numel() for p in params.values())
        loaded = sum(params[k].numel() for k in fitting if k in params)
        if total and loaded / total < min_loaded_fraction:
            raise ValueError(f"{path}: only {loaded}/{total} parameters ({loaded / total:.1%}) fit "
                             f"{type(network).__name__}; expected all but the output block. Check the network "
                             "settings (channels, strides, res units) match those used for pre-training")
        network.load_state_dict(fitting, strict=False)
        report["loaded_parameter_fraction"] = loaded / total if total else 0.0
        logger.info("loaded %d/%d tensors (%.1f%% of the parameters) from %s; kept the fresh initialisation of %s",
                    len(fitting), len(own), 100 * report["loaded_parameter_fraction"], path,
                    ", ".join(report["skipped_shape_mismatch"] + report["not_in_file"]) or "nothing")
    if report_file is not None:
        atomic_write_json(report_file, report)
    return network.to(device) if device is not None else network
