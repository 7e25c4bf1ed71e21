# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import json
import math

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler
from torch.utils.data import DataLoader

from meddiff.engines import (
    EMA,
    DiffusionTrainer,
    ResumableSampler,
    TrainerSettings,
    VQGANTrainer,
    X0PredictionPrepareBatch,
    diffusion_prepare_batch,
)
from meddiff.engines.trainer import guard_cpu_bf16_convs
from meddiff.sampling import LatentDiffusionSampler
from meddiff.schedulers import make_sampling_scheduler, make_training_scheduler
from tests.helpers import tiny_autoencoder, tiny_discriminators, tiny_unet, unit_batch


def _loaders(x: torch.Tensor, batch_size: int = 2, seed: int = 0):
    data = [{"image": v} for v in x]
    train = DataLoader(data, batch_size=batch_size, sampler=ResumableSampler(data, seed=seed))
    return train, DataLoader(data[:1], batch_size=1)


def _vqgan(tmp_path, max_steps, adversarial_start_step=1000, resume=True, ckpt_interval=1000, lr=3e-3, seed=0, n=4,
           amp=False):
    torch.manual_seed(seed)
    train, val = _loaders(unit_batch(n))
    ae = tiny_autoencoder()
    d3, d2 = tiny_discriminators()
    settings = TrainerSettings(max_steps=max_steps, ckpt_dir=tmp_path, val_interval=ckpt_interval,
                               ckpt_interval=ckpt_interval, log_interval=1, progress=False, resume=resume, amp=amp)
    return VQGANTrainer(
        ae, torch.optim.Adam(ae.parameters(), lr), train, settings, val, discriminator_3d=d3, discriminator_2d=d2,
        optimizer_d=torch.optim.Adam(list(d3.parameters()) + list(d2.parameters()), lr),
        adversarial_start_step=adversarial_start_step,
    )


def _ddpm(tmp_path, max_steps, prediction_type="epsilon", resume=True, ckpt_interval=1000, seed=0, n=2,
          objective="ddpm", amp=False):
    torch.manual_seed(0)
    autoencoder = tiny_autoencoder()  # the frozen stage 1 is the same in every run
    torch.manual_seed(seed)
    train, val = _loaders(unit_batch(n), batch_size=n)
    unet = tiny_unet()
    scheduler = make_training_scheduler(objective, 300, "cosine", prediction_type)
    settings = TrainerSettings(max_steps=max_steps, ckpt_dir=tmp_path, val_interval=ckpt_interval,
                               ckpt_interval=ckpt_interval, log_interval=1, progress=False, resume=resume, amp=amp)
    return DiffusionTrainer(
        autoencoder, unet, torch.optim.Adam(unet.parameters(), 2e-3), DiffusionInferer(scheduler),
        diffusion_prepare_batch(prediction_type, 300, scheduler, objective=objective), train, settings, val,
        ema_decay=0.9, ema_update_every=1, ema_start_step=3,
    )


def _losses(trainer, key):
    return [r[key] for r in trainer.history if key in r]


def test_vqgan_overfits_one_batch(tmp_path):
    trainer = _vqgan(tmp_path, max_steps=70, adversarial_start_step=60, n=2)  # one fixed batch
    trainer.run()
    l1 = _losses(trainer, "l1")
    assert sum(l1[55:60]) / 5 < 0.5 * sum(l1[:5]) / 5
    # the adversarial phase ran: discriminator losses logged after the start step only, all finite
    d3, d2 = _losses(trainer, "d_3d"), _losses(trainer, "d_2d")
    assert len(d3) == 10 and len(d2) == 10
    assert all(map(math.isfinite, d3 + d2 + _losses(trainer, "feature_matching_3d")))
    assert (tmp_path / "autoencoder.pt").is_file() and (tmp_path / "autoencoder_best.pt").is_file()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_ddpm_overfits_one_batch(tmp_path, prediction_type):
    trainer = _ddpm(tmp_path, max_steps=120, prediction_type=prediction_type)
    trainer.run()
    loss = _losses(trainer, "loss")
    assert sum(loss[-20:]) / 20 < 0.7 * sum(loss[:20]) / 20
    info = json.loads((tmp_path / "diffusion_model.json").read_text())
    assert info["latent_shape"] == [4, 4, 4, 4] and info["prediction_type"] == prediction_type
    assert info["objective"] == "ddpm"
    assert info["scale_factor"] == pytest.approx(trainer.scale_factor)
    cached = torch.stack([item["image"] for item in trainer.train_loader.dataset])  # scaled training latents
    assert [info["latent_min"], info["latent_max"]] == pytest.approx([cached.min().item(), cached.max().item()])
    # EMA weights, not the raw weights, are exported
    exported = torch.load(tmp_path / "diffusion_model.pt", weights_only=True)
    raw = trainer.diffusion_model.state_dict()
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def _state(trainer):
    return {k: v.clone() for m in ("autoencoder", "diffusion_model") if hasattr(trainer, m)
            for k, v in getattr(trainer, m).state_dict().items()}


