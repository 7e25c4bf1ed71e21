# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Load trained weights into a network built from a config, including MONAI Generative checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_pretrained", "load_weights"]

logger = logging.getLogger(__name__)


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a plain state dict (``weights_only``), unwrapping ``state_dict`` and DDP ``module.`` prefixes.

    Raises:
        FileNotFoundError: ``path`` does not exist (names the stage to run).
        ValueError: the file is not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found: train the stage that writes it first.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: cannot be loaded as a weights file ({e}).") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(network: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load ``path`` into ``network`` and return it.

    Checkpoints trained with the retired ``monai-generative`` package (MONAI < 1.4 layer names) are
    converted by the network's own ``load_old_state_dict`` (MONAI provides it for
    ``DiffusionModelUNet``, ``AutoencoderKL``, ``ControlNet`` ...).

    Args:
        network: the network built from the config.
        path: weights file (plain state dict).
        map_location: device the tensors are loaded to.

    Raises:
        FileNotFoundError: missing file.
        ValueError: the weights do not fit the network, in either layout.
    """
    state = load_weights(path, map_location)
    try:
        network.load_state_dict(state)
        return network
    except RuntimeError as current_error:
        if not hasattr(network, "load_old_state_dict"):
            raise ValueError(f"{path}: weights do not fit {type(network).__name__}: {current_error}") from None
        try:
            network.load_old_state_dict(dict(state))
        except (KeyError, RuntimeError) as old_error:
            raise ValueError(
                f"{path}: weights fit {type(network).__name__} neither in the current layout ({current_error}) "
                f"nor in the MONAI Generative layout ({old_error!r})."
            ) from None
        logger.info("%s: converted MONAI Generative checkpoint with load_old_state_dict", path)
        return network
