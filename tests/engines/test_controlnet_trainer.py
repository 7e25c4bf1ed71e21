# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""ControlNetTrainer: argument checks that fail before any compute, each naming the problem."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import ControlNetDiffusionInferer, DiffusionInferer
from monai.networks.nets import VQVAE
from monai.networks.schedulers import DDPMScheduler
from torch.utils.data import DataLoader

from meddiff.engines import ControlNetTrainer, TrainerSettings, diffusion_prepare_batch
from meddiff.networks import Pseudo3DControlNet, Pseudo3DUNet, controlnet_from_denoiser

ARCH = {"channels": (8, 16), "attention_levels": (False, True), "num_head_channels": 8}


def _kwargs(tmp_path, **changes) -> dict:
    scheduler = DDPMScheduler(num_train_timesteps=10)
    unet = Pseudo3DUNet(3, 4, 4, **ARCH)
    autoencoder = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(8,), num_res_layers=1,
                        num_res_channels=(8,), downsample_parameters=((2, 4, 1, 1),),
                        upsample_parameters=((2, 4, 1, 1, 0),), num_embeddings=16, embedding_dim=4)
    controlnet = controlnet_from_denoiser(Pseudo3DControlNet(3, 4, conditioning_downsample=2, **ARCH), unet)
    kwargs = {"autoencoder": autoencoder, "diffusion_model": unet, "controlnet": controlnet,
              "optimizer": torch.optim.Adam(controlnet.parameters()), "inferer": ControlNetDiffusionInferer(scheduler),
              "prepare_batch": diffusion_prepare_batch("epsilon", 10, scheduler),
              "train_loader": DataLoader([{"image": torch.zeros(1, 8, 8, 4), "label": torch.zeros(1, 8, 8, 4)}]),
              "settings": TrainerSettings(ckpt_dir=tmp_path, progress=False), "num_label_classes": 2,
              "scale_factor": 1.0}
    return {**kwargs, **changes}


def test_trainer_checks(tmp_path):
    trainer = ControlNetTrainer(**_kwargs(tmp_path))
    assert trainer.denoiser is not trainer.controlnet
    assert not any(p.requires_grad for p in trainer.denoiser.parameters())
    assert all(p.requires_grad for p in trainer.controlnet.parameters())
    with pytest.raises(ValueError, match="num_label_classes must be >= 2"):
        ControlNetTrainer(**_kwargs(tmp_path, num_label_classes=1))
    with pytest.raises(ValueError, match="ControlNetDiffusionInferer"):
        ControlNetTrainer(**_kwargs(tmp_path, inferer=DiffusionInferer(DDPMScheduler(num_train_timesteps=10))))
    with pytest.raises(ValueError, match="unconditional denoisers only"):
        ControlNetTrainer(**_kwargs(tmp_path, diffusion_model=Pseudo3DUNet(3, 4, 4, num_class_embeds=3, **ARCH)))


def test_labels_outside_the_classes_are_an_error(tmp_path):
    loader = DataLoader([{"image": torch.zeros(1, 8, 8, 4), "label": torch.full((1, 8, 8, 4), 3.0)}])
    trainer = ControlNetTrainer(**_kwargs(tmp_path, train_loader=loader))
    with pytest.raises(ValueError, match=r"label values \[3\], outside 0..1"):
        trainer.setup()
