# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""2D patch discriminator applied to randomly drawn slices of a 3D volume (the paper's image discriminator)."""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

__all__ = ["SliceDiscriminator"]


class SliceDiscriminator(nn.Module):
    """MONAI's 2D ``PatchDiscriminator`` judging one slice per volume along the slice (last) axis.

    Real and reconstructed volumes must be judged on the same slices, so the caller draws the
    indices once with :meth:`draw_slices` and passes them to both calls.

    Args:
        in_channels: image channels.
        channels: channels of the first discriminator layer (doubled per layer).
        num_layers_d: number of strided layers.
        norm: normalisation of the discriminator layers.
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, num_layers_d: int = 3, norm: str = "BATCH") -> None:
        super().__init__()
        self.discriminator = PatchDiscriminator(
            spatial_dims=2, channels=channels, in_channels=in_channels, num_layers_d=num_layers_d, norm=norm
        )

    @staticmethod
    def draw_slices(volumes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random slice index per volume of ``volumes`` (N, C, H, W, D)."""
        return torch.randint(0, volumes.shape[-1], (volumes.shape[0],), generator=generator).to(volumes.device)

    def forward(self, volumes: torch.Tensor, slice_indices: torch.Tensor) -> list[torch.Tensor]:
        """Judge slice ``slice_indices[i]`` of volume ``i``.

        Args:
            volumes: (N, C, H, W, D).
            slice_indices: (N,) integer indices into D.

        Returns:
            The patch discriminator's intermediate features, logits last.
        """
        if volumes.ndim != 5:
            raise ValueError(f"volumes must be (N, C, H, W, D), got shape {tuple(volumes.shape)}.")
        slices = volumes[torch.arange(volumes.shape[0], device=volumes.device), ..., slice_indices]
        return self.discriminator(slices)
