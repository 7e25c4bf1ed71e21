# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Check the whole shape chain of the two stages before any training: image -> VQ-GAN latent -> denoiser levels.

Without it a ``spatial_size`` that the VQ-GAN accepts can fail only when stage 2 builds its first
batch, after stage 1 has trained for hours. Both stages call :func:`check_shape_chain` first (it is
the first argument their trainers resolve), so a bad combination fails in seconds with one error
that names every config key involved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

__all__ = ["check_sampling_size", "check_shape_chain", "nearest_multiples"]

logger = logging.getLogger(__name__)


def check_shape_chain(
    spatial_size: Sequence[int],
    autoencoder_channels: Sequence[int],
    embedding_dim: int,
    unet_channels: Sequence[int],
    unet_attention_levels: Sequence[bool],
    unet_head_channels: int,
    unet_norm_groups: int,
    denoiser_downsamples_depth: bool = False,
) -> list[int]:
    """Validate image size, autoencoder downsampling and denoiser levels together; return the latent shape.

    The VQ-GAN (MONAI ``VQVAE`` with one stride-2 downsampling per entry of ``autoencoder_channels``)
    divides every axis by ``2 ** len(autoencoder_channels)``. The denoiser halves the latent's in-plane
    size ``len(unet_channels) - 1`` times (and its depth too when ``denoiser_downsamples_depth``, as
    MONAI's full-3D ``DiffusionModelUNet`` does; the pseudo-3D UNet keeps the depth), every entry of
    ``unet_channels`` is split into ``unet_norm_groups`` GroupNorm groups, and attention levels (and the
    middle block) split their channels into heads of ``unet_head_channels``.

    Args:
        spatial_size: image size (H, W, D) after preprocessing (config key ``spatial_size``).
        autoencoder_channels: VQ-GAN channels per level (``autoencoder_channels``).
        embedding_dim: latent channels (``embedding_dim``).
        unet_channels: denoiser channels per level (``unet_channels``).
        unet_attention_levels: attention flag per denoiser level (``unet_attention_levels``).
        unet_head_channels: channels per attention head (``unet_head_channels``).
        unet_norm_groups: GroupNorm groups (``unet_norm_groups``).
        denoiser_downsamples_depth: the denoiser also halves the latent depth at each level.

    Returns:
        The latent shape ``[embedding_dim, h, w, d]``.

    Raises:
        ValueError: one error listing every problem found, each naming the config keys to change.
    """
    problems: list[str] = []
    size = [int(s) for s in spatial_size]
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"spatial_size must be three positive sizes (H, W, D), got {list(spatial_size)}.")
    n_ae = len(autoencoder_channels)
    factor = 2**n_ae
    bad_axes = [s for s in size if s % factor]
    if bad_axes:
        problems.append(
            f"spatial_size {size} is not divisible by {factor} ({n_ae} autoencoder downsamplings from "
            f"autoencoder_channels {list(autoencoder_channels)}): change spatial_size (e.g. "
            f"{[max(factor, round(s / factor) * factor) for s in size]}) or autoencoder_channels")
    latent = [s // factor for s in size]
    n_unet = len(unet_channels)
    unet_factor = 2 ** (n_unet - 1)
    axes = (("in-plane", latent[:2]),) + ((("depth", latent[2:]),) if denoiser_downsamples_depth else ())
    if not bad_axes:
        for name, dims in axes:
            if any(d % unet_factor for d in dims):
                problems.append(
                    f"the latent {name} size {dims} (spatial_size {size} / {factor} from {n_ae} autoencoder_channels "
                    f"levels) must be divisible by {unet_factor} for unet_channels of {n_unet} levels "
                    f"({n_unet - 1} denoiser downsamplings): change spatial_size, autoencoder_channels or use fewer "
                    f"unet_channels levels")
    if len(unet_attention_levels) != n_unet:
        problems.append(f"unet_attention_levels has {len(unet_attention_levels)} entries but unet_channels has "
                        f"{n_unet} levels: give one flag per level")
    not_grouped = [c for c in unet_channels if c % unet_norm_groups]
    if not_grouped:
        problems.append(f"unet_channels {list(unet_channels)}: {not_grouped} not divisible by unet_norm_groups "
                        f"{unet_norm_groups}")
    attended = [c for c, a in zip(unet_channels, unet_attention_levels) if a] + list(unet_channels[-1:])
    not_split = sorted({c for c in attended if c % unet_head_channels})
    if not_split:
        problems.append(f"unet_channels {not_split} at attention levels (unet_attention_levels, and the middle block "
                        f"at the last level) are not divisible by unet_head_channels {unet_head_channels}")
    if embedding_dim < 1:
        problems.append(f"embedding_dim must be >= 1, got {embedding_dim}")
    if problems:
        raise ValueError("the shape chain image -> VQ-GAN latent -> denoiser does not fit (checked before training "
                         "either stage): " + "; ".join(problems) + ".")
    shape = [int(embedding_dim), *latent]
    logger.info("shape chain: image %s -> latent %s -> denoiser levels %s", size, shape, list(unet_channels))
    return shape


def nearest_multiples(size: int, multiple: int) -> list[int]:
    """The sizes divisible by ``multiple`` nearest to ``size``: the one below (if >= ``multiple``) and the one above.

    Args:
        size: a requested size along one axis.
        multiple: what a valid size must be divisible by.

    Returns:
        ``[below, above]`` (just ``[above]`` when ``size < multiple``); ``[size]`` when it is valid.
    """
    if size % multiple == 0 and size >= multiple:
        return [size]
    below = size // multiple * multiple
    return ([below] if below >= multiple else []) + [below + multiple]


def check_sampling_size(
    spatial_size: Sequence[int],
    compression: int,
    denoiser_factors: Sequence[int],
    trained_latent_size: Sequence[int] | None = None,
) -> list[int]:
    """The latent spatial size to sample for an image size, or one error with the nearest valid sizes per axis.

    A latent diffusion model can be sampled at any image size the autoencoder's compression divides and whose
    latent the denoiser's downsampling chain accepts (see :func:`check_shape_chain`), not only at the training
    size: the networks are convolutional. Valid sizes along an axis are the multiples of
    ``compression * denoiser_factors[axis]``.

    Args:
        spatial_size: requested image size (H, W, D) (config key ``spatial_size``).
        compression: the autoencoder's downsampling factor per axis, ``2 ** len(autoencoder_channels)``.
        denoiser_factors: the denoiser's downsampling factor per latent axis: ``2 ** (len(unet_channels) - 1)``
            in-plane and 1 along depth for the pseudo-3D UNet, ``2 ** (len(unet_channels) - 1)`` on every axis
            for MONAI's ``DiffusionModelUNet``.
        trained_latent_size: the training latent size (h, w, d), only for the log message.

    Returns:
        The latent spatial size ``[h, w, d]``.

    Raises:
        ValueError: naming ``spatial_size`` (and ``autoencoder_channels``/``unet_channels``, which set the
            multiples) with the nearest valid sizes below and above on every axis that does not fit.
    """
    size = [int(s) for s in spatial_size]
    factors = [int(f) for f in denoiser_factors]
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"spatial_size must be three positive sizes (H, W, D), got {list(spatial_size)}.")
    if len(factors) != 3 or min(factors) < 1 or int(compression) < 1:
        raise ValueError(f"compression ({compression}) and denoiser_factors ({list(denoiser_factors)}) must be "
                         "positive, one denoiser factor per axis.")
    multiples = [int(compression) * f for f in factors]
    bad = [(axis, s, m) for axis, (s, m) in enumerate(zip(size, multiples)) if s % m]
    if bad:
        hints = "; ".join(f"axis {axis}: {s} -> nearest valid " + " or ".join(map(str, nearest_multiples(s, m)))
                          for axis, s, m in bad)
        raise ValueError(
            f"spatial_size {size} cannot be sampled: each axis must be a multiple of {multiples} (autoencoder "
            f"compression {compression} from autoencoder_channels x denoiser downsampling {factors} from "
            f"unet_channels); {hints}. Set spatial_size to valid sizes.")
    latent = [s // int(compression) for s in size]
    if trained_latent_size is not None and list(trained_latent_size) != latent:
        logger.warning("sampling at spatial_size %s (latent %s), not the training size (latents of size %s)",
                       size, latent, list(trained_latent_size))
    return latent
