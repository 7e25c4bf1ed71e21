# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022) for the sampling loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["classifier_free_guidance", "resolve_class_labels"]


def classifier_free_guidance(
    network: Callable[..., torch.Tensor],
    x: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    null_label: int,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Guided prediction ``uncond + s * (cond - uncond)`` from one batched pass of the conditional and
    unconditional inputs (the batch is doubled; the network is called once).

    Works for every prediction (epsilon, x0, v, rectified-flow velocity): guidance is a linear
    combination of the two predictions. ``s = 1`` is the conditional prediction, ``s = 0`` the
    unconditional one.

    Args:
        network: the denoiser, called as ``network(x, timesteps=, class_labels=)``.
        x: noisy latents (N, C, h, w, d).
        timesteps: (N,) timesteps.
        class_labels: (N,) class indices of the conditional branch.
        null_label: index of the null (unconditional) class.
        guidance_scale: the guidance scale ``s``.
        guidance_rescale: ``phi`` in [0, 1] (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are
            Flawed", 2024, section 3.4): the guided prediction is rescaled to the conditional prediction's
            standard deviation per sample, and mixed ``phi * rescaled + (1 - phi) * guided``, which counters the
            over-saturation of large scales. 0 (default): plain guidance.

    Returns:
        The guided prediction, (N, C, h, w, d), in the network's output dtype.
    """
    n = x.shape[0]
    labels = class_labels.reshape(-1).to(device=x.device, dtype=torch.long)
    null = torch.full_like(labels, int(null_label))
    out = network(torch.cat([x, x]), timesteps=torch.cat([timesteps, timesteps]), class_labels=torch.cat([labels, null]))
    cond, uncond = out[:n], out[n:]
    guided = uncond + float(guidance_scale) * (cond - uncond)
    if guidance_rescale:
        dims = tuple(range(1, guided.ndim))
        rescaled = guided * (cond.float().std(dim=dims, keepdim=True) / guided.float().std(dim=dims, keepdim=True)
                             .clamp_min(1e-12)).to(guided.dtype)
        guided = float(guidance_rescale) * rescaled + (1.0 - float(guidance_rescale)) * guided
    return guided


def resolve_class_labels(
    class_label: str | int | Sequence[str | int] | None,
    info: Mapping[str, Any],
    num_samples: int,
    source: str = "latent_info_file",
) -> list[str | None]:
    """One class name per sample (``None``: unconditional) from the ``class_label`` key and the trained classes.

    A single name is used for every sample; a list is cycled (sample ``i`` gets ``class_label[i % len]``).

    Args:
        class_label: a class name, a list of names, or ``None`` (unconditional; with class-conditioned weights
            the null class is sampled).
        info: the latent info written by the diffusion trainer (``num_classes``, ``class_names``).
        num_samples: number of samples.
        source: where ``info`` came from, for messages.

    Returns:
        ``num_samples`` class names (or ``None`` each for unconditional sampling).

    Raises:
        ValueError: ``class_label`` given for unconditional weights, an empty list, or an unknown class
            (the message lists the known ones).
    """
    num_classes = int(info.get("num_classes", 0) or 0)
    if class_label is None:
        return [None] * num_samples
    if num_classes == 0:
        raise ValueError(f"class_label={class_label!r} but the diffusion weights are unconditional (num_classes=0 in "
                         f"{source}): remove class_label, or train with num_classes and labels.")
    names = [class_label] if isinstance(class_label, (str, int)) else list(class_label)
    if not names:
        raise ValueError("class_label is an empty list: give a class name, a list of names, or null.")
    known = [str(c) for c in info.get("class_names", [])]
    unknown = [str(n) for n in names if str(n) not in known]
    if unknown:
        raise ValueError(f"class_label {unknown} unknown: the weights know the classes {known} ({source}).")
    return [str(names[i % len(names)]) for i in range(num_samples)]
