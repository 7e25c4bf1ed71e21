# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Spacing conditioning (``condition_on_spacing``): network, per-item resampling, trainer, sampler, refusals."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from torch.utils.data import DataLoader

from meddiff.engines import DiffusionTrainer, ResumableSampler, TrainerSettings, diffusion_prepare_batch
from meddiff.networks import Pseudo3DUNet
from meddiff.sampling import LatentDiffusionSampler
from meddiff.schedulers import make_sampling_scheduler, make_training_scheduler
from meddiff.transforms import ItemSpacingd
from tests.helpers import tiny_autoencoder, unit_batch

KW = dict(in_channels=4, out_channels=4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
          norm_num_groups=4)


def _net(condition_on_spacing: bool, seed: int = 0) -> Pseudo3DUNet:
    torch.manual_seed(seed)
    net = Pseudo3DUNet(3, **KW, condition_on_spacing=condition_on_spacing).eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # a non-zero output, so the tests can see changes
    return net


def test_zero_init_is_the_unconditioned_network_and_trained_mlp_uses_spacing():
    plain, spaced = _net(False), _net(True)
    missing = spaced.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["spacing_embed.0.bias", "spacing_embed.0.weight", "spacing_embed.2.bias",
                               "spacing_embed.2.weight"]
    x, t = torch.randn(2, 4, 8, 8, 4), torch.tensor([3, 7])
    with torch.no_grad():
        reference = plain(x, t)
        for spacing in ([[1.0, 1.0, 1.0], [2.0, 2.0, 5.0]], [[0.5, 0.5, 3.0]], [0.7, 0.7, 0.7]):
            torch.testing.assert_close(spaced(x, t, spacing=torch.tensor(spacing)), reference)
        torch.nn.init.normal_(spaced.spacing_embed[2].weight, std=0.5)
        one = spaced(x, t, spacing=torch.tensor([[1.0, 1.0, 1.0]]))
        two = spaced(x, t, spacing=torch.tensor([[2.0, 2.0, 2.0]]))
        per_item = spaced(x, t, spacing=torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))
    assert (one - two).abs().max() > 1e-4
    torch.testing.assert_close(per_item[:1], one[:1])
    torch.testing.assert_close(per_item[1:], two[1:])
    scripted = torch.jit.script(spaced)
    torch.testing.assert_close(scripted(x, t, None, None, None, None, torch.tensor([[2.0, 2.0, 2.0]])), two)


def test_off_keeps_the_state_dict_and_old_weights_load():
    default = Pseudo3DUNet(3, **KW)
    off = Pseudo3DUNet(3, **KW, condition_on_spacing=False)
    assert list(default.state_dict()) == list(off.state_dict())
    assert not any("spacing" in k for k in off.state_dict())
    off.load_state_dict(default.state_dict())  # strict


def test_network_refuses_bad_spacing_inputs():
    x, t = torch.randn(2, 4, 8, 8, 4), torch.tensor([3, 7])
    with pytest.raises(ValueError, match="spacing must be given exactly when.*condition_on_spacing=True"):
        _net(False)(x, t, spacing=torch.ones(2, 3))
    with pytest.raises(ValueError, match="spacing must be given exactly when"):
        _net(True)(x, t)
    with pytest.raises(ValueError, match="spacing must be > 0"):
        _net(True)(x, t, spacing=torch.tensor([[1.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"spacing must have shape \(N, 3\) = \(2, 3\)"):
        _net(True)(x, t, spacing=torch.ones(3, 3))


def test_item_spacing_resamples_each_item_and_records_it():
    image = MetaTensor(torch.rand(1, 16, 16, 8), affine=torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0])))
    on = ItemSpacingd("image", [1.0, 1.0, 1.0], condition_on_spacing=True)
    out = on({"image": image, "spacing": [3.0, 3.0, 4.0]})
    assert out["image"].shape == (1, 8, 8, 4) and out["spacing"].tolist() == [3.0, 3.0, 4.0]
    out = on({"image": image})  # no datalist spacing: pixdim
    assert out["image"].shape == (1, 24, 24, 15) and out["spacing"].tolist() == [1.0, 1.0, 1.0]
    native = ItemSpacingd("image", [-1.0, -1.0, -1.0], condition_on_spacing=True)({"image": image})
    assert native["image"].shape == (1, 16, 16, 8) and native["spacing"].tolist() == [1.5, 1.5, 2.0]
    off = ItemSpacingd("image", [1.0, 1.0, 1.0])({"image": image, "spacing": [3.0, 3.0, 4.0]})
    assert off["image"].shape == (1, 24, 24, 15) and off["spacing"] == [3.0, 3.0, 4.0]  # off: plain Spacingd
    with pytest.raises(ValueError, match="the datalist 'spacing' of a.nii.gz must be three positive"):
        on(_item("a.nii.gz", image.clone(), [1.0, -2.0, 1.0]))


def _item(name: str, image: MetaTensor, spacing: list[float]) -> dict:
    item = {"image": image, "spacing": spacing}
    item["image"].meta["filename_or_obj"] = name
    return item


