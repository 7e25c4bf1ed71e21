# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""DPM-Solver++(2M): a second-order multistep solver of the diffusion probability-flow ODE.

Written from the equations of Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (2022, arXiv:2211.01095), Algorithm 2 (multistep, data prediction):

* ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``,
  ``lambda_t = log(alpha_t / sigma_t)`` (half log-SNR), ``h_i = lambda_{t_i} - lambda_{t_{i-1}}``;
* first step: ``x_{t_1} = sigma_{t_1} / sigma_{t_0} * x_{t_0} - alpha_{t_1} (exp(-h_1) - 1) x0(t_0)``;
* later steps, with ``r_i = h_{i-1} / h_i`` and ``D_i = (1 + 1 / (2 r_i)) x0(t_{i-1}) - 1 / (2 r_i) x0(t_{i-2})``:
  ``x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} * x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D_i``.

The step after the last evaluated timestep lands on clean data (``sigma = 0``, ``alpha = 1``) where the
update reduces to the current data prediction. With ``solver_order=1`` every step is the first-order
update, which is exactly DDIM with ``eta = 0``.
"""

from __future__ import annotations

import math

import torch
from monai.networks.schedulers import Scheduler

__all__ = ["DPMSolverMultistepScheduler", "TIMESTEP_SPACINGS", "inference_timesteps"]

TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "trailing") -> torch.Tensor:
    """Decreasing integer timesteps at which a sampler evaluates the network.

    Args:
        num_train_timesteps: ``T``, the training steps (timesteps ``0 .. T-1``).
        num_inference_steps: ``N``, network evaluations.
        spacing: ``"trailing"``: ``round(T - i T / N) - 1`` (starts at ``T-1``, the pure-noise end;
            best for few steps); ``"leading"``: ``i * (T // N)`` reversed (MONAI's DDIM stride,
            starts below ``T-1``); ``"linspace"``: the first ``N`` of ``N + 1`` evenly spaced points from ``T-1``
            down to ``0`` (``0`` left out, unless ``N = T``: the step after the last timestep lands on clean data).

    Returns:
        (N,) int64 tensor, strictly decreasing.

    Raises:
        ValueError: ``N`` outside ``1..T`` or an unknown ``spacing``.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in 1..num_train_timesteps={num_train_timesteps}, got {num_inference_steps}."
        )
    if spacing == "trailing":
        steps = [round(num_train_timesteps - i * num_train_timesteps / num_inference_steps) - 1
                 for i in range(num_inference_steps)]
    elif spacing == "leading":
        stride = num_train_timesteps // num_inference_steps
        steps = [i * stride for i in range(num_inference_steps)][::-1]
    elif spacing == "linspace":
        # N + 1 evenly spaced points from T-1 down to 0 without the last: the step after the last listed
        # timestep lands on clean data, so a network call at t = 0 would be wasted (and make the last
        # second-order DPM-Solver++ step badly conditioned), as in diffusers' multistep solvers; N = T lists
        # every timestep, 0 included (no N distinct timesteps above 0 exist)
        steps = [round((num_train_timesteps - 1) * (1 - i / num_inference_steps)) for i in range(num_inference_steps)]
        if num_inference_steps == num_train_timesteps:
            steps = list(range(num_train_timesteps - 1, -1, -1))
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}.")
    return torch.tensor(steps, dtype=torch.long)


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++(2M) with MONAI's scheduler interface (``set_timesteps``, ``timesteps``, ``step``).

    Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022.
    The network may predict noise (``"epsilon"``), clean data (``"sample"``) or velocity
    (``"v_prediction"``); all are converted to the data prediction the solver steps with. The solver
    is deterministic (``generator`` is accepted for interface compatibility and ignored) and keeps the
    previous data prediction between calls to :meth:`step`, so a sampling loop must call
    :meth:`set_timesteps` first and then :meth:`step` once per entry of :attr:`timesteps`, in order.

    Args:
        num_train_timesteps: diffusion steps the network was trained with.
        schedule: member of MONAI's ``NoiseSchedules`` (e.g. ``"cosine"``, ``"linear_beta"``).
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        solver_order: 2 (DPM-Solver++(2M)) or 1 (first order, equal to DDIM with ``eta=0``).
        timestep_spacing: see :func:`inference_timesteps`.
        clip_sample: clamp every data prediction to ``[clip_sample_min, clip_sample_max]``.
        clip_sample_min: lower clamp bound.
        clip_sample_max: upper clamp bound.
        schedule_args: extra arguments of the noise schedule function.

    Raises:
        ValueError: unknown ``prediction_type``, ``solver_order`` or ``timestep_spacing``, or
            ``clip_sample_min >= clip_sample_max``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "epsilon",
        solver_order: int = 2,
        timestep_spacing: str = "trailing",
        clip_sample: bool = False,
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r}.")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}.")
        if clip_sample_min >= clip_sample_max:
            raise ValueError(f"clip_sample_min ({clip_sample_min}) must be below clip_sample_max ({clip_sample_max}).")
        self.prediction_type = prediction_type
        self.solver_order = solver_order
        self.timestep_spacing = timestep_spacing
        self.clip_sample = clip_sample
        self.clip_sample_values = [clip_sample_min, clip_sample_max]
        cumprod = self.alphas_cumprod.double()
        self._alpha = cumprod.sqrt()
        self._sigma = (1.0 - cumprod).clamp_min(0.0).sqrt()
        self._lambda = torch.log(self._alpha) - torch.log(self._sigma)
        self._previous_x0: torch.Tensor | None = None
        self._previous_lambda: float | None = None
        self._step_index = 0
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps and reset the multistep history.

        Args:
            num_inference_steps: network evaluations of the sampling loop.
            device: device of :attr:`timesteps`.

        Raises:
            ValueError: ``num_inference_steps`` outside ``1..num_train_timesteps``.
        """
        self.num_inference_steps = num_inference_steps
        self.timesteps = inference_timesteps(self.num_train_timesteps, num_inference_steps,
                                             self.timestep_spacing).to(device)
        self._previous_x0 = None
        self._previous_lambda = None
        self._step_index = 0

    def _coefficients(self, timestep: int) -> tuple[float, float, float]:
        """``alpha_t, sigma_t, lambda_t``; timestep ``-1`` is clean data (``sigma = 0``)."""
        if timestep < 0:
            return 1.0, 0.0, math.inf
        return float(self._alpha[timestep]), float(self._sigma[timestep]), float(self._lambda[timestep])

    def data_prediction(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """The network's estimate of clean data ``x0`` at ``timestep`` (clamped if ``clip_sample``).

        Args:
            model_output: network output at ``(sample, timestep)``, same shape as ``sample``.
            timestep: current timestep.
            sample: current noisy sample ``x_t``.

        Returns:
            ``x0`` estimate, same shape and dtype as ``sample``.
        """
        alpha, sigma, _ = self._coefficients(timestep)
        model_output = model_output.to(sample.dtype)
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif self.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = alpha * sample - sigma * model_output
        if self.clip_sample:
            x0 = x0.clamp(self.clip_sample_values[0], self.clip_sample_values[1])
        return x0

    def _next_timestep(self, timestep: int) -> int:
        position = (self.timesteps == timestep).nonzero()
        if len(position) == 0:
            raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps {self.timesteps.tolist()}: "
                             "call set_timesteps first and step through timesteps in order.")
        index = int(position[0, 0])
        if index != self._step_index:
            raise ValueError(f"step() got timestep {timestep} (position {index}) but the multistep solver is at "
                             f"position {self._step_index}: call set_timesteps before every sampling loop.")
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver step from ``timestep`` to the next timestep of :attr:`timesteps` (or to clean data).

        Args:
            model_output: network output at ``(sample, timestep)``, shape (N, C, ...).
            timestep: current timestep, an entry of :attr:`timesteps`.
            sample: current sample ``x_t``, shape (N, C, ...).
            generator: unused (the solver is deterministic).

        Returns:
            ``(prev_sample, pred_original_sample)``: the sample at the next timestep and the data prediction.

        Raises:
            ValueError: ``timestep`` is not the next entry of :attr:`timesteps`.
        """
        timestep = int(timestep)
        next_timestep = self._next_timestep(timestep)
        x0 = self.data_prediction(model_output, timestep, sample)
        _, sigma, lam = self._coefficients(timestep)
        alpha_next, sigma_next, lam_next = self._coefficients(next_timestep)
        if next_timestep < 0:
            # sigma -> 0: the update is the (first-order) data prediction itself.
            prev_sample = x0
        else:
            h = lam_next - lam
            expm1 = math.expm1(-h)  # exp(-h) - 1
            if self.solver_order == 2 and self._previous_x0 is not None:
                r = (lam - self._previous_lambda) / h
                direction = (1.0 + 0.5 / r) * x0 - (0.5 / r) * self._previous_x0
            else:
                direction = x0
            prev_sample = (sigma_next / sigma) * sample - (alpha_next * expm1) * direction
        self._previous_x0 = x0
        self._previous_lambda = lam
        self._step_index += 1
        return prev_sample, x0
