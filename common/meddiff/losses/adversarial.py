# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Hinge GAN losses and discriminator feature matching for the VQ-GAN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hinge_d_loss", "hinge_g_loss", "feature_matching_loss"]


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: ``-mean(fake)``."""
    return -fake_logits.mean()


def feature_matching_loss(real_features: list[torch.Tensor], fake_features: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 distance between the discriminator's intermediate features of real and fake inputs.

    Args:
        real_features: features of real inputs (detached inside), logits excluded.
        fake_features: features of reconstructions, same layers.
    """
    if len(real_features) != len(fake_features) or not real_features:
        raise ValueError("real_features and fake_features must be non-empty lists of the same length.")
    losses = [F.l1_loss(f, r.detach()) for r, f in zip(real_features, fake_features)]
    return torch.stack(losses).mean()
