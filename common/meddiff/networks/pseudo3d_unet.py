# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Pseudo-3D diffusion UNet (in-plane convolutions, spatial + depth attention)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from meddiff.utils import as_bool

__all__ = ["Pseudo3DUNet"]


def _timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (N,) timesteps -> (N, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2 == 1:  # odd dim: pad one zero column
        emb = F.pad(emb, (0, 1))
    return emb


def _shape_str(shape: list[int]) -> str:
    """A shape written as Python writes a tuple, ``(1, 2, 3)`` or ``(4,)``, in eager mode and in TorchScript."""
    items = [str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _plane_conv(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv3d:
    """Conv3d with kernel (3, 3, 1): mixes H and W only, never slices."""
    return nn.Conv3d(in_ch, out_ch, kernel_size=(3, 3, 1), stride=(stride, stride, 1), padding=(1, 1, 0))


class _SliceGroupNorm(nn.GroupNorm):
    """GroupNorm on (N, C, H, W, D) with statistics computed separately for every slice (D index)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w, d = x.shape
        # statistics over (C/G, H, W) separately for every (sample, group, slice); fp32 for stability
        xg = x.float().reshape(n, self.num_groups, c // self.num_groups, h, w, d)
        var, mean = torch.var_mean(xg, dim=(2, 3, 4), keepdim=True, unbiased=False)
        xg = (xg - mean) * torch.rsqrt(var + self.eps)
        out = xg.reshape(n, c, h, w, d).to(x.dtype)
        return out * self.weight.view(1, c, 1, 1, 1).to(x.dtype) + self.bias.view(1, c, 1, 1, 1).to(x.dtype)


class _ResBlock(nn.Module):
    """Pre-activation ResNet block with in-plane convs and timestep scale/shift conditioning."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _SliceGroupNorm(groups, in_ch)
        self.conv1 = _plane_conv(in_ch, out_ch)
        self.temb_proj = nn.Linear(temb_dim, 2 * out_ch)
        self.norm2 = _SliceGroupNorm(groups, out_ch)
        self.conv2 = _plane_conv(out_ch, out_ch)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv3d(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.temb_proj(F.silu(temb)).to(h.dtype)[..., None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class _SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention on tokens (B, L, C) with residual; optional additive bias (heads, L, L)."""

    def __init__(self, channels: int, num_head_channels: int) -> None:
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, length, c = tokens.shape
        qkv = self.qkv(self.norm(tokens)).reshape(b, length, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_ch)
        mask = None if bias is None else bias.unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, length, c)
        return tokens + self.proj(out)


class _SpatialAttention(nn.Module):
    """Self-attention within each slice: tokens are the H*W positions, batched over N*D."""

    def __init__(self, channels: int, num_head_channels: int) -> None:
        super().__init__()
        self.attn = _SelfAttention(channels, num_head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w, d = x.shape
        tokens = x.permute(0, 4, 2, 3, 1).reshape(n * d, h * w, c)
        tokens = self.attn(tokens)
        return tokens.reshape(n, d, h, w, c).permute(0, 4, 2, 3, 1)


class _DepthAttention(nn.Module):
    """Self-attention along the slice axis: tokens are the D slices, batched over N*H*W.

    A learned per-head bias indexed by the relative distance j - i (clipped to +-max_distance)
    is added to the attention logits. With ``absolute_position`` a sinusoidal code of each slice's index,
    through a learned linear map that starts at zero, is added to the slice tokens first: without it
    nothing tells the network where along depth a slice lies.
    """

    def __init__(self, channels: int, num_head_channels: int, max_distance: int, absolute_position: bool = False) -> None:
        super().__init__()
        self.attn = _SelfAttention(channels, num_head_channels)
        self.max_distance = max_distance
        self.rel_bias = nn.Parameter(torch.zeros(2 * max_distance + 1, self.attn.num_heads))
        self.position_proj = nn.Linear(channels, channels) if absolute_position else None
        if self.position_proj is not None:
            nn.init.zeros_(self.position_proj.weight)
            nn.init.zeros_(self.position_proj.bias)
            self._register_load_state_dict_pre_hook(self._zero_missing_position_map)

    def _zero_missing_position_map(self, state_dict: dict, prefix: str, *args) -> None:
        """Weights trained without the absolute position load as they are: a zero map is the same network."""
        for name in ("weight", "bias"):
            key = f"{prefix}position_proj.{name}"
            if key not in state_dict and f"{prefix}rel_bias" in state_dict:
                state_dict[key] = torch.zeros_like(getattr(self.position_proj, name))

    def position_code(self, d: int, c: int, device: torch.device) -> torch.Tensor:
        """(D, C) sinusoidal code of the slice indices 0..D-1 (sin and cos halves; a zero column for odd C)."""
        half = c // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
        angles = torch.arange(d, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
        code = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        return F.pad(code, [0, c - 2 * half])

    def relative_bias(self, d: int, device: torch.device) -> torch.Tensor:
        """(heads, D, D) bias, entry [h, i, j] = table[clip(j - i)]."""
        pos = torch.arange(d, device=device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.rel_bias[rel].permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w, d = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(n * h * w, d, c)
        if self.position_proj is not None:
            tokens = tokens + self.position_proj(self.position_code(d, c, x.device)).to(tokens.dtype)
        tokens = self.attn(tokens, self.relative_bias(d, x.device))
        return tokens.reshape(n, h, w, d, c).permute(0, 4, 1, 2, 3)


class _Downsample(nn.Module):
    """Strided in-plane conv, stride (2, 2, 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _plane_conv(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    """Nearest in-plane upsampling x(2, 2, 1) followed by an in-plane conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _plane_conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(2.0, 2.0, 1.0), mode="nearest"))


class _Stage(nn.Module):
    """One ResBlock optionally followed by spatial attention and depth attention."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        groups: int,
        attention: bool,
        depth_attention: bool,
        num_head_channels: int,
        max_distance: int,
        depth_position: bool = False,
    ) -> None:
        super().__init__()
        self.res = _ResBlock(in_ch, out_ch, temb_dim, groups)
        self.spatial_attn = _SpatialAttention(out_ch, num_head_channels) if attention else None
        self.depth_attn = (
            _DepthAttention(out_ch, num_head_channels, max_distance, depth_position)
            if attention and depth_attention
            else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        if checkpointed and not torch.jit.is_scripting():
            return self._checkpointed(x, temb)
        x = self.res(x, temb)
        if self.spatial_attn is not None:
            x = self.spatial_attn(x)
        if self.depth_attn is not None:
            x = self.depth_attn(x)
        return x

    def _checkpointed(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The same blocks with activation checkpointing on each (training only, so not compiled by TorchScript)."""
        x = checkpoint(self.res, x, temb, use_reentrant=False)
        for block in (self.spatial_attn, self.depth_attn):
            if block is not None:
                x = checkpoint(block, x, use_reentrant=False)
        return x


class Pseudo3DUNet(nn.Module):
    """Pseudo-3D denoising UNet for unconditional 3D diffusion models.

    Reimplementation of the denoiser used in Khader et al., "Denoising diffusion probabilistic models for
    3D medical image generation", Scientific Reports 13, 7303 (2023). Following the paper, volumes are
    treated as stacks of 2D slices: all convolutions are in-plane (``Conv3d`` kernel ``(3, 3, 1)``) and
    down/upsampling acts on H and W only (stride ``(2, 2, 1)``), so the number of slices D is preserved
    through the network. Information is exchanged between slices only by the depth attention blocks.

    Design:
        - sinusoidal timestep embedding followed by an MLP (width ``4 * channels[0]``);
        - pre-activation ResNet blocks (GroupNorm, SiLU, in-plane conv) conditioned on the timestep
          embedding via a per-channel scale/shift after the second normalisation;
        - at levels flagged in ``attention_levels``: spatial self-attention within each slice
          (H*W tokens, batched over N*D), then depth self-attention along the slice axis (D tokens,
          batched over N*H*W) with a learned relative position bias (per head, indexed by the
          relative slice distance clipped to ``max_relative_distance``); both pre-norm (LayerNorm
          over channels) with residual connections, computed with ``scaled_dot_product_attention``;
        - encoder/decoder with skip connections after every block (as in MONAI's ``DiffusionModelUNet``),
          and a middle block ResNet -> attention pair -> ResNet;
        - zero-initialised output convolution, so the untrained network predicts 0.

    GroupNorm statistics are computed per slice, therefore with ``depth_attention=False`` the network is
    exactly a 2D slice-wise denoiser (no operation mixes slices).

    The forward signature matches MONAI's ``DiffusionInferer``/``LatentDiffusionInferer``; ``context`` must be
    ``None``. With ``num_class_embeds`` a learned class embedding is added to the timestep embedding (as in MONAI's
    ``DiffusionModelUNet``) and ``class_labels`` is required; without it (the default, the paper's unconditional
    network, whose state dict is unchanged) ``class_labels`` must be ``None``. With ``condition_on_spacing`` the
    output voxel spacing (``spacing``, mm) is embedded and added to the timestep embedding too (as in MAISI).

    Args:
        spatial_dims: number of spatial dimensions; must be 3.
        in_channels: number of input channels C of x, shape ``(N, C, H, W, D)``.
        out_channels: number of output channels of the prediction, shape ``(N, out_channels, H, W, D)``.
        channels: feature channels per resolution level; level ``i`` runs at ``H / 2**i, W / 2**i``.
            Every entry must be divisible by ``norm_num_groups``.
        num_res_blocks: ResNet blocks per encoder level, an int or one per level (the decoder uses one
            more per level, as in MONAI's ``DiffusionModelUNet``).
        attention_levels: one flag per level; flagged levels get the spatial + depth attention pair after
            every ResNet block. The middle block always has the attention pair.
        num_head_channels: channels per attention head; must divide ``channels`` at attention levels and
            ``channels[-1]`` (middle block).
        norm_num_groups: number of groups of every GroupNorm.
        depth_attention: whether the attention pairs include depth (inter-slice) attention. With
            ``False`` the network never mixes slices.
        max_relative_distance: relative slice distances are clipped to ``[-max, max]`` when indexing the
            learned relative position bias table (``2 * max + 1`` entries per head).
        depth_position: also give the depth attention each slice's absolute index (a sinusoidal code through
            a learned linear map that starts at zero). The paper's network has only the relative bias, so it
            cannot tell where along depth a slice lies and may place the anatomy at any depth, wrapped around
            the volume's ends.
        use_checkpointing: use activation checkpointing (``torch.utils.checkpoint``) on every ResNet and
            attention block during training, trading compute for memory.
        num_class_embeds: number of class embeddings (classes plus, for classifier-free guidance, the "null"
            class); ``None``: unconditional.
        condition_on_spacing: condition on the output voxel spacing, as MAISI's diffusion UNet does: the
            ``(N, 3)`` spacing in mm (per voxel axis H, W, D) is log-scaled (``log(mm)``: 1 mm -> 0, so half and
            double the spacing are equally far from 1 mm) and mapped by a small MLP (Linear, SiLU, Linear) into
            the timestep embedding, which it is added to. The MLP's last layer starts at zero, so the network
            starts as the unconditioned one. ``False`` (the default): no ``spacing`` input and the state dict of
            the unconditioned network, so older weights load unchanged.

    Raises:
        ValueError: for invalid argument combinations (the message names the argument).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
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
        condition_on_spacing: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"spatial_dims must be 3 for Pseudo3DUNet, got {spatial_dims}.")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}.")
        channels = tuple(int(c) for c in channels)
        if len(channels) == 0 or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}.")
        if norm_num_groups < 1 or any(c % norm_num_groups for c in channels):
            raise ValueError(f"channels {channels} must all be divisible by norm_num_groups={norm_num_groups}.")
        attention_levels = tuple(as_bool(a, "attention_levels") for a in attention_levels)
        if len(attention_levels) != len(channels):
            raise ValueError(
                f"attention_levels must have one entry per level of channels: "
                f"len(attention_levels)={len(attention_levels)} != len(channels)={len(channels)}."
            )
        if isinstance(num_res_blocks, int):
            num_res_blocks = (num_res_blocks,) * len(channels)
        num_res_blocks = tuple(int(n) for n in num_res_blocks)
        if len(num_res_blocks) != len(channels) or any(n < 1 for n in num_res_blocks):
            raise ValueError(
                f"num_res_blocks must be a positive int or one positive int per level of channels, got {num_res_blocks}."
            )
        if num_head_channels < 1:
            raise ValueError(f"num_head_channels must be >= 1, got {num_head_channels}.")
        attn_channels = [c for c, a in zip(channels, attention_levels) if a] + [channels[-1]]
        bad = [c for c in attn_channels if c % num_head_channels]
        if bad:
            raise ValueError(
                f"num_head_channels={num_head_channels} must divide the channels of every attention level "
                f"and of the middle block (channels[-1]); not divisible: {bad}."
            )
        if max_relative_distance < 1:
            raise ValueError(f"max_relative_distance must be >= 1, got {max_relative_distance}.")
        if num_class_embeds is not None and int(num_class_embeds) < 1:
            raise ValueError(f"num_class_embeds must be None (unconditional) or >= 1, got {num_class_embeds}.")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.num_res_blocks = num_res_blocks
        self.attention_levels = attention_levels
        self.depth_attention = depth_attention
        self.use_checkpointing = use_checkpointing
        self.downsample_factor = 2 ** (len(channels) - 1)

        temb_dim = 4 * channels[0]
        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.num_class_embeds = None if num_class_embeds is None else int(num_class_embeds)
        self.class_embedding = None if num_class_embeds is None else nn.Embedding(int(num_class_embeds), temb_dim)
        self.condition_on_spacing = as_bool(condition_on_spacing, "condition_on_spacing")
        self.spacing_embed = None
        if self.condition_on_spacing:  # log(mm) per axis -> MLP whose last layer starts at zero
            mlp = nn.Sequential(nn.Linear(3, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            self.spacing_embed = mlp

        def stage(cin: int, cout: int, attn: bool) -> _Stage:
            return _Stage(
                cin, cout, temb_dim, norm_num_groups, attn, depth_attention, num_head_channels, max_relative_distance,
                as_bool(depth_position, "depth_position"),
            )

        self.conv_in = _plane_conv(in_channels, channels[0])

        # encoder: record channels of every tensor pushed onto the skip stack
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_chs = [channels[0]]
        cur = channels[0]
        for level, (ch, nrb, attn) in enumerate(zip(channels, num_res_blocks, attention_levels)):
            blocks = nn.ModuleList()
            for _ in range(nrb):
                blocks.append(stage(cur, ch, attn))
                cur = ch
                skip_chs.append(cur)
            self.down_blocks.append(blocks)
            if level < len(channels) - 1:
                self.downsamplers.append(_Downsample(cur))
                skip_chs.append(cur)
            else:
                self.downsamplers.append(nn.Identity())

        # middle: res -> attention pair -> res
        self.mid_block1 = stage(cur, cur, True)
        self.mid_block2 = stage(cur, cur, False)

        # decoder: nrb + 1 blocks per level, each consuming one skip
        self.up_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(len(channels))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks[level] + 1):
                blocks.append(stage(cur + skip_chs.pop(), channels[level], attention_levels[level]))
                cur = channels[level]
            self.up_blocks.append(blocks)
            self.upsamplers.append(_Upsample(cur) if level > 0 else nn.Identity())

        self.norm_out = _SliceGroupNorm(norm_num_groups, cur)
        self.conv_out = _plane_conv(cur, out_channels)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        down_block_additional_residuals: list[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        spacing: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the diffusion target (e.g. noise) for a noisy volume.

        Args:
            x: noisy input of shape ``(N, in_channels, H, W, D)``; H and W divisible by
                ``2 ** (len(channels) - 1)``, any D >= 1.
            timesteps: diffusion timesteps of shape ``(N,)``, ``(1,)`` or scalar (broadcast over the batch).
            context: unsupported; must be None.
            class_labels: class indices of shape ``(N,)`` (long) with ``num_class_embeds``; else must be None.
            down_block_additional_residuals: a ControlNet's residuals (``meddiff.networks.Pseudo3DControlNet``),
                one per skip connection, each added to its skip before the decoder (as in MONAI's
                ``DiffusionModelUNet``); ``None``: none.
            mid_block_additional_residual: a ControlNet's residual added to the middle block's output.
            spacing: voxel spacing in mm per axis (H, W, D), shape ``(N, 3)``, ``(1, 3)`` or ``(3,)`` (broadcast
                over the batch), all > 0, with ``condition_on_spacing``; else must be None.

        Returns:
            Tensor of shape ``(N, out_channels, H, W, D)``.
        """
        if context is not None:
            raise ValueError("Pseudo3DUNet is unconditional: context must be None.")
        if class_labels is not None and self.class_embedding is None:
            raise ValueError("Pseudo3DUNet is unconditional (num_class_embeds=None): class_labels must be None.")
        if class_labels is None and self.class_embedding is not None:
            raise ValueError("Pseudo3DUNet is class-conditioned (num_class_embeds set): class_labels is required.")
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (N, {self.in_channels}, H, W, D), got {_shape_str(x.shape)}.")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"H and W of x must be divisible by {f} (2 ** (len(channels) - 1)), got shape {_shape_str(x.shape)}."
            )
        n = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(n)
        if timesteps.shape[0] != n:
            raise ValueError(f"timesteps must have shape (N,) = ({n},) or (1,), got {_shape_str(timesteps.shape)}.")

        temb = self.time_embed(_timestep_embedding(timesteps, self.channels[0]).to(x.dtype))
        if self.class_embedding is not None and class_labels is not None:
            class_labels = class_labels.reshape(-1).to(device=x.device, dtype=torch.long)
            if class_labels.shape[0] != n:
                raise ValueError(f"class_labels must have shape (N,) = ({n},), got {_shape_str(class_labels.shape)}.")
            temb = temb + self.class_embedding(class_labels).to(temb.dtype)
        if (spacing is None) != (self.spacing_embed is None):
            raise ValueError("spacing must be given exactly when the network has condition_on_spacing=True.")
        spacing_embed = self.spacing_embed
        if spacing is not None and spacing_embed is not None:
            spacing = spacing.to(device=x.device, dtype=torch.float32).reshape(-1, 3)
            if spacing.shape[0] == 1:
                spacing = spacing.expand(n, 3)
            if spacing.shape[0] != n:
                raise ValueError(f"spacing must have shape (N, 3) = ({n}, 3) or (1, 3), got {_shape_str(spacing.shape)}.")
            if bool((spacing <= 0).any()):
                raise ValueError("spacing must be > 0 mm on every axis.")
            temb = temb + spacing_embed(spacing.log().to(temb.dtype)).to(temb.dtype)

        ckpt = self.use_checkpointing and self.training and torch.is_grad_enabled()
        h, skips = self._encode(self.conv_in(x), temb, ckpt)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals must have one tensor per skip connection "
                                 f"({len(skips)}), got {len(down_block_additional_residuals)}.")
            steered: list[torch.Tensor] = []
            for i in range(len(skips)):  # an index loop: TorchScript compiles it
                steered.append(skips[i] + down_block_additional_residuals[i].to(skips[i].dtype))
            skips = steered

        h = self.mid_block1(h, temb, ckpt)
        h = self.mid_block2(h, temb, ckpt)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.to(h.dtype)

        for blocks, up in zip(self.up_blocks, self.upsamplers):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb, ckpt)
            h = up(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    def _encode(self, h: torch.Tensor, temb: torch.Tensor, ckpt: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path from ``conv_in``'s output ``h`` (``Pseudo3DControlNet`` runs it on its copy of it).

        Args:
            h: ``conv_in``'s output ``(N, channels[0], h, w, d)``.
            temb: timestep (+ class, spacing) embedding ``(N, 4 * channels[0])``.
            ckpt: use activation checkpointing.

        Returns:
            The deepest features and every skip connection (``h`` first), in order.
        """
        skips = [h]
        for blocks, down in zip(self.down_blocks, self.downsamplers):
            for block in blocks:
                h = block(h, temb, ckpt)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        return h, skips