@pytest.mark.parametrize("stage", ["vqgan", "ddpm"])
def test_resume_is_exact(tmp_path, stage):
    make = _vqgan if stage == "vqgan" else _ddpm
    kwargs = {"adversarial_start_step": 2} if stage == "vqgan" else {"n": 3}  # 3 items, batch 3: epoch ends
    straight = make(tmp_path / "straight", max_steps=7, ckpt_interval=3, **kwargs)
    straight.run()
    first = make(tmp_path / "resumed", max_steps=5, ckpt_interval=3, **kwargs)
    first.run()  # checkpoints at 3 and 5
    (tmp_path / "resumed" / "checkpoints" / ("autoencoder_step00000005.pt" if stage == "vqgan"
                                             else "diffusion_model_step00000005.pt")).unlink()
    resumed = make(tmp_path / "resumed", max_steps=7, ckpt_interval=3, seed=123, **kwargs)
    resumed.run()
    assert resumed.history[0]["step"] == 4  # continued after the step-3 checkpoint
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"
    if stage == "ddpm":
        ema_a, ema_b = straight.ema.module.state_dict(), resumed.ema.module.state_dict()
        assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_keep_last_checkpoints(tmp_path):
    trainer = _ddpm(tmp_path, max_steps=8, ckpt_interval=2)
    trainer.settings.keep_last = 2
    trainer.keep_last = 2
    trainer.run()
    assert [p.name for p in trainer.checkpoints()] == ["diffusion_model_step00000006.pt",
                                                        "diffusion_model_step00000008.pt"]
    assert not list(tmp_path.rglob("*.tmp*"))


def test_resumable_sampler_partitions_and_restarts():
    data = list(range(10))
    ranks = [ResumableSampler(data, seed=3, num_replicas=3, rank=r) for r in range(3)]
    parts = [list(s) for s in ranks]
    assert {i for p in parts for i in p} == set(data)  # every item on some rank
    assert all(len(p) == 4 for p in parts)  # padded to equal length
    assert set(parts[0]).isdisjoint(parts[1]) or len(set(parts[0]) & set(parts[1])) <= 2
    s = ResumableSampler(data, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:]
    assert list(s) == full  # only the first pass after set_epoch(start=) is partial
    s.set_epoch(3)
    assert list(s) != full


def test_ema_follows_then_averages():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.5, update_every=1, start_step=2)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net, step=1)
    assert torch.equal(ema.module.weight, net.weight)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net, step=2)
    assert torch.allclose(ema.module.weight, torch.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)


def test_prepare_batch_targets():
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="sample")
    x0 = diffusion_prepare_batch("sample", 10, scheduler)
    assert isinstance(x0, X0PredictionPrepareBatch)
    images = torch.randn(2, 4, 4, 4, 4)
    inputs, target, _, kwargs = x0({"image": images})
    assert torch.equal(target, images) and kwargs["noise"].shape == images.shape
    with pytest.raises(ValueError, match="disagrees"):
        diffusion_prepare_batch("epsilon", 10, scheduler)
    with pytest.raises(ValueError, match="prediction_type must be"):
        diffusion_prepare_batch("x0", 10, torch.nn.Identity())  # no prediction_type to compare