def _trainer(tmp_path, spacings=((1.0, 1.0, 1.0), (2.0, 2.0, 3.0)), condition_on_spacing=True, net=None):
    torch.manual_seed(0)
    volumes = unit_batch(4)
    data = [{"image": v, "spacing": torch.tensor(spacings[i % len(spacings)])} for i, v in enumerate(volumes)]
    train = DataLoader(data, batch_size=2, sampler=ResumableSampler(data, seed=0))
    val = DataLoader(data[:2], batch_size=1)
    net = _net(True) if net is None else net
    scheduler = make_training_scheduler("rflow", 50, "cosine", "v_prediction")
    settings = TrainerSettings(max_steps=6, ckpt_dir=tmp_path, val_interval=3, ckpt_interval=3, log_interval=1,
                               progress=False)
    return DiffusionTrainer(tiny_autoencoder(), net, torch.optim.Adam(net.parameters(), 3e-3),
                            DiffusionInferer(scheduler), diffusion_prepare_batch("v_prediction", 50, scheduler,
                                                                                  objective="rflow"),
                            train, settings, val, ema_start_step=1000, ema_update_every=1,
                            condition_on_spacing=condition_on_spacing)


def test_trainer_passes_spacing_and_records_range_then_sampler_uses_it(tmp_path, caplog):
    trainer = _trainer(tmp_path)
    trainer.run()
    info = json.loads((tmp_path / "diffusion_model.json").read_text())
    assert info["condition_on_spacing"] is True
    assert info["spacing_range"] == [[1.0, 1.0, 1.0], [2.0, 2.0, 3.0]]
    net = trainer.ema.module.eval()
    assert net.spacing_embed[2].weight.abs().max() > 0  # the spacing MLP was trained: spacing reached the network
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([10])
    with torch.no_grad():
        assert (net(x, t, spacing=torch.tensor([[1.0, 1, 1]])) - net(x, t, spacing=torch.tensor([[2.0, 2, 3]]))
                ).abs().max() > 1e-6

    scheduler = make_sampling_scheduler("rflow", 50, "cosine", "v_prediction")

    def sampler(out, **kw):
        return LatentDiffusionSampler(trainer.autoencoder, net, scheduler, output_dir=out, latent_info=info,
                                      spacing=[1.0, 1.0, 1.0], num_samples=1, num_inference_steps=2, progress=False,
                                      **kw)

    sampler(tmp_path / "a", sample_spacing=[2.0, 2.0, 3.0]).run()
    manifest = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert manifest["condition_on_spacing"] is True and manifest["sample_spacing"] == [2.0, 2.0, 3.0]
    assert manifest["spacing"] == [2.0, 2.0, 3.0]
    written = nib.load(tmp_path / "a" / "sample_000.nii.gz")
    np.testing.assert_allclose(written.header.get_zooms()[:3], [2.0, 2.0, 3.0])
    sampler(tmp_path / "b").run()  # no sample_spacing: spacing (pixdim) conditions the network
    assert json.loads((tmp_path / "b" / "samples.json").read_text())["sample_spacing"] == [1.0, 1.0, 1.0]
    a = nib.load(tmp_path / "a" / "sample_000.nii.gz").get_fdata()
    b = nib.load(tmp_path / "b" / "sample_000.nii.gz").get_fdata()
    assert np.abs(a - b).max() > 0  # same seed, other spacing: another volume
    with caplog.at_level(logging.WARNING, logger="meddiff.sampling.latent_sampler"):
        sampler(tmp_path / "c", sample_spacing=[0.5, 0.5, 0.5])
    assert "outside the trained spacing range" in caplog.text
    with pytest.raises(ValueError, match="sample_spacing must be three positive"):
        sampler(tmp_path / "d", sample_spacing=[1.0, 0.0, 1.0])


def test_sampler_refuses_spacing_for_unconditioned_weights_and_a_denoiser_without_it():
    info = {"scale_factor": 1.0, "latent_shape": [4, 4, 4, 4], "objective": "rflow"}
    scheduler = make_sampling_scheduler("rflow", 50, "cosine", "v_prediction")
    with pytest.raises(ValueError, match="sample_spacing=.*trained without spacing conditioning"):
        LatentDiffusionSampler(tiny_autoencoder(), _net(False), scheduler, latent_info=info,
                               sample_spacing=[1.0, 1.0, 1.0], progress=False)
    with pytest.raises(ValueError, match="condition_on_spacing=true.*has no spacing input.*diffusion_def"):
        LatentDiffusionSampler(tiny_autoencoder(), _net(False), scheduler, progress=False,
                               latent_info={**info, "condition_on_spacing": True}, sample_spacing=[1.0, 1.0, 1.0])


def test_trainer_refusals(tmp_path, caplog):
    monai_unet = DiffusionModelUNet(spatial_dims=3, in_channels=4, out_channels=4, channels=(8, 16),
                                    attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                                    norm_num_groups=4)
    with pytest.raises(ValueError, match="condition_on_spacing=true needs a denoiser.*diffusion_def"):
        _trainer(tmp_path, net=monai_unet)
    with pytest.raises(ValueError, match="built with condition_on_spacing=True but the trainer"):
        _trainer(tmp_path, condition_on_spacing=False)
    one = _trainer(tmp_path / "one", spacings=((1.0, 1.0, 1.0),))
    with caplog.at_level(logging.WARNING, logger="meddiff.engines.diffusion_trainer"):
        one.setup()
    assert "every training volume has the spacing" in caplog.text


def test_controlnet_stage_refuses_a_spacing_conditioned_denoiser(tmp_path):
    from meddiff.engines import ControlNetTrainer
    from tests.engines.test_controlnet_trainer import ARCH, _kwargs

    spaced = Pseudo3DUNet(3, 4, 4, condition_on_spacing=True, **ARCH)
    with pytest.raises(ValueError, match="ControlNet stage supports denoisers without spacing conditioning"):
        ControlNetTrainer(**_kwargs(tmp_path, diffusion_model=spaced))
