# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Tests for meddiff.networks.Pseudo3DUNet (tiny configs, CPU)."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from meddiff.networks import Pseudo3DUNet


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny ops are latency bound; one intra-op thread avoids large slow-downs when the CPUs are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY = {"channels": (8, 16), "attention_levels": (False, True), "num_head_channels": 8, "norm_num_groups": 4}


def _net(**overrides) -> Pseudo3DUNet:
    torch.manual_seed(0)
    return Pseudo3DUNet(**{**TINY, **overrides})


def _perturb_output_conv(net: Pseudo3DUNet) -> None:
    """The output conv is zero-initialised; give it random weights so the output depends on the input."""
    with torch.no_grad():
        net.conv_out.weight.normal_(0.0, 0.1)
        net.conv_out.bias.normal_(0.0, 0.1)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (1, 1, 16, 16, 4)),
        ({"attention_levels": (False, False)}, (2, 1, 16, 16, 4)),
        ({"in_channels": 3, "out_channels": 2}, (2, 3, 16, 16, 5)),
        ({"depth_attention": False}, (1, 1, 8, 8, 3)),
        (
            {"channels": (8, 16, 16), "attention_levels": (True, False, True), "num_res_blocks": (1, 2, 1)},
            (2, 1, 16, 16, 1),
        ),
        ({"use_checkpointing": True, "max_relative_distance": 2}, (1, 2, 16, 8, 7)),
    ],
)
def test_output_shape(kwargs, shape):
    kwargs = {**kwargs, "in_channels": shape[1]}
    net = _net(**kwargs)
    x = torch.randn(shape)
    out = net(x, torch.randint(0, 1000, (shape[0],)))
    out_ch = kwargs.get("out_channels", 1)
    assert out.shape == (shape[0], out_ch, *shape[2:])
    # zero-initialised output conv: the untrained network predicts exactly 0
    assert torch.count_nonzero(out) == 0


def test_checkpointing_matches_plain_forward_and_backward():
    net = _net()
    _perturb_output_conv(net)
    net_ckpt = _net(use_checkpointing=True)
    net_ckpt.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 3)
    t = torch.tensor([4])
    out, out_ckpt = net(x, t), net_ckpt(x, t)
    torch.testing.assert_close(out, out_ckpt)
    out.square().mean().backward()
    out_ckpt.square().mean().backward()
    for (name, p), p_ckpt in zip(net.named_parameters(), net_ckpt.parameters()):
        torch.testing.assert_close(p.grad, p_ckpt.grad, msg=name)


def test_timestep_dependence_and_broadcast():
    net = _net().eval()
    _perturb_output_conv(net)
    x = torch.randn(2, 1, 16, 16, 4)
    with torch.no_grad():
        out_a = net(x, torch.tensor([1, 1]))
        out_b = net(x, torch.tensor([9, 9]))
        out_scalar = net(x, torch.tensor(1))
        out_single = net(x, torch.tensor([1.0]))
    assert (out_a - out_b).abs().max() > 1e-4
    torch.testing.assert_close(out_a, out_scalar)
    torch.testing.assert_close(out_a, out_single)


def test_gradient_reaches_all_parameters():
    net = _net()
    _perturb_output_conv(net)
    x = torch.randn(2, 1, 16, 16, 4)
    net(x, torch.tensor([2, 7])).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def _slice0_effect_on_last_slice(net: Pseudo3DUNet) -> float:
    x = torch.randn(1, 1, 16, 16, 5)
    x2 = x.clone()
    x2[..., 0] += torch.randn_like(x2[..., 0])
    t = torch.tensor([3])
    with torch.no_grad():
        out, out2 = net(x, t), net(x2, t)
    assert (out2[..., 0] - out[..., 0]).abs().max() > 1e-4  # sanity: slice 0 itself changed
    return (out2[..., -1] - out[..., -1]).abs().max().item()


def test_depth_attention_mixes_slices():
    net = _net(depth_attention=True).eval()
    _perturb_output_conv(net)
    assert _slice0_effect_on_last_slice(net) > 1e-4


def test_no_depth_attention_keeps_slices_independent():
    # in-plane (3, 3, 1) convs, per-slice GroupNorm, in-plane resampling and spatial attention never mix slices
    net = _net(depth_attention=False, attention_levels=(True, True)).eval()
    _perturb_output_conv(net)
    assert _slice0_effect_on_last_slice(net) < 1e-6


def test_relative_position_bias_changes_output():
    net = _net().eval()
    _perturb_output_conv(net)
    x = torch.randn(1, 1, 16, 16, 6)
    t = torch.tensor([5])
    with torch.no_grad():
        out = net(x, t)
        tables = [m.rel_bias for m in net.modules() if hasattr(m, "rel_bias")]
        assert tables and all(tab.shape == (2 * 32 + 1, 2) for tab in tables)
        for tab in tables:
            tab.normal_(0.0, 2.0)
        out_biased = net(x, t)
    assert (out - out_biased).abs().max() > 1e-4


