# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Exponential moving average of a network's weights (the weights the paper samples with)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """EMA copy of ``model``: ``ema = decay * ema + (1 - decay) * weights``, buffers copied.

    Before ``start_step`` the copy simply follows the weights; afterwards it is updated every
    ``update_every`` steps (the paper: decay 0.995, every 10 steps, from step 2000).

    Args:
        model: the trained network (unwrapped from DDP).
        decay: EMA decay in [0, 1).
        update_every: update interval in optimisation steps.
        start_step: step before which the EMA copy equals the weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, update_every: int = 10, start_step: int = 2000) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}.")
        self.decay = decay
        self.update_every = update_every
        self.start_step = start_step
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Update after optimisation step ``step`` (1-based)."""
        if step % self.update_every:
            return
        if step < self.start_step:
            self.module.load_state_dict(model.state_dict())
            return
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
