# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sampling schedulers picked by one name, and the training scheduler of each objective.

``sampling_method`` (a top-level config key) chooses the sampler:

* ``"ddpm"``: MONAI's ancestral ``DDPMScheduler`` over every training step (the paper's sampler);
* ``"ddim"``: DDIM (Song et al. 2021) with ``eta`` (0: deterministic);
* ``"dpmpp_2m"``: DPM-Solver++(2M) (:class:`~meddiff.schedulers.DPMSolverMultistepScheduler`);
* ``"rflow"``: Euler steps of a rectified flow (weights trained with ``objective="rflow"``).

The first three need weights trained with ``objective="ddpm"`` (any ``prediction_type``), the last
with ``objective="rflow"``; :func:`check_sampling_method` says which key to change otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler

from meddiff.schedulers.dpm_solver import TIMESTEP_SPACINGS, DPMSolverMultistepScheduler, inference_timesteps

__all__ = [
    "DDIMSampler",
    "OBJECTIVES",
    "RFlowSampler",
    "SAMPLING_METHODS",
    "check_sampling_method",
    "is_stochastic",
    "make_sampling_scheduler",
    "make_training_scheduler",
]

#: sampling method -> training objective its weights need
SAMPLING_METHODS = {"ddpm": "ddpm", "ddim": "ddpm", "dpmpp_2m": "ddpm", "rflow": "rflow"}
OBJECTIVES = ("ddpm", "rflow")


