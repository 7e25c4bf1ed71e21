# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Class conditioning: denoisers' class embedding, classifier-free guidance in the loop, class names, labels CSV."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import VQVAE, DiffusionModelUNet

from meddiff.data import DataError, read_labels_file, with_class_labels
from meddiff.networks import Pseudo3DUNet
from meddiff.sampling import LatentDiffusionSampler, classifier_free_guidance, resolve_class_labels
from meddiff.schedulers import make_sampling_scheduler

LATENT = [4, 8, 8, 4]
INFO = {"scale_factor": 0.5, "latent_shape": LATENT, "latent_min": -4.0, "latent_max": 4.0,
        "prediction_type": "epsilon", "objective": "ddpm", "num_classes": 2, "class_names": ["healthy", "lesion"]}


def _pseudo3d(num_class_embeds: int | None = None) -> Pseudo3DUNet:
    torch.manual_seed(0)
    return Pseudo3DUNet(3, 4, 4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
                        norm_num_groups=4, num_class_embeds=num_class_embeds)


def _monai(num_class_embeds: int | None = None) -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(spatial_dims=3, in_channels=4, out_channels=4, channels=(8, 16),
                              attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
                              norm_num_groups=4, num_class_embeds=num_class_embeds)


def _nonzero_output(net: torch.nn.Module) -> torch.nn.Module:
    """Both denoisers start with a zero output conv (they predict 0): give it weights."""
    torch.manual_seed(1)
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return net.eval()


@pytest.mark.parametrize("make", [_pseudo3d, _monai], ids=["pseudo3d", "monai"])
def test_class_embedding_shape_and_effect(make):
    net = _nonzero_output(make(3))
    x, t = torch.randn(1, 4, 8, 8, 4).repeat(2, 1, 1, 1, 1), torch.tensor([5, 5])
    with torch.no_grad():
        a = net(x, timesteps=t, class_labels=torch.tensor([0, 0]))
        b = net(x, timesteps=t, class_labels=torch.tensor([1, 2]))
    assert a.shape == (2, 4, 8, 8, 4)
    assert (a - b).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4  # another class, another output, per sample
    torch.testing.assert_close(a[0], a[1], atol=1e-5, rtol=1e-5)  # same input, same class, same output


@pytest.mark.parametrize("make", [_pseudo3d, _monai], ids=["pseudo3d", "monai"])
def test_unconditional_state_dict_unchanged(make):
    plain, conditioned = make(None).state_dict(), make(3).state_dict()
    assert not any("class" in k for k in plain)
    assert set(conditioned) - set(plain) == {"class_embedding.weight"}
    assert conditioned["class_embedding.weight"].shape[0] == 3


