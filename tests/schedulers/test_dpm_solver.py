# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""DPM-Solver++(2M) and the sampling-scheduler factory on a Gaussian toy problem with an analytic denoiser.

Data ``x0 ~ N(mu, s^2)`` per element: ``x_t = alpha x0 + sigma eps`` is Gaussian, the posterior mean
``E[x0 | x_t]`` (the ideal data predictor) is linear in ``x_t``, and the probability-flow ODE keeps the
standardised value ``(x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)``, so the exact ODE solution from the
first timestep to clean data is known in closed form.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from meddiff.schedulers import (
    DDIMSampler,
    DPMSolverMultistepScheduler,
    RFlowSampler,
    check_sampling_method,
    inference_timesteps,
    make_sampling_scheduler,
    make_training_scheduler,
)

MU, SD, T = 0.7, 0.5, 300


def _outputs(scheduler, x: torch.Tensor, t: int, prediction_type: str) -> torch.Tensor:
    cumprod = scheduler.alphas_cumprod.double()[t]
    alpha, sigma = cumprod.sqrt(), (1 - cumprod).sqrt()
    x0 = MU + alpha * SD**2 / (alpha**2 * SD**2 + sigma**2) * (x - alpha * MU)
    eps = (x - alpha * x0) / sigma
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]


