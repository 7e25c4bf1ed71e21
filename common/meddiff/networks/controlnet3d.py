# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""ControlNet for the pseudo-3D denoiser: a trainable copy of its encoder steered by a label map."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.utils import copy_model_state
from torch import nn

from .pseudo3d_unet import Pseudo3DUNet, _shape_str, _timestep_embedding

__all__ = ["ENCODER_PARTS", "Pseudo3DControlNet", "controlnet_from_denoiser"]

#: the Pseudo3DUNet sub-modules a Pseudo3DControlNet copies (state dict prefixes)
ENCODER_PARTS = ("time_embed", "class_embedding", "conv_in", "down_blocks", "downsamplers", "mid_block1", "mid_block2")


def _zero_conv(channels: int) -> nn.Conv3d:
    """1x1x1 convolution with zero weights and bias: outputs 0 until trained."""
    conv = nn.Conv3d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _ConditioningEncoder(nn.Module):
    """Full-3D conv stack from the one-hot label map at image resolution down to the latent grid.

    ``conv_in`` (3x3x3), then one stride-2 3x3x3 conv per factor 2 of ``downsample`` (width doubled each time,
    at most 256), then a zero-initialised 3x3x3 conv to ``out_channels`` (so the encoder outputs 0 at init).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int, downsample: int) -> None:
        super().__init__()
        levels = int(round(math.log2(downsample)))
        widths = [min(channels * 2**i, 256) for i in range(levels + 1)]
        self.conv_in = nn.Conv3d(in_channels, widths[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Conv3d(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1) for i in range(levels)
        )
        self.conv_out = nn.Conv3d(widths[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class Pseudo3DControlNet(nn.Module):
    """ControlNet for :class:`~meddiff.networks.Pseudo3DUNet`, conditioned on a one-hot label map.

    Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion Models", ICCV 2023, as MONAI's
    ``ControlNet`` does it for ``DiffusionModelUNet``: a trainable copy of the denoiser's encoder (timestep and
    class embeddings, input conv, down blocks, middle block; built from the same arguments, so its weights load
    from the trained denoiser, see :meth:`from_unet` and :meth:`copy_denoiser_weights`), a small full-3D
    conditioning encoder that takes the label map at image resolution down to the latent grid (its output is
    added after the input conv), and one zero-initialised 1x1x1 conv per skip connection and on the middle
    block's output. The outputs are the residuals the denoiser takes as ``down_block_additional_residuals`` /
    ``mid_block_additional_residual``; at initialisation they are all zero, so the conditioned denoiser
    reproduces the unconditioned one exactly.

    Args:
        spatial_dims: number of spatial dimensions; must be 3.
        in_channels: latent channels C of x, shape ``(N, C, h, w, d)``.
        channels: as :class:`~meddiff.networks.Pseudo3DUNet` (the denoiser's value).
        num_res_blocks: as the denoiser.
        attention_levels: as the denoiser.
        num_head_channels: as the denoiser.
        norm_num_groups: as the denoiser.
        depth_attention: as the denoiser.
        max_relative_distance: as the denoiser.
        use_checkpointing: as the denoiser.
        depth_position: as the denoiser.
        num_class_embeds: as the denoiser.
        conditioning_in_channels: channels of the conditioning map (number of label classes, background
            included, of the one-hot label map).
        conditioning_channels: width of the conditioning encoder's first conv (doubled at every downsampling).
        conditioning_downsample: image-to-latent downsampling factor per axis (the autoencoder's compression,
            a power of 2): the conditioning map has shape ``(N, conditioning_in_channels, h*f, w*f, d*f)``.

    Raises:
        ValueError: bad arguments (the message names them).
    """

    _encode = Pseudo3DUNet._encode  # the denoiser's down path, run on this copy of its encoder

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512),
        num_res_blocks: int | Sequence[int] = 1,
        attention_levels: Sequence[bool] = (False, False, True, True),
        num_head_channels: int = 32,
        norm_num_groups: int = 8,
        depth_attention: bool = True,
        max_relative_distance: int = 32,
        use_checkpointing: bool = False,
        depth_position: bool = False,
        num_class_embeds: int | None = None,
        conditioning_in_channels: int = 2,
        conditioning_channels: int = 16,
        conditioning_downsample: int = 4,
    ) -> None:
        super().__init__()
        template = Pseudo3DUNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=in_channels, channels=channels,
            num_res_blocks=num_res_blocks, attention_levels=attention_levels, num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups, depth_attention=depth_attention,
            max_relative_distance=max_relative_distance, use_checkpointing=use_checkpointing,
            depth_position=depth_position, num_class_embeds=num_class_embeds,
        )
        self._attach(template, conditioning_in_channels, conditioning_channels, conditioning_downsample)

    @classmethod
    def from_unet(
        cls,
        unet: Pseudo3DUNet,
        conditioning_in_channels: int = 2,
        conditioning_channels: int = 16,
        conditioning_downsample: int = 4,
    ) -> Pseudo3DControlNet:
        """A ControlNet whose encoder is a copy (architecture and weights) of a trained denoiser's.

        Args:
            unet: the trained denoiser (not modified).
            conditioning_in_channels: see the class.
            conditioning_channels: see the class.
            conditioning_downsample: see the class.

        Returns:
            The ControlNet (on the denoiser's device, zero residuals).
        """
        if not isinstance(unet, Pseudo3DUNet):
            raise ValueError(f"unet must be a Pseudo3DUNet, got {type(unet).__name__}.")
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._attach(copy.deepcopy(unet), conditioning_in_channels, conditioning_channels, conditioning_downsample)
        return net.to(next(unet.parameters()).device)

    def _attach(self, unet: Pseudo3DUNet, conditioning_in_channels: int, conditioning_channels: int,
                conditioning_downsample: int) -> None:
        """Take the encoder modules of ``unet`` and add the conditioning encoder and the zero convs."""
        if int(conditioning_in_channels) < 1:
            raise ValueError(f"conditioning_in_channels must be >= 1, got {conditioning_in_channels}.")
        if int(conditioning_channels) < 1:
            raise ValueError(f"conditioning_channels must be >= 1, got {conditioning_channels}.")
        f = int(conditioning_downsample)
        if f < 1 or f & (f - 1):
            raise ValueError(f"conditioning_downsample must be a power of 2 (the autoencoder's compression), got "
                             f"{conditioning_downsample}.")
        self.in_channels = unet.in_channels
        self.channels = unet.channels
        self.use_checkpointing = unet.use_checkpointing
        self.downsample_factor = unet.downsample_factor
        self.num_class_embeds = unet.num_class_embeds
        self.conditioning_in_channels = int(conditioning_in_channels)
        self.conditioning_downsample = f
        for part in ENCODER_PARTS:
            setattr(self, part, getattr(unet, part))
        skip_chs = [unet.channels[0]]
        for blocks, down in zip(unet.down_blocks, unet.downsamplers):
            skip_chs += [block.res.conv2.out_channels for block in blocks]
            if not isinstance(down, nn.Identity):
                skip_chs.append(skip_chs[-1])
        self.controlnet_cond_embedding = _ConditioningEncoder(
            self.conditioning_in_channels, unet.channels[0], int(conditioning_channels), f)
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(c) for c in skip_chs)
        self.controlnet_mid_block = _zero_conv(unet.channels[-1])

    @torch.no_grad()
    def copy_denoiser_weights(self, unet: Pseudo3DUNet) -> Pseudo3DControlNet:
        """Load the trained denoiser's encoder weights into this ControlNet's copy of the encoder.

        Args:
            unet: the trained denoiser, built with the same arguments.

        Returns:
            ``self``.

        Raises:
            ValueError: the denoiser's encoder does not have this ControlNet's architecture.
        """
        own = self.state_dict()
        wanted = {k for k in own if k.split(".")[0] in ENCODER_PARTS}
        theirs = {k: v for k, v in unet.state_dict().items() if k in wanted}
        bad = sorted(k for k, v in theirs.items() if v.shape != own[k].shape)
        if wanted - set(theirs) or bad:
            raise ValueError(f"the denoiser's encoder does not fit the ControlNet (missing "
                             f"{sorted(wanted - set(theirs))[:5]}, other shapes {bad[:5]}): build controlnet_def "
                             "with the denoiser's channels, attention_levels, num_res_blocks and heads.")
        self.load_state_dict(theirs, strict=False)
        return self

    def embed_condition(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        """The conditioning encoder's output on the latent grid (the same at every step: samplers compute it once).

        Args:
            controlnet_cond: one-hot label map ``(N, conditioning_in_channels, h*f, w*f, d*f)``.

        Returns:
            Tensor ``(N, channels[0], h, w, d)``.
        """
        if controlnet_cond.ndim != 5 or controlnet_cond.shape[1] != self.conditioning_in_channels:
            raise ValueError(f"controlnet_cond must have shape (N, {self.conditioning_in_channels}, H, W, D) (one "
                             f"channel per label class), got {_shape_str(controlnet_cond.shape)}.")
        return self.controlnet_cond_embedding(controlnet_cond)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        controlnet_cond: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        condition_embedding: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the denoiser's skip connections and middle block (MONAI ``ControlNet``'s signature).

        Args:
            x: noisy latent ``(N, in_channels, h, w, d)``.
            timesteps: ``(N,)``, ``(1,)`` or scalar.
            controlnet_cond: one-hot label map ``(N, conditioning_in_channels, h*f, w*f, d*f)``, ``f`` =
                ``conditioning_downsample``; not needed with ``condition_embedding``.
            conditioning_scale: multiplies every residual (samplers pass 1 and scale the residuals themselves).
            context: unsupported; must be None.
            class_labels: ``(N,)`` class indices with ``num_class_embeds``; else None.
            condition_embedding: :meth:`embed_condition`'s output, reused across sampling steps.

        Returns:
            ``(down_block_res_samples, mid_block_res_sample)``: one tensor per skip connection of the denoiser,
            and one ``(N, channels[-1], h / 2**(L-1), w / 2**(L-1), d)``.
        """
        if context is not None:
            raise ValueError("Pseudo3DControlNet takes no context: it must be None.")
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError("class_labels must be given exactly when num_class_embeds is set.")
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (N, {self.in_channels}, h, w, d), got {_shape_str(x.shape)}.")
        if condition_embedding is None:
            if controlnet_cond is None:
                raise ValueError("give controlnet_cond (the one-hot label map) or condition_embedding.")
            expected = [s * self.conditioning_downsample for s in x.shape[2:]]
            if list(controlnet_cond.shape[2:]) != expected:
                raise ValueError(f"controlnet_cond must be at image resolution {_shape_str(expected)} (the latent "
                                 f"{_shape_str(x.shape[2:])} times conditioning_downsample="
                                 f"{self.conditioning_downsample}), got {_shape_str(controlnet_cond.shape)}.")
            condition_embedding = self.embed_condition(controlnet_cond)
        n = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(n)
        temb = self.time_embed(_timestep_embedding(timesteps, self.channels[0]).to(x.dtype))
        if self.class_embedding is not None and class_labels is not None:
            temb = temb + self.class_embedding(class_labels.reshape(-1).to(x.device, torch.long)).to(temb.dtype)

        ckpt = self.use_checkpointing and self.training and torch.is_grad_enabled()
        h = self.conv_in(x)
        h = h + condition_embedding.to(h.dtype)  # the dtype the denoiser's stream has (bf16 under autocast)
        h, skips = self._encode(h, temb, ckpt)
        h = self.mid_block1(h, temb, ckpt)
        h = self.mid_block2(h, temb, ckpt)
        down_res = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid_res = self.controlnet_mid_block(h)
        if conditioning_scale != 1.0:
            down_res, mid_res = [r * conditioning_scale for r in down_res], mid_res * conditioning_scale
        return down_res, mid_res


def controlnet_from_denoiser(controlnet: nn.Module, denoiser: nn.Module) -> nn.Module:
    """Copy a trained denoiser's encoder weights into a freshly built ControlNet (the bundle's ``controlnet``).

    Works for :class:`Pseudo3DControlNet` + :class:`~meddiff.networks.Pseudo3DUNet` and for MONAI's
    ``ControlNet`` + ``DiffusionModelUNet`` (every key of the same name and shape is copied, as MONAI's
    tutorials do). The zero convs and the conditioning encoder's last conv stay zero, so the result leaves the
    denoiser's output unchanged.

    Args:
        controlnet: the new ControlNet, built with the denoiser's architecture arguments.
        denoiser: the trained denoiser.

    Returns:
        ``controlnet`` (modified in place).

    Raises:
        ValueError: the two do not fit (e.g. a Pseudo3DControlNet for a MONAI UNet).
    """
    if isinstance(controlnet, Pseudo3DControlNet):
        if not isinstance(denoiser, Pseudo3DUNet):
            raise ValueError(f"a Pseudo3DControlNet needs a Pseudo3DUNet denoiser (diffusion_def), got "
                             f"{type(denoiser).__name__}: use monai_controlnet_def with monai_unet_def.")
        return controlnet.copy_denoiser_weights(denoiser)
    if isinstance(denoiser, Pseudo3DUNet):
        raise ValueError(f"the denoiser is a Pseudo3DUNet but the ControlNet is a {type(controlnet).__name__}: use "
                         "pseudo3d_controlnet_def.")
    _, copied, _ = copy_model_state(controlnet, denoiser.state_dict(), inplace=True)
    if not copied:
        raise ValueError(f"no weights of {type(denoiser).__name__} fit {type(controlnet).__name__}: build the "
                         "ControlNet with the denoiser's architecture arguments.")
    return controlnet
