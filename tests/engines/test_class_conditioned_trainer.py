# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""DiffusionTrainer with class labels: every objective, both denoisers, recorded classes, checks."""

from __future__ import annotations

import json

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from torch.utils.data import DataLoader

from meddiff.engines import DiffusionTrainer, ResumableSampler, TrainerSettings, diffusion_prepare_batch
from meddiff.networks import Pseudo3DUNet
from meddiff.sampling import LatentDiffusionSampler
from meddiff.schedulers import make_sampling_scheduler, make_training_scheduler
from tests.helpers import tiny_autoencoder, unit_batch


def _denoiser(kind: str, num_class_embeds: int | None) -> torch.nn.Module:
    if kind == "monai":
        return DiffusionModelUNet(spatial_dims=3, in_channels=4, out_channels=4, channels=(8, 16),
                                  attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                                  norm_num_groups=4, num_class_embeds=num_class_embeds)
    return Pseudo3DUNet(3, 4, 4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
                        norm_num_groups=4, num_class_embeds=num_class_embeds)


def _trainer(tmp_path, kind="pseudo3d", objective="rflow", prediction_type="v_prediction", num_classes=2,
             num_class_embeds=3, max_steps=6, names=("b", "a", "b", "a")):
    torch.manual_seed(0)
    autoencoder = tiny_autoencoder()
    data = [{"image": v, "class_label": c} for v, c in zip(unit_batch(len(names)), names)]
    train = DataLoader(data, batch_size=2, sampler=ResumableSampler(data, seed=0))
    val = DataLoader(data[:2], batch_size=1)
    net = _denoiser(kind, num_class_embeds)
    scheduler = make_training_scheduler(objective, 50, "cosine", prediction_type)
    settings = TrainerSettings(max_steps=max_steps, ckpt_dir=tmp_path, val_interval=3, ckpt_interval=3,
                               log_interval=1, progress=False)
    return DiffusionTrainer(autoencoder, net, torch.optim.Adam(net.parameters(), 3e-3), DiffusionInferer(scheduler),
                            diffusion_prepare_batch(prediction_type, 50, scheduler, objective=objective), train,
                            settings, val, ema_start_step=1000, ema_update_every=1, num_classes=num_classes, cfg_dropout=0.3)


@pytest.mark.parametrize("kind,objective,prediction_type,method", [
    ("pseudo3d", "rflow", "v_prediction", "rflow"), ("monai", "ddpm", "epsilon", "ddim"),
    ("pseudo3d", "ddpm", "sample", "dpmpp_2m"), ("monai", "ddpm", "v_prediction", "ddpm"),
])
def test_trains_records_classes_and_samples_guided(tmp_path, kind, objective, prediction_type, method):
    trainer = _trainer(tmp_path, kind, objective, prediction_type)
    trainer.run()
    info = json.loads((tmp_path / "diffusion_model.json").read_text())
    assert info["num_classes"] == 2 and info["class_names"] == ["a", "b"] and info["cfg_dropout"] == 0.3
    net = trainer.ema.module.eval()
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([10])
    with torch.no_grad():  # the class embedding was trained: the classes and the null class differ
        outs = [net(x, timesteps=t, class_labels=torch.tensor([c])) for c in range(3)]
    assert min((outs[i] - outs[j]).abs().max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-6
    scheduler = make_sampling_scheduler(method, 50, "cosine", prediction_type)
    sampler = LatentDiffusionSampler(trainer.autoencoder, net, scheduler, latent_info=info, num_inference_steps=3,
                                     class_label=["a", "b"], num_samples=2, guidance_scale=2.0, progress=False)
    images = sampler.generate([0, 1])
    assert images.shape == (2, 1, 16, 16, 16) and torch.isfinite(images).all()


def test_class_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="num_class_embeds=3.*got None"):
        _trainer(tmp_path, num_class_embeds=None)
    with pytest.raises(ValueError, match="num_class_embeds=None.*got 3"):
        _trainer(tmp_path, num_classes=0)
    trainer = _trainer(tmp_path / "three", names=("a", "b", "c", "a"))
    with pytest.raises(ValueError, match=r"num_classes=2 but the training set has 3 classes \['a', 'b', 'c'\]"):
        trainer.run()


def test_cfg_dropout_uses_the_null_class(tmp_path):
    trainer = _trainer(tmp_path)
    seen = []
    model = trainer._conditioned(lambda **kw: seen.append(kw["class_labels"]), {"class_label": torch.zeros(4000,
                                                                                                        dtype=torch.long)},
                                 0.3)
    model()
    share = (seen[0] == 2).float().mean().item()
    assert 0.25 < share < 0.35 and set(seen[0].tolist()) == {0, 2}