def test_rflow_objective_trains_records_and_samples(tmp_path):
    trainer = _ddpm(tmp_path, max_steps=120, objective="rflow")
    trainer.run()
    loss = _losses(trainer, "loss")
    assert sum(loss[-20:]) / 20 < 0.7 * sum(loss[:20]) / 20
    info = json.loads((tmp_path / "diffusion_model.json").read_text())
    assert info["objective"] == "rflow" and info["prediction_type"] == "v_prediction"
    net = trainer.ema.module
    with pytest.raises(ValueError, match="sampling_method='dpmpp_2m'.*objective='rflow'"):
        LatentDiffusionSampler(trainer.autoencoder, net, make_sampling_scheduler("dpmpp_2m", 300),
                               latent_info=info, progress=False)
    sampler = LatentDiffusionSampler(trainer.autoencoder, net, make_sampling_scheduler("rflow", 300),
                                     latent_info=info, num_inference_steps=5, progress=False)
    images = sampler.generate([0])
    assert images.shape == (1, 1, 16, 16, 16) and torch.isfinite(images).all()


def test_rflow_prepare_batch_targets_velocity():
    scheduler = make_training_scheduler("rflow", 10)
    batch = diffusion_prepare_batch("epsilon", 10, scheduler, objective="rflow")
    images = torch.randn(3, 4, 4, 4, 4)
    _, target, _, kwargs = batch({"image": images})
    torch.testing.assert_close(target, images - kwargs["noise"])
    t = kwargs["timesteps"]
    assert t.dtype.is_floating_point and t.shape == (3,) and ((t >= 0) & (t < 10)).all()
    with pytest.raises(ValueError, match="RFlowScheduler"):
        diffusion_prepare_batch("epsilon", 10, DDPMScheduler(10), objective="rflow")
    with pytest.raises(ValueError, match="objective to 'rflow'"):
        diffusion_prepare_batch("epsilon", 10, scheduler)
    with pytest.raises(ValueError, match="objective must be"):
        diffusion_prepare_batch("epsilon", 10, scheduler, objective="flow")


def test_bf16_amp_trains_both_stages_on_cpu(tmp_path):
    """amp = bf16 autocast on CPU too; the VQ quantizer stays in float32 (codes from float32 distances)."""
    vqgan = _vqgan(tmp_path / "vq", max_steps=6, adversarial_start_step=3, n=2, amp=True)
    seen = []
    vqgan.autoencoder.quantizer.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    vqgan.run()
    assert vqgan.amp and seen and set(seen) == {torch.float32}
    assert all(math.isfinite(v) for v in _losses(vqgan, "loss_g"))
    ddpm = _ddpm(tmp_path / "dm", max_steps=120, amp=True)
    outputs = []
    ddpm.diffusion_model.register_forward_hook(lambda m, args, out: outputs.append(out.dtype))
    ddpm.run()
    assert torch.bfloat16 in outputs  # the denoiser really ran under bf16 autocast
    loss = _losses(ddpm, "loss")
    assert all(map(math.isfinite, loss))  # the 2x2 deepest level is narrower than its 3x3 kernels (guarded)
    assert sum(loss[-20:]) / 20 < 0.8 * sum(loss[:20]) / 20


@pytest.mark.parametrize("kernel, shape", [(3, (2, 2, 4)), (4, (3, 3, 3)), (4, (3, 8, 8))])
def test_bf16_conv_narrower_than_its_kernel_gets_float32_weight_gradients(kernel, shape):
    """The guarded layer's bf16 weight gradient matches float32's (oneDNN returns inf/NaN/garbage for these)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 8, kernel, padding=1)
    x = torch.randn(4, 16, *shape)

    def weight_grad(amp):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = conv(x)
        out.float().square().mean().backward()
        return conv.weight.grad.clone()

    reference = weight_grad(False)
    guard_cpu_bf16_convs(conv)
    guarded = weight_grad(True)
    assert torch.isfinite(guarded).all()
    assert (guarded - reference).norm() / reference.norm() < 0.02