class DDIMSampler(DDIMScheduler):
    """MONAI's DDIM with ``eta`` as a constructor argument and a step that lands on the next listed timestep.

    MONAI's ``DDIMScheduler.step`` moves by ``num_train_timesteps // num_inference_steps``, which does
    not match the timesteps its ``set_timesteps`` lists when ``T`` is not a multiple of ``N``; here every
    step goes from one entry of :attr:`timesteps` to the next (and to clean data after the last).

    Args:
        num_train_timesteps: diffusion steps the network was trained with.
        schedule: member of MONAI's ``NoiseSchedules``.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        eta: noise weight (0: deterministic DDIM, 1: DDPM-like posterior variance).
        timestep_spacing: see :func:`~meddiff.schedulers.inference_timesteps`.
        clip_sample: clamp the ``x0`` estimate to ``[clip_sample_min, clip_sample_max]``.
        clip_sample_min: lower clamp bound.
        clip_sample_max: upper clamp bound.
        schedule_args: extra arguments of the noise schedule function.

    Raises:
        ValueError: ``eta < 0`` or an unknown ``timestep_spacing``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "epsilon",
        eta: float = 0.0,
        timestep_spacing: str = "trailing",
        clip_sample: bool = False,
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
        **schedule_args,
    ) -> None:
        if eta < 0:
            raise ValueError(f"ddim_eta must be >= 0, got {eta}.")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}.")
        self.timestep_spacing = timestep_spacing
        super().__init__(num_train_timesteps=num_train_timesteps, schedule=schedule, clip_sample=clip_sample,
                         prediction_type=prediction_type, clip_sample_min=clip_sample_min,
                         clip_sample_max=clip_sample_max, **schedule_args)
        self.eta = float(eta)

    @property
    def stochastic(self) -> bool:
        """Whether :meth:`step` draws noise (``eta > 0``)."""
        return self.eta > 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps with ``timestep_spacing``."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = inference_timesteps(self.num_train_timesteps, num_inference_steps,
                                             self.timestep_spacing).to(device)

    def _next(self, timestep: int) -> int:
        later = self.timesteps[self.timesteps < timestep]
        return int(later.max()) if len(later) else -1

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM update (Song et al. 2021, eq. 12) from ``timestep`` to the next listed timestep.

        Args:
            model_output: network output, shape (N, C, ...).
            timestep: current timestep.
            sample: current sample ``x_t``.
            eta: overrides the constructor's ``eta`` for this step.
            generator: random generator for the noise when ``eta > 0``.

        Returns:
            ``(prev_sample, pred_original_sample)``.
        """
        timestep = int(timestep)
        eta = self.eta if eta is None else float(eta)
        prev = self._next(timestep)
        a_t = self.alphas_cumprod[timestep].to(torch.float64)
        a_prev = self.alphas_cumprod[prev].to(torch.float64) if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        model_output = model_output.to(sample.dtype)
        sa, sb = float(a_t.sqrt()), float((1 - a_t).sqrt())
        if self.prediction_type == "epsilon":
            x0, eps = (sample - sb * model_output) / sa, model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sa * x0) / sb
        else:
            x0 = sa * sample - sb * model_output
            eps = sa * model_output + sb * sample
        if self.clip_sample:
            x0 = x0.clamp(self.clip_sample_values[0], self.clip_sample_values[1])
            eps = (sample - sa * x0) / sb
        variance = float((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        std = eta * variance**0.5
        prev_sample = float(a_prev.sqrt()) * x0 + max(float(1 - a_prev) - std**2, 0.0) ** 0.5 * eps
        if std > 0:
            noise = torch.randn(sample.shape, dtype=sample.dtype, generator=generator,
                                device=generator.device if generator is not None else sample.device)
            prev_sample = prev_sample + std * noise.to(sample.device)
        return prev_sample, x0


class RFlowSampler(RFlowScheduler):
    """MONAI's ``RFlowScheduler`` with the common ``step(model_output, timestep, sample)`` call and x0 clipping.

    The flow runs from noise at ``t = T`` to data at ``t = 0`` with ``x_t = (1 - t/T) x0 + (t/T) noise``
    and the network predicting the velocity ``x0 - noise`` (MONAI's convention). Without clipping a
    step is MONAI's Euler step; with ``clip_sample`` the data estimate ``x0 = x_t + (t/T) v`` is
    clamped and the step re-noises it to the next time with the implied noise.

    Args:
        num_train_timesteps: time scale ``T`` of training.
        clip_sample: clamp the x0 estimate to ``[clip_sample_min, clip_sample_max]``.
        clip_sample_min: lower clamp bound.
        clip_sample_max: upper clamp bound.
        kwargs: other ``RFlowScheduler`` arguments.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        clip_sample: bool = False,
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, **kwargs)
        self.clip_sample = clip_sample
        self.clip_sample_values = [clip_sample_min, clip_sample_max]

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        next_timestep: int | float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Euler step from ``timestep`` to ``next_timestep`` (default: the next listed one, 0 after the last).

        Args:
            model_output: predicted velocity, shape (N, C, ...).
            timestep: current time.
            sample: current sample ``x_t``.
            next_timestep: time to step to.
            generator: unused (deterministic).

        Returns:
            ``(prev_sample, pred_original_sample)``.
        """
        t = float(timestep)
        if next_timestep is None:
            later = self.timesteps[self.timesteps < t]
            next_timestep = float(later.max()) if len(later) else 0.0
        s, s_next = t / self.num_train_timesteps, float(next_timestep) / self.num_train_timesteps
        v = model_output.to(sample.dtype)
        x0 = sample + s * v
        if not self.clip_sample:
            return sample + (s - s_next) * v, x0
        x0 = x0.clamp(self.clip_sample_values[0], self.clip_sample_values[1])
        noise = (sample - (1 - s) * x0) / s
        return (1 - s_next) * x0 + s_next * noise, x0


def check_sampling_method(method: str, objective: str | None = None) -> None:
    """Raise unless ``method`` is a known sampler that can sample weights trained with ``objective``.

    Args:
        method: the ``sampling_method`` key.
        objective: the training ``objective`` recorded in the diffusion model's JSON (``None``: not checked).

    Raises:
        ValueError: unknown method or objective, or a mismatch, naming the keys to change.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"sampling_method must be one of {sorted(SAMPLING_METHODS)}, got {method!r}.")
    if objective is None:
        return
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if SAMPLING_METHODS[method] != objective:
        fits = sorted(m for m, o in SAMPLING_METHODS.items() if o == objective)
        raise ValueError(
            f"sampling_method={method!r} cannot sample weights trained with objective={objective!r} (recorded in the "
            f"diffusion model's JSON, latent_info_file): set sampling_method to one of {fits}."
        )


def make_sampling_scheduler(
    method: str,
    num_train_timesteps: int = 1000,
    schedule: str = "cosine",
    prediction_type: str = "epsilon",
    ddim_eta: float = 0.0,
    timestep_spacing: str = "trailing",
    clip_sample_values: Sequence[float] | None = None,
    **kwargs,
) -> Scheduler:
    """The scheduler of a sampling method, with MONAI's ``set_timesteps``/``timesteps``/``step`` interface.

    Args:
        method: ``"ddpm"``, ``"ddim"``, ``"dpmpp_2m"`` or ``"rflow"``.
        num_train_timesteps: diffusion steps of training.
        schedule: member of MONAI's ``NoiseSchedules`` (unused by ``rflow``).
        prediction_type: what the network predicts (``"epsilon"``, ``"sample"``, ``"v_prediction"``);
            ``rflow`` networks always predict velocity and ignore it.
        ddim_eta: DDIM noise weight (``ddim`` only).
        timestep_spacing: timestep spacing of ``ddim`` and ``dpmpp_2m`` (see ``inference_timesteps``).
        clip_sample_values: ``[min, max]`` to clamp the x0 estimate to at every step, or ``None``.
        kwargs: further constructor arguments of the scheduler (e.g. ``solver_order`` for ``dpmpp_2m``).

    Returns:
        The scheduler; call ``set_timesteps`` before sampling (``ddpm`` needs all ``num_train_timesteps``). Its
        ``noise_schedule`` attribute holds ``schedule`` (not for ``rflow``), which the sampler checks against the
        trained one.

    Raises:
        ValueError: unknown method or bad arguments.
    """
    check_sampling_method(method)
    clip = {} if clip_sample_values is None else {
        "clip_sample": True, "clip_sample_min": float(clip_sample_values[0]),
        "clip_sample_max": float(clip_sample_values[1])}
    if method == "rflow":
        return RFlowSampler(num_train_timesteps=num_train_timesteps, **clip, **kwargs)
    if method == "ddpm":
        scheduler: Scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule,
                                             prediction_type=prediction_type, clip_sample=bool(clip), **kwargs)
        if clip:
            scheduler.clip_sample_values = [clip["clip_sample_min"], clip["clip_sample_max"]]
    elif method == "ddim":
        scheduler = DDIMSampler(num_train_timesteps=num_train_timesteps, schedule=schedule,
                                prediction_type=prediction_type, eta=ddim_eta, timestep_spacing=timestep_spacing,
                                **clip, **kwargs)
    else:
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule,
                                                prediction_type=prediction_type, timestep_spacing=timestep_spacing,
                                                **clip, **kwargs)
    scheduler.noise_schedule = schedule
    return scheduler


def make_training_scheduler(
    objective: str = "ddpm",
    num_train_timesteps: int = 1000,
    schedule: str = "cosine",
    prediction_type: str = "epsilon",
    **kwargs,
) -> Scheduler:
    """The noise scheduler of a training objective (its ``add_noise`` makes the noisy inputs).

    Args:
        objective: ``"ddpm"`` (MONAI ``DDPMScheduler``) or ``"rflow"`` (MONAI ``RFlowScheduler`` with
            continuous uniform timesteps; the network learns the velocity ``x0 - noise``).
        num_train_timesteps: diffusion steps / time scale.
        schedule: noise schedule (``ddpm`` only).
        prediction_type: network target for ``ddpm`` (``rflow`` always predicts velocity).
        kwargs: further constructor arguments.

    Returns:
        The scheduler (``ddpm``: its ``noise_schedule`` attribute holds ``schedule``; the diffusion trainer
        records it in the latent info).

    Raises:
        ValueError: unknown objective.
    """
    if objective == "ddpm":
        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule,
                                  prediction_type=prediction_type, clip_sample=False, **kwargs)
        scheduler.noise_schedule = schedule
        return scheduler
    if objective == "rflow":
        kwargs.setdefault("use_discrete_timesteps", False)
        return RFlowScheduler(num_train_timesteps=num_train_timesteps, **kwargs)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")


def is_stochastic(scheduler: Scheduler) -> bool:
    """Whether a scheduler's ``step`` draws noise (so batched samples need per-sample generators)."""
    if isinstance(scheduler, DDIMSampler):
        return scheduler.stochastic
    return isinstance(scheduler, DDPMScheduler)
