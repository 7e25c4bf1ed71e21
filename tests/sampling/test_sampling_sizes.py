# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sampling at sizes other than the training one, and refusing a scheduler the weights were not trained with."""

from __future__ import annotations

import json

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from torch.utils.data import DataLoader

from meddiff.engines import (
    DiffusionTrainer,
    ResumableSampler,
    TrainerSettings,
    check_sampling_size,
    diffusion_prepare_batch,
    nearest_multiples,
)
from meddiff.sampling import LatentDiffusionSampler
from meddiff.schedulers import DDIMSampler, make_sampling_scheduler, make_training_scheduler
from tests.helpers import tiny_autoencoder, tiny_unet, unit_batch

INFO = {"scale_factor": 1.0, "latent_shape": [4, 4, 4, 4], "latent_min": -3.0, "latent_max": 3.0,
        "objective": "ddpm", "prediction_type": "epsilon"}


def test_nearest_multiples_and_check_sampling_size():
    assert nearest_multiples(100, 32) == [96, 128] and nearest_multiples(64, 32) == [64]
    assert nearest_multiples(8, 32) == [32] and nearest_multiples(0, 4) == [4]
    assert check_sampling_size([96, 128, 20], 4, [8, 8, 1]) == [24, 32, 5]
    with pytest.raises(ValueError, match=r"spatial_size \[100, 96, 66\].*multiple of \[32, 32, 4\].*autoencoder_"
                                         r"channels.*unet_channels.*axis 0: 100 -> nearest valid 96 or 128; axis 2: "
                                         r"66 -> nearest valid 64 or 68\.") as err:
        check_sampling_size([100, 96, 66], 4, [8, 8, 1])
    assert "axis 1" not in str(err.value)
    with pytest.raises(ValueError, match="three positive sizes"):
        check_sampling_size([64, 64], 4, [8, 8, 1])


def test_sampler_latent_shape_follows_spatial_size():
    """Latent channels from latent_info, spatial size from spatial_size; default: the training latent shape."""
    ae, unet = tiny_autoencoder(), tiny_unet()  # 4x compression, pseudo-3D UNet halving H, W once
    scheduler = make_sampling_scheduler("ddim", 300, "cosine")
    assert LatentDiffusionSampler(ae, unet, scheduler, latent_info=INFO, progress=False).latent_shape == [4, 4, 4, 4]
    sampler = LatentDiffusionSampler(ae, unet, scheduler, latent_info=INFO, spatial_size=[24, 16, 12],
                                     num_inference_steps=2, progress=False)
    assert sampler.latent_shape == [4, 6, 4, 3] and sampler.trained_latent_shape == [4, 4, 4, 4]
    images = sampler.generate([0])
    assert images.shape == (1, 1, 24, 16, 12) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match=r"axis 0: 20 -> nearest valid 16 or 24"):  # in-plane: 4 x 2
        LatentDiffusionSampler(ae, unet, scheduler, latent_info=INFO, spatial_size=[20, 16, 12])
    # MONAI's full-3D UNet also halves the depth: the depth multiple grows with it
    monai_unet = DiffusionModelUNet(3, 4, 4, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                                    norm_num_groups=4)
    with pytest.raises(ValueError, match=r"multiple of \[8, 8, 8\].*axis 2: 12 -> nearest valid 8 or 16"):
        LatentDiffusionSampler(ae, monai_unet, scheduler, latent_info=INFO, spatial_size=[16, 16, 12])
    assert LatentDiffusionSampler(ae, monai_unet, scheduler, latent_info=INFO, spatial_size=[16, 24, 16],
                                  compression=4).latent_shape == [4, 4, 6, 4]


def _train(tmp_path, objective: str, schedule: str = "linear_beta", steps: int = 50) -> dict:
    """Two steps of the real diffusion trainer; returns the latent info it writes."""
    torch.manual_seed(0)
    data = [{"image": v} for v in unit_batch(2)]
    loader = DataLoader(data, batch_size=2, sampler=ResumableSampler(data, seed=0))
    scheduler = make_training_scheduler(objective, steps, schedule, "epsilon")
    unet = tiny_unet()
    settings = TrainerSettings(max_steps=2, ckpt_dir=tmp_path, val_interval=1000, ckpt_interval=1000,
                               log_interval=1, progress=False)
    DiffusionTrainer(tiny_autoencoder(), unet, torch.optim.Adam(unet.parameters(), 1e-3), DiffusionInferer(scheduler),
                     diffusion_prepare_batch("epsilon", steps, scheduler, objective=objective), loader, settings).run()
    return json.loads((tmp_path / "diffusion_model.json").read_text())


def test_sampler_refuses_other_num_train_timesteps_or_noise_schedule(tmp_path):
    info = _train(tmp_path / "ddpm", "ddpm")
    assert info["num_train_timesteps"] == 50 and info["noise_schedule"] == "linear_beta"
    ae, unet = tiny_autoencoder(), tiny_unet()
    for method in ("ddpm", "ddim", "dpmpp_2m"):
        with pytest.raises(ValueError, match=r"num_train_timesteps=1000 but the weights were trained with "
                                             r"num_train_timesteps=50 .*set num_train_timesteps to 50"):
            LatentDiffusionSampler(ae, unet, make_sampling_scheduler(method, 1000, "linear_beta"), latent_info=info)
        with pytest.raises(ValueError, match=r"noise_schedule='cosine' but the weights were trained with "
                                             r"noise_schedule='linear_beta' .*set noise_schedule to 'linear_beta'"):
            LatentDiffusionSampler(ae, unet, make_sampling_scheduler(method, 50, "cosine"), latent_info=info)
        LatentDiffusionSampler(ae, unet, make_sampling_scheduler(method, 50, "linear_beta"), latent_info=info)
    with pytest.raises(ValueError, match="noise schedule is not the one.*noise_schedule='linear_beta'"):
        LatentDiffusionSampler(ae, unet, DDIMSampler(50, "cosine"), latent_info=info)  # built by hand
    LatentDiffusionSampler(ae, unet, DDIMSampler(50, "linear_beta"), latent_info=info)
    # rectified flow: the time scale must match, it has no noise schedule
    info = _train(tmp_path / "rflow", "rflow")
    assert info["num_train_timesteps"] == 50 and info["noise_schedule"] is None
    with pytest.raises(ValueError, match="num_train_timesteps=300 but .* trained with num_train_timesteps=50"):
        LatentDiffusionSampler(ae, unet, make_sampling_scheduler("rflow", 300), latent_info=info)
    LatentDiffusionSampler(ae, unet, make_sampling_scheduler("rflow", 50), latent_info=info)


def test_old_latent_info_without_the_fields_skips_the_check():
    sampler = LatentDiffusionSampler(tiny_autoencoder(), tiny_unet(), make_sampling_scheduler("ddim", 1000, "cosine"),
                                     latent_info=INFO, num_inference_steps=2, progress=False)
    assert sampler.generate([0]).shape == (1, 1, 16, 16, 16)