def test_pseudo3d_class_label_errors_and_torchscript():
    with pytest.raises(ValueError, match="class_labels must be None"):
        _pseudo3d()(torch.randn(1, 4, 8, 8, 4), torch.tensor([1]), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="class_labels is required"):
        _pseudo3d(3)(torch.randn(1, 4, 8, 8, 4), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_class_embeds"):
        _pseudo3d(0)
    net = _nonzero_output(_pseudo3d(3))
    x, t, c = torch.randn(1, 4, 8, 8, 4), torch.tensor([3]), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x, t, None, c), net(x, t, class_labels=c))


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    net = _nonzero_output(_pseudo3d(3))
    x, t, labels = torch.randn(2, 4, 8, 8, 4), torch.tensor([7, 7]), torch.tensor([0, 1])
    with torch.no_grad():
        cond = net(x, timesteps=t, class_labels=labels)
        uncond = net(x, timesteps=t, class_labels=torch.tensor([2, 2]))
        one = classifier_free_guidance(net, x, t, labels, null_label=2, guidance_scale=1.0)
        zero = classifier_free_guidance(net, x, t, labels, null_label=2, guidance_scale=0.0)
        three = classifier_free_guidance(net, x, t, labels, null_label=2, guidance_scale=3.0)
    torch.testing.assert_close(one, cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero, uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(three, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_guidance_rescale_matches_the_conditional_spread():
    net = _nonzero_output(_pseudo3d(3))
    x, t, labels = torch.randn(2, 4, 8, 8, 4), torch.tensor([7, 7]), torch.tensor([0, 1])
    with torch.no_grad():
        cond = net(x, timesteps=t, class_labels=labels)
        plain = classifier_free_guidance(net, x, t, labels, null_label=2, guidance_scale=5.0)
        full = classifier_free_guidance(net, x, t, labels, null_label=2, guidance_scale=5.0, guidance_rescale=1.0)
        half = classifier_free_guidance(net, x, t, labels, null_label=2, guidance_scale=5.0, guidance_rescale=0.5)
    dims = (1, 2, 3, 4)
    assert (plain.std(dim=dims) / cond.std(dim=dims)).min() > 1.5  # large scales inflate the spread
    torch.testing.assert_close(full.std(dim=dims), cond.std(dim=dims), atol=1e-5, rtol=1e-4)  # per sample
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ddim", "rflow"])
def test_guidance_interval_limits_the_guided_steps(method):
    net = _nonzero_output(_pseudo3d(3))
    calls: list[int] = []
    net.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    everywhere = _sampler(method, net, INFO, class_label="lesion", guidance_scale=3.0)
    z_all = everywhere.sample_latents([0])
    assert calls == [2, 2, 2]  # conditional + unconditional in one doubled batch at each of the 3 steps
    calls.clear()
    nowhere = _sampler(method, net, INFO, class_label="lesion", guidance_scale=3.0, guidance_interval=[0.0, 0.0])
    z_none = nowhere.sample_latents([0])
    assert calls == [1, 1, 1]  # outside the interval: the conditional pass alone
    plain = _sampler(method, net, INFO, class_label="lesion", guidance_scale=1.0).sample_latents([0])
    torch.testing.assert_close(z_none, plain, atol=1e-4, rtol=1e-4)
    assert (z_all - z_none).abs().max() > 1e-3
    calls.clear()
    levels = [float(t) / nowhere.scheduler.num_train_timesteps for t in nowhere.scheduler.timesteps]
    cut = sorted(levels)[1]  # guide only the two least noisy steps
    _sampler(method, net, INFO, class_label="lesion", guidance_scale=3.0, guidance_interval=[0.0, cut]).sample_latents([0])
    assert calls == [1, 2, 2]
    with pytest.raises(ValueError, match="guidance_interval"):
        _sampler(method, net, INFO, class_label="lesion", guidance_interval=[0.8, 0.2])
    with pytest.raises(ValueError, match="guidance_rescale"):
        _sampler(method, net, INFO, class_label="lesion", guidance_rescale=1.5)


def test_resolve_class_labels_cycles_and_names_errors():
    assert resolve_class_labels(["lesion", "healthy"], INFO, 3) == ["lesion", "healthy", "lesion"]
    assert resolve_class_labels(None, INFO, 2) == [None, None]
    with pytest.raises(ValueError, match=r"unknown.*\['healthy', 'lesion'\]"):
        resolve_class_labels("tumour", INFO, 1)
    with pytest.raises(ValueError, match="class_label.*unconditional"):
        resolve_class_labels("lesion", {"num_classes": 0}, 1)


def _autoencoder() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(8,), num_res_layers=1, num_res_channels=(8,),
                 downsample_parameters=((2, 4, 1, 1),), upsample_parameters=((2, 4, 1, 1, 0),), num_embeddings=16,
                 embedding_dim=4)


def _sampler(method: str, net: torch.nn.Module, info: dict, **kw) -> LatentDiffusionSampler:
    prediction = "sample" if method != "rflow" else "epsilon"
    scheduler = make_sampling_scheduler(method, 20, "cosine", prediction)
    info = {**info, "objective": "rflow" if method == "rflow" else "ddpm", "prediction_type": prediction}
    return LatentDiffusionSampler(_autoencoder(), net, scheduler, latent_info=info, num_inference_steps=3,
                                  progress=False, **kw)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m", "rflow"])
def test_sampler_class_per_seed_and_guidance(method):
    net = _nonzero_output(_pseudo3d(3))
    mixed = _sampler(method, net, INFO, class_label=["healthy", "lesion"], num_samples=2, sample_batch_size=2)
    assert mixed.classes_of([0, 1]) == ["healthy", "lesion"]
    z = mixed.sample_latents([0, 1])
    assert z.shape == (2, *LATENT) and torch.isfinite(z).all()
    # per seed, not per batch position: seed 1 alone is the same volume
    torch.testing.assert_close(mixed.sample_latents([1]), z[1:], atol=1e-4, rtol=1e-4)
    lesion = _sampler(method, net, INFO, class_label="lesion", sample_batch_size=2).sample_latents([0])
    assert (lesion - z[:1]).abs().max() > 1e-3  # the class changes the volume of the same seed
    # guidance_scale 1 skips the unconditional pass: the same as the guided loop at s=1
    plain = _sampler(method, net, INFO, class_label="lesion", guidance_scale=1.0).sample_latents([0])
    guided = _sampler(method, net, INFO, class_label="lesion", guidance_scale=1.0 + 1e-9).sample_latents([0])
    torch.testing.assert_close(plain, guided, atol=1e-4, rtol=1e-4)


def test_sampler_errors_name_the_key():
    with pytest.raises(ValueError, match="class_label.*unconditional"):
        _sampler("ddim", _pseudo3d(), {**INFO, "num_classes": 0}, class_label="lesion")
    with pytest.raises(ValueError, match=r"\['tumour'\] unknown.*\['healthy', 'lesion'\]"):
        _sampler("ddim", _pseudo3d(3), INFO, class_label=["lesion", "tumour"])


def test_labels_file_csv(tmp_path):
    csv = tmp_path / "train-abnormal.csv"
    csv.write_text("0000,0\n0001,1\n\nsub-02_T1w.nii.gz,lesion\n")
    assert read_labels_file(csv) == {"0000": "0", "0001": "1", "sub-02_T1w": "lesion"}
    header = tmp_path / "labels.csv"
    header.write_text("file,class\nscans/0000.npy,healthy\n0001,lesion\n")
    items = with_class_labels([{"image": "/d/0000.npy"}, {"image": "/d/0001.nii.gz"}], 2, header)
    assert [i["class_label"] for i in items] == ["healthy", "lesion"]
    assert with_class_labels([{"image": "/d/0000.npy"}], 0, None) == [{"image": "/d/0000.npy"}]
    with pytest.raises(DataError, match=r"labels.csv: has no row for '0002' \(/d/0002.npy\)"):
        with_class_labels([{"image": "/d/0000.npy"}, {"image": "/d/0002.npy"}], 2, header)
    with pytest.raises(ValueError, match="has no 'class_label'.*labels_file"):
        with_class_labels([{"image": "/d/0000.npy"}], 2, None)
    with pytest.raises(DataError, match="labels_file not found"):
        read_labels_file(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("0000,0\n0000,1\n")
    with pytest.raises(DataError, match="two classes"):
        read_labels_file(bad)