def _solve(scheduler, steps: int, prediction_type: str = "epsilon", timesteps: list[int] | None = None) -> float:
    """Max error against the exact ODE solution from the first timestep (``timesteps``: instead of the spacing's)."""
    scheduler.set_timesteps(steps)
    if timesteps is not None:
        scheduler.timesteps = torch.tensor(timesteps)
    x = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cumprod = scheduler.alphas_cumprod.double()[int(scheduler.timesteps[0])]
    exact = MU + SD * (x - cumprod.sqrt() * MU) / (cumprod * SD**2 + 1 - cumprod).sqrt()
    for t in scheduler.timesteps:
        x, _ = scheduler.step(_outputs(scheduler, x, int(t), prediction_type), t, x)
    return float((x - exact).abs().max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_converges_to_exact_solution(prediction_type):
    errors = [_solve(DPMSolverMultistepScheduler(T, "cosine", prediction_type), n, prediction_type)
              for n in (5, 10, 20, 50)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 5e-3
    first_order = [_solve(DPMSolverMultistepScheduler(T, "cosine", prediction_type, solver_order=1), n, prediction_type)
                   for n in (10, 20)]
    assert errors[1] < first_order[0] / 2 and errors[2] < first_order[1] / 10  # second order pays off


def test_first_order_is_monai_ddim():
    """solver_order=1 is DDIM (eta 0): same result as MONAI's DDIMScheduler on the same timesteps."""
    dpm = DPMSolverMultistepScheduler(T, "cosine", solver_order=1, timestep_spacing="leading")
    ddim = DDIMScheduler(T, "cosine", clip_sample=False)
    dpm.set_timesteps(10)
    ddim.set_timesteps(10)
    ddim.timesteps = dpm.timesteps.clone()  # MONAI steps by T // N: the "leading" spacing
    x = y = torch.randn(256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in dpm.timesteps:
        x, x0_a = dpm.step(_outputs(dpm, x, int(t), "epsilon"), t, x)
        y, x0_b = ddim.step(_outputs(ddim, y, int(t), "epsilon"), int(t), y)
        torch.testing.assert_close(x0_a, x0_b.double(), atol=1e-5, rtol=1e-5)  # MONAI: float32 coefficients
    torch.testing.assert_close(x, y.double(), atol=1e-5, rtol=1e-5)
    assert _solve(DDIMSampler(T, "cosine", timestep_spacing="trailing"), 10) == pytest.approx(
        _solve(DPMSolverMultistepScheduler(T, "cosine", solver_order=1), 10), rel=1e-6)


@pytest.mark.parametrize(("spacing", "expected"), [
    ("trailing", [299, 269, 239, 209, 179, 149, 119, 89, 59, 29]),
    ("leading", [270, 240, 210, 180, 150, 120, 90, 60, 30, 0]),
    ("linspace", [299, 269, 239, 209, 179, 150, 120, 90, 60, 30]),
])
def test_timesteps(spacing, expected):
    assert inference_timesteps(T, 10, spacing).tolist() == expected
    scheduler = DPMSolverMultistepScheduler(T, "cosine", timestep_spacing=spacing)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == expected and scheduler.num_inference_steps == 10
    assert inference_timesteps(T, 1).tolist() == [299] and len(inference_timesteps(T, T).unique()) == T


def test_linspace_leaves_out_t0():
    """linspace used to end on t = 0: a wasted network call and a badly conditioned last 2nd-order step.

    On the Gaussian case with a known answer, 10 DPM-Solver++ steps over the old timesteps (ending on 0) end
    with error 0.38; without t = 0 (the step after the last lands on clean data) 0.09, as trailing spacing does.
    """
    old = [299, 266, 233, 199, 166, 133, 100, 66, 33, 0]  # N points from T-1 down to 0, as before
    error_old = _solve(DPMSolverMultistepScheduler(T, "cosine", timestep_spacing="linspace"), 10, timesteps=old)
    error_new = _solve(DPMSolverMultistepScheduler(T, "cosine", timestep_spacing="linspace"), 10)
    error_trailing = _solve(DPMSolverMultistepScheduler(T, "cosine", timestep_spacing="trailing"), 10)
    assert error_new < error_old / 3, (error_old, error_new)
    assert error_new < 1.2 * error_trailing, (error_new, error_trailing)
    for n in (1, 2, 7, 10, 150, T - 1):
        steps = inference_timesteps(T, n, "linspace")
        assert len(steps) == n and steps[0] == T - 1 and int(steps.min()) > 0 and bool((steps.diff() < 0).all())
    assert inference_timesteps(T, T, "linspace").tolist() == list(range(T - 1, -1, -1))  # every timestep: 0 too
    ddim = DDIMSampler(T, "cosine", timestep_spacing="linspace")
    ddim.set_timesteps(10)
    assert int(ddim.timesteps.min()) == 30


def test_clipping_and_history_reset():
    scheduler = DPMSolverMultistepScheduler(20, "cosine", prediction_type="sample", clip_sample=True,
                                            clip_sample_min=-0.5, clip_sample_max=0.5)
    scheduler.set_timesteps(4)
    x = torch.randn(8)
    _, x0 = scheduler.step(torch.full((8,), 3.0), scheduler.timesteps[0], x)
    assert torch.all(x0 == 0.5)
    with pytest.raises(ValueError, match="position"):
        scheduler.step(torch.zeros(8), scheduler.timesteps[0], x)  # history not reset
    scheduler.set_timesteps(4)
    scheduler.step(torch.zeros(8), scheduler.timesteps[0], x)  # fine after set_timesteps


def test_bad_arguments():
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolverMultistepScheduler(T, "cosine", prediction_type="noise")
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepScheduler(T, "cosine", solver_order=3)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DPMSolverMultistepScheduler(T, "cosine", timestep_spacing="uniform")
    with pytest.raises(ValueError, match="clip_sample_min"):
        DPMSolverMultistepScheduler(T, "cosine", clip_sample_min=1.0, clip_sample_max=0.0)
    scheduler = DPMSolverMultistepScheduler(T, "cosine")
    for steps in (0, T + 1):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(steps)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of"):
        scheduler.step(torch.zeros(2), 17, torch.zeros(2))
    with pytest.raises(ValueError, match="ddim_eta"):
        make_sampling_scheduler("ddim", T, ddim_eta=-1.0)
    with pytest.raises(ValueError, match="sampling_method must be one of"):
        make_sampling_scheduler("euler", T)
    with pytest.raises(ValueError, match="objective must be one of"):
        make_training_scheduler("score", T)


def test_factory_kinds_and_objective_check():
    kinds = {m: type(make_sampling_scheduler(m, T, "cosine", "epsilon", clip_sample_values=[-2, 2])).__name__
             for m in ("ddpm", "ddim", "dpmpp_2m", "rflow")}
    assert kinds == {"ddpm": "DDPMScheduler", "ddim": "DDIMSampler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                     "rflow": "RFlowSampler"}
    assert make_sampling_scheduler("dpmpp_2m", T, clip_sample_values=[-2, 2]).clip_sample_values == [-2.0, 2.0]
    check_sampling_method("rflow", "rflow")
    for method in ("ddpm", "ddim", "dpmpp_2m"):
        check_sampling_method(method, "ddpm")
        with pytest.raises(ValueError, match="set sampling_method to one of \\['rflow'\\]"):
            check_sampling_method(method, "rflow")


def test_rflow_sampler_matches_monai_euler_and_recovers_a_point():
    """Without clipping the step is MONAI's Euler step; with the exact velocity of a point mass it lands on it."""
    ours, training = RFlowSampler(T), make_training_scheduler("rflow", T)
    ours.set_timesteps(6)
    training.set_timesteps(6)
    x = torch.randn(4, 2, 4, 4, 2, generator=torch.Generator().manual_seed(2))
    target = torch.full_like(x, 0.3)
    for i, t in enumerate(ours.timesteps):
        s = float(t) / T
        velocity = target - (x - (1 - s) * target) / s  # x0 - noise for data = target
        next_t = ours.timesteps[i + 1] if i + 1 < len(ours.timesteps) else 0
        expected, _ = training.step(velocity, t, x, next_t)
        x, _ = ours.step(velocity, t, x)
        torch.testing.assert_close(x, expected)
    torch.testing.assert_close(x, target)
    noisy = training.add_noise(target, torch.zeros_like(x), torch.full((4,), T / 2))
    torch.testing.assert_close(noisy, target / 2)  # x_t = (1 - t/T) x0 + (t/T) noise
