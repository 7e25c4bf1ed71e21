# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Perceptual loss on a 3D ResNet whose weights come only from a local file (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import resnet10
from torch import nn

__all__ = ["LocalPerceptualLoss"]


class LocalPerceptualLoss(nn.Module):
    """LPIPS-style distance between unit-normalised ResNet-10 features of input and target.

    MONAI's ``PerceptualLoss`` fetches its networks from torch.hub; this one takes a local state
    dict of MONAI's ``resnet10(spatial_dims=3, n_input_channels=1)`` (e.g. MedicalNet's 23-dataset
    weights converted to that layout), so training never touches the network.

    Args:
        weights_path: local ``.pt`` file with the ResNet-10 state dict (optionally under ``state_dict``).
        layers: ResNet stages whose features are compared.

    Raises:
        FileNotFoundError: ``weights_path`` does not exist.
        ValueError: the file's keys do not match the network.
    """

    def __init__(self, weights_path: str | Path, layers: tuple[str, ...] = ("layer1", "layer2", "layer3")) -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights {path} not found (they are never downloaded; give a local file).")
        self.net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="A")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        result = self.net.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(f"{path}: not a resnet10 state dict, missing {result.missing_keys[:5]}...")
        self.net.eval().requires_grad_(False)
        self.layers = layers

    def train(self, mode: bool = True) -> LocalPerceptualLoss:
        super().train(mode)
        self.net.eval()  # keep batch-norm statistics fixed
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net.maxpool(net.act(net.bn1(net.conv1(x))))
        feats = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, name)(x)
            if name in self.layers:
                feats.append(x)
        return feats

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the squared distance of channel-normalised features, (N, 1, H, W, D) inputs."""
        loss = input.new_zeros(())
        for fi, ft in zip(self._features(input), self._features(target)):
            loss = loss + (F.normalize(fi, dim=1) - F.normalize(ft, dim=1)).pow(2).sum(1).mean()
        return loss / len(self.layers)