def test_relative_bias_is_clipped():
    net = _net(max_relative_distance=2)
    depth_attn = next(m for m in net.modules() if hasattr(m, "rel_bias"))
    bias = depth_attn.relative_bias(6, torch.device("cpu"))
    assert bias.shape == (depth_attn.attn.num_heads, 6, 6)
    # distances >= 2 share the same table entry
    torch.testing.assert_close(bias[:, 0, 2], bias[:, 0, 5])
    torch.testing.assert_close(bias[:, 5, 0], bias[:, 2, 0])


def _roll_error(net: Pseudo3DUNet) -> float:
    """How far the net is from commuting with a circular shift of the slices."""
    x, t = torch.randn(1, 1, 16, 16, 8), torch.tensor([5])
    with torch.no_grad():
        return (net(torch.roll(x, 3, dims=4), t) - torch.roll(net(x, t), 3, dims=4)).abs().max().item()


def test_depth_position_tells_the_network_where_a_slice_lies():
    relative_only, absolute = _net(), _net(depth_position=True)
    for net in (relative_only, absolute):
        _perturb_output_conv(net)
    # the paper's design: with the (zero-initialised) relative bias a circular shift along depth commutes with
    # the network, so it cannot prefer one depth for the anatomy over another
    assert _roll_error(relative_only.eval()) < 1e-5
    absolute.load_state_dict(relative_only.state_dict())  # weights trained without it load: a zero position map
    assert _roll_error(absolute.eval()) < 1e-5  # the position map starts at zero: the same network at first
    with torch.no_grad():
        for module in absolute.modules():
            if getattr(module, "position_proj", None) is not None:
                module.position_proj.weight.normal_(0.0, 0.5)
    assert _roll_error(absolute) > 1e-3
    scripted = torch.jit.script(absolute)
    x, t = torch.randn(1, 1, 16, 16, 8), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, t), absolute(x, t))


def test_overfit_fixed_target():
    net = _net()
    torch.manual_seed(1)
    x = torch.randn(1, 1, 16, 16, 4)
    target = torch.randn(1, 1, 16, 16, 4)
    t = torch.tensor([3])
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (net(x, t) - target).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses


def test_diffusion_inferer_train_and_sample():
    net = _net()
    _perturb_output_conv(net)
    x = torch.randn(2, 1, 16, 16, 4)
    noise = torch.randn_like(x)
    inferer = DiffusionInferer(scheduler=DDPMScheduler(num_train_timesteps=10))
    t = torch.randint(0, 10, (2,)).long()
    pred = inferer(inputs=x, diffusion_model=net, noise=noise, timesteps=t)
    assert pred.shape == x.shape

    net.eval()
    ddim = DDIMScheduler(num_train_timesteps=10)
    ddim.set_timesteps(5)
    sample = inferer.sample(input_noise=noise, diffusion_model=net, scheduler=ddim, verbose=False)
    assert sample.shape == x.shape
    assert torch.isfinite(sample).all()


# --- argument validation: one test per ValueError ---------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 2}, "spatial_dims"),
        ({"in_channels": 0}, "in_channels"),
        ({"channels": ()}, "channels"),
        ({"channels": (8, 18)}, "norm_num_groups"),
        ({"attention_levels": (False, True, True)}, "attention_levels"),
        ({"num_res_blocks": (1, 1, 1)}, "num_res_blocks"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"num_head_channels": 0}, "num_head_channels"),
        ({"num_head_channels": 16, "attention_levels": (True, False)}, "num_head_channels"),
        ({"channels": (8, 12), "norm_num_groups": 4, "attention_levels": (False, False)}, "num_head_channels"),
        ({"max_relative_distance": 0}, "max_relative_distance"),
    ],
)
def test_constructor_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _net(**kwargs)


def test_context_raises():
    net = _net()
    with pytest.raises(ValueError, match="context"):
        net(torch.randn(1, 1, 16, 16, 4), torch.tensor([1]), context=torch.randn(1, 1, 8))


def test_class_labels_raises():
    net = _net()
    with pytest.raises(ValueError, match="class_labels"):
        net(torch.randn(1, 1, 16, 16, 4), torch.tensor([1]), class_labels=torch.tensor([0]))


def test_indivisible_spatial_shape_raises():
    net = _net(channels=(8, 16, 16), attention_levels=(False, False, False))
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 18, 4\)"):
        net(torch.randn(1, 1, 16, 18, 4), torch.tensor([1]))


def test_wrong_input_channels_raises():
    net = _net()
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(1, 2, 16, 16, 4), torch.tensor([1]))


def test_timesteps_batch_mismatch_raises():
    net = _net()
    with pytest.raises(ValueError, match="timesteps"):
        net(torch.randn(2, 1, 16, 16, 4), torch.tensor([1, 2, 3]))


def test_attention_levels_from_command_line_strings():
    """`--unet_attention_levels [false,true]` reaches the network as strings; they must not all count as true."""
    net = Pseudo3DUNet(3, 4, 4, channels=(8, 16), attention_levels=["false", "true"], num_head_channels=8)
    assert net.attention_levels == (False, True)
