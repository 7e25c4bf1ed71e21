# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""ControlNetTrainer: argument checks that fail before any compute, each naming the problem; class + mask
conditioning on a class-conditioned denoiser."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader as MonaiDataLoader
from monai.data import MetaTensor
from monai.inferers import ControlNetDiffusionInferer, DiffusionInferer
from monai.networks.nets import VQVAE
from monai.networks.schedulers import DDPMScheduler
from torch.utils.data import DataLoader

from meddiff.data.errors import DataError
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
    with pytest.raises(ValueError, match="needs a diffusion_def with num_class_embeds=None, got 3"):
        ControlNetTrainer(**_kwargs(tmp_path, diffusion_model=Pseudo3DUNet(3, 4, 4, num_class_embeds=3, **ARCH)))
    with pytest.raises(ValueError, match="needs a controlnet_def with num_class_embeds=3, got None"):
        ControlNetTrainer(**_kwargs(tmp_path, diffusion_model=Pseudo3DUNet(3, 4, 4, num_class_embeds=3, **ARCH),
                                    num_classes=2, class_names=["a", "b"]))


def test_labels_outside_the_classes_are_an_error(tmp_path):
    loader = DataLoader([{"image": torch.zeros(1, 8, 8, 4), "label": torch.full((1, 8, 8, 4), 3.0)}])
    trainer = ControlNetTrainer(**_kwargs(tmp_path, train_loader=loader))
    with pytest.raises(DataError, match=r"label map of item 0: label values \[3\] are outside 0..1"):
        trainer.setup()
    # labels read from files (MONAI's collate keeps each item's file name) name the file
    files = [{"image": torch.zeros(1, 8, 8, 4), "label": MetaTensor(torch.full((1, 8, 8, 4), float(v)),
                                                                      meta={"filename_or_obj": f"case_{v}.nii.gz"})}
             for v in (1, 3)]
    trainer = ControlNetTrainer(**_kwargs(tmp_path / "files", train_loader=MonaiDataLoader(files, batch_size=2)))
    with pytest.raises(DataError, match=r"^case_3.nii.gz: label values \[3\] are outside 0..1"):
        trainer.setup()


def _class_kwargs(tmp_path, names=("b", "a", "b", "a"), **changes) -> dict:
    """A class-conditioned denoiser (classes ``a``, ``b`` + the null class) and its ControlNet, 4 labelled items."""
    torch.manual_seed(0)
    unet = Pseudo3DUNet(3, 4, 4, num_class_embeds=3, **ARCH)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)  # zero-initialised: give it a non-trivial output
    controlnet = controlnet_from_denoiser(
        Pseudo3DControlNet(3, 4, conditioning_downsample=2, num_class_embeds=3, **ARCH), unet)
    label = torch.zeros(1, 8, 8, 4)
    label[:, 2:6, 2:6, 1:3] = 1
    data = [{"image": torch.randn(1, 8, 8, 4), "label": label, "class_label": c} for c in names]
    settings = TrainerSettings(max_steps=3, ckpt_dir=tmp_path, val_interval=3, ckpt_interval=3, log_interval=1,
                               progress=False)
    return _kwargs(tmp_path, diffusion_model=unet, controlnet=controlnet, settings=settings,
                   optimizer=torch.optim.Adam(controlnet.parameters(), 1e-2), ema_start_step=1000, ema_update_every=1,
                   train_loader=DataLoader(data, batch_size=2), val_loader=DataLoader(data[:2]),
                   num_classes=2, class_names=["a", "b"], cfg_dropout=0.3, **changes)


def test_class_conditioned_controlnet_trains_with_the_classes(tmp_path):
    trainer = ControlNetTrainer(**_class_kwargs(tmp_path))
    trainer.run()
    log = [json.loads(line) for line in (tmp_path / "controlnet_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any("val_loss" in r for r in log)
    info = json.loads((tmp_path / "controlnet.json").read_text())
    assert info["num_classes"] == 2 and info["class_names"] == ["a", "b"] and info["num_label_classes"] == 2
    assert torch.load(tmp_path / "checkpoints" / "controlnet_step00000003.pt", weights_only=False)["extra"][
        "class_names"] == ["a", "b"]
    # the cached classes are the denoiser's indices ("a" = 0, "b" = 1), not the datalist's order
    assert [int(trainer.train_loader.dataset[i]["class_label"]) for i in range(4)] == [1, 0, 1, 0]
    controlnet = trainer.ema.module.eval()
    assert controlnet.controlnet_mid_block.weight.abs().max() > 0  # trained: the zero convs have left zero
    label = torch.zeros(1, 1, 8, 8, 4)
    label[:, :, 2:6, 2:6, 1:3] = 1
    cond = torch.cat([1 - label, label], dim=1)  # one-hot
    x, t = torch.randn(1, 4, 4, 4, 2), torch.tensor([5])
    with torch.no_grad():  # the classes reach the ControlNet: its residuals differ by class
        residuals = [controlnet(x, timesteps=t, controlnet_cond=cond, class_labels=torch.tensor([c]))[1]
                     for c in range(3)]
        batch = {"label": label}
        predictions = [trainer._predict(controlnet, {**batch, "class_label": torch.tensor([c])}, x, 0.0,
                                        noise=torch.ones_like(x), timesteps=t) for c in range(3)]
    assert min((residuals[i] - residuals[j]).abs().max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-6
    assert min((predictions[i] - predictions[j]).abs().max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-6
    # one draw of labels for both networks: with the ControlNet's residuals removed, the denoiser alone gives the
    # class-1 prediction, so the class went to the denoiser as well
    with torch.no_grad():
        noisy = trainer.inferer.scheduler.add_noise(x, torch.ones_like(x), t)
        down, mid = controlnet(noisy, timesteps=t, controlnet_cond=cond, class_labels=torch.tensor([1]))
        direct = trainer.denoiser(noisy, timesteps=t, class_labels=torch.tensor([1]),
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid)
    torch.testing.assert_close(predictions[1], direct, rtol=0, atol=1e-6)


def test_class_conditioned_controlnet_data_errors(tmp_path):
    with pytest.raises(ValueError, match=r"classes \['c'\] the denoiser does not know: its classes are \['a', 'b'\]"):
        ControlNetTrainer(**_class_kwargs(tmp_path, names=("a", "c"))).setup()
    kwargs = _class_kwargs(tmp_path)
    loader = DataLoader([{"image": torch.zeros(1, 8, 8, 4), "label": torch.zeros(1, 8, 8, 4)}])
    with pytest.raises(ValueError, match="is class-conditioned .* have no 'class_label'"):
        ControlNetTrainer(**{**kwargs, "train_loader": loader}).setup()
    with pytest.raises(ValueError, match="needs the denoiser's 2 class_names"):
        ControlNetTrainer(**{**kwargs, "class_names": None})
