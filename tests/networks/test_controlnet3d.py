# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""ControlNets for both denoisers: zero at init (the denoiser's output unchanged), training touches only them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import ControlNetDiffusionInferer
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from meddiff.networks import Pseudo3DControlNet, Pseudo3DUNet, controlnet_from_denoiser
from meddiff.networks.controlnet3d import ENCODER_PARTS

ARCH = {"channels": (8, 16), "attention_levels": (False, True), "num_res_blocks": 1, "num_head_channels": 8,
        "norm_num_groups": 8}


def _trained_like(net: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (an untrained denoiser's zero output conv would hide any difference)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net


def _pseudo3d():
    unet = _trained_like(Pseudo3DUNet(3, 4, 4, depth_position=True, **ARCH))
    cn = controlnet_from_denoiser(Pseudo3DControlNet(3, 4, depth_position=True, conditioning_in_channels=3,
                                                     conditioning_downsample=4, **ARCH), unet)
    return unet, cn, (8, 8, 6)


def _monai():
    unet = _trained_like(DiffusionModelUNet(3, 4, 4, **ARCH))
    cn = controlnet_from_denoiser(ControlNet(3, 4, conditioning_embedding_in_channels=3,
                                             conditioning_embedding_num_channels=(8, 16, 32), **ARCH), unet)
    return unet, cn, (8, 8, 8)


def _cond(latent: tuple[int, ...], n: int = 2) -> torch.Tensor:
    labels = torch.randint(0, 3, (n, *(4 * s for s in latent)), generator=torch.Generator().manual_seed(3))
    return F.one_hot(labels, 3).movedim(-1, 1).float()


@pytest.mark.parametrize("build", [_pseudo3d, _monai], ids=["pseudo3d", "monai"])
def test_zero_initialised_controlnet_leaves_the_denoiser_unchanged(build):
    unet, cn, latent = build()
    x, t = torch.randn(2, 4, *latent), torch.tensor([5, 200])
    with torch.no_grad():
        down, mid = cn(x=x, timesteps=t, controlnet_cond=_cond(latent))
        bare = unet(x, timesteps=t)
        steered = unet(x, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert bare.abs().max() > 0.01 and all(r.abs().max() == 0 for r in [*down, mid])
    torch.testing.assert_close(steered, bare, rtol=0, atol=0)


@pytest.mark.parametrize("build", [_pseudo3d, _monai], ids=["pseudo3d", "monai"])
def test_gradients_reach_only_the_controlnet_and_change_the_output(build):
    unet, cn, latent = build()
    unet.requires_grad_(False)
    inferer = ControlNetDiffusionInferer(DDPMScheduler(num_train_timesteps=100))
    optimizer = torch.optim.Adam(cn.parameters(), lr=1e-2)
    x, noise, t = torch.randn(2, 4, *latent), torch.randn(2, 4, *latent), torch.tensor([5, 60])
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    for _ in range(2):
        prediction = inferer(inputs=x, diffusion_model=unet, controlnet=cn, noise=noise, timesteps=t,
                             cn_cond=_cond(latent))
        loss = F.l1_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in unet.parameters())
        assert cn.controlnet_mid_block.weight.grad.abs().sum() > 0 if hasattr(cn.controlnet_mid_block, "weight") \
            else any(p.grad is not None and p.grad.abs().sum() > 0 for p in cn.parameters())
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    with torch.no_grad():
        down, mid = cn(x=x, timesteps=t, controlnet_cond=_cond(latent))
    assert mid.abs().max() > 0  # trained: the residuals are no longer zero


def test_from_unet_copies_the_encoder_and_the_residuals_fit_the_skips():
    unet, built, latent = _pseudo3d()
    cn = Pseudo3DControlNet.from_unet(unet, conditioning_in_channels=3, conditioning_downsample=4)
    assert cn.state_dict().keys() == built.state_dict().keys()
    for key, value in cn.state_dict().items():
        if key.split(".")[0] in ENCODER_PARTS:  # the denoiser's encoder, copied
            torch.testing.assert_close(value, built.state_dict()[key], rtol=0, atol=0)
            torch.testing.assert_close(value, unet.state_dict()[key], rtol=0, atol=0)
        elif key.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            assert value.abs().max() == 0  # zero-initialised
    x, t = torch.randn(1, 4, *latent), torch.tensor([3])
    emb = cn.embed_condition(_cond(latent, 1))
    down, mid = cn(x, t, controlnet_cond=_cond(latent, 1))
    down2, mid2 = cn(x, t, condition_embedding=emb)  # cached conditioning embedding: the same residuals
    assert len(down) == 4 and mid.shape == (1, 16, 4, 4, 6)
    for a, b in zip([*down, mid], [*down2, mid2]):
        torch.testing.assert_close(a, b)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="conditioning_downsample"):
        Pseudo3DControlNet(3, 4, conditioning_downsample=3, **ARCH)
    with pytest.raises(ValueError, match="conditioning_in_channels"):
        Pseudo3DControlNet(3, 4, conditioning_in_channels=0, **ARCH)
    unet, cn, latent = _pseudo3d()
    with pytest.raises(ValueError, match="image resolution"):
        cn(torch.randn(1, 4, *latent), torch.tensor([1]), controlnet_cond=torch.zeros(1, 3, 8, 8, 6))
    with pytest.raises(ValueError, match="one tensor per skip"):
        unet(torch.randn(1, 4, *latent), torch.tensor([1]), down_block_additional_residuals=[torch.zeros(1)])
    with pytest.raises(ValueError, match="Pseudo3DUNet denoiser"):
        controlnet_from_denoiser(cn, DiffusionModelUNet(3, 4, 4, **ARCH))
    wider = Pseudo3DUNet(3, 4, 4, channels=(16, 32), attention_levels=(False, True), num_head_channels=8)
    with pytest.raises(ValueError, match="does not fit"):
        controlnet_from_denoiser(cn, wider)
