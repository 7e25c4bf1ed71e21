# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""LatentDiffusionSampler: in-memory API, per-seed reproducibility across batch sizes, method/objective checks."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import VQVAE

from meddiff.networks import Pseudo3DUNet
from meddiff.sampling import LatentDiffusionSampler, latent_diffusion_inferer
from meddiff.schedulers import make_sampling_scheduler

T = 20
LATENT = [4, 8, 8, 4]


def _autoencoder() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(8,), num_res_layers=1, num_res_channels=(8,),
                 downsample_parameters=((2, 4, 1, 1),), upsample_parameters=((2, 4, 1, 1, 0),), num_embeddings=16,
                 embedding_dim=4)


def _denoiser() -> Pseudo3DUNet:
    torch.manual_seed(1)
    net = Pseudo3DUNet(3, 4, 4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
                       norm_num_groups=4)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # zero-initialised: give it a non-trivial output
    return net


def _info(**extra) -> dict:
    return {"scale_factor": 0.5, "latent_shape": LATENT, "latent_min": -4.0, "latent_max": 4.0,
            "prediction_type": "epsilon", "objective": "ddpm", **extra}


def _sampler(method: str = "dpmpp_2m", batch: int = 1, info: dict | None = None, **kw) -> LatentDiffusionSampler:
    scheduler = make_sampling_scheduler(method, T, "cosine", "epsilon", ddim_eta=kw.pop("ddim_eta", 0.0))
    return LatentDiffusionSampler(_autoencoder(), _denoiser(), scheduler, latent_info=info or _info(),
                                  num_inference_steps=4, sample_batch_size=batch, progress=False, **kw)


@pytest.mark.parametrize("method", ["dpmpp_2m", "ddpm", "ddim"])
def test_seed_reproducible_regardless_of_batch_size(method):
    kw = {"ddim_eta": 1.0} if method == "ddim" else {}  # stochastic samplers: per-sample step noise
    one = _sampler(method, batch=1, **kw).sample_latents([5, 6, 7])
    three = _sampler(method, batch=3, **kw).sample_latents([5, 6, 7])
    alone = _sampler(method, batch=2, **kw).sample_latents([7])
    assert one.shape == (3, *LATENT)
    torch.testing.assert_close(one, three, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one[2:], alone, atol=1e-4, rtol=1e-4)
    assert (one[0] - one[1]).abs().max() > 0.1  # different seeds, different volumes


def test_generate_is_decode_of_sample_latents_and_in_range():
    sampler = _sampler(batch=2)
    images = sampler.generate([0, 1])
    assert images.shape == (2, 1, 16, 16, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    latents = sampler.sample_latents([0, 1])
    torch.testing.assert_close(sampler.decode(latents), images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler.sample(1), images[1], atol=1e-5, rtol=1e-5)  # seed 0 + index 1


def test_ddpm_runs_every_training_step_and_clips():
    sampler = _sampler("ddpm")
    assert sampler.steps == T
    sampler.sample_latents([0])
    assert len(sampler.scheduler.timesteps) == T
    assert sampler.scheduler.clip_sample and sampler.scheduler.clip_sample_values == [-4.0, 4.0]


def test_bf16_sampling_close_to_fp32():
    fp32 = _sampler().sample_latents([3])
    bf16 = _sampler(sampling_dtype="bfloat16", decode_dtype="bfloat16").sample_latents([3])
    assert not torch.equal(fp32, bf16)  # autocast really ran in bf16
    assert (fp32 - bf16).abs().mean() < 0.05 * fp32.abs().mean()


def test_inferer_gives_scheduler_and_scale(tmp_path):
    path = tmp_path / "diffusion_model.json"
    path.write_text(json.dumps(_info(scale_factor=0.25)))
    inferer = latent_diffusion_inferer(make_sampling_scheduler("dpmpp_2m", T, "cosine", "epsilon"), path)
    sampler = LatentDiffusionSampler(_autoencoder(), _denoiser(), inferer=inferer, latent_info=path,
                                     sampling_method="dpmpp_2m", num_inference_steps=3, progress=False)
    assert sampler.scale_factor == 0.25 and sampler.scheduler is inferer.scheduler
    image = inferer.sample(input_noise=torch.randn(1, *LATENT), autoencoder_model=sampler.autoencoder,
                           diffusion_model=sampler.diffusion_model, verbose=False)
    assert image.shape == (1, 1, 16, 16, 8)


def test_run_writes_files_and_manifest(tmp_path):
    sampler = _sampler(batch=2, output_dir=tmp_path, spacing=[1.0, 1.0, 2.0])
    sampler.num_samples = 3
    files = sampler.run()
    assert [f.name for f in files] == ["sample_000.nii.gz", "sample_001.nii.gz", "sample_002.nii.gz"]
    manifest = json.loads((tmp_path / "samples.json").read_text())
    assert [r["seed"] for r in manifest["samples"]] == [0, 1, 2]
    assert manifest["sampling_method"] == "dpmpp_2m" and manifest["num_inference_steps"] == 4


def test_rflow_weights_need_rflow_sampler():
    with pytest.raises(ValueError, match="sampling_method.*objective='rflow'.*\\['rflow'\\]"):
        _sampler("dpmpp_2m", info=_info(objective="rflow", prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="objective='ddpm'"):
        _sampler("rflow")
    latents = _sampler("rflow", info=_info(objective="rflow", prediction_type="v_prediction")).sample_latents([0])
    assert latents.shape == (1, *LATENT) and latents.abs().max() <= 4.0


def test_prediction_type_mismatch_names_the_key():
    with pytest.raises(ValueError, match="prediction_type to 'sample'"):
        _sampler(info=_info(prediction_type="sample"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_batch_size"):
        _sampler(batch=0)
    with pytest.raises(ValueError, match="sampling_dtype"):
        _sampler(sampling_dtype="int8")
    with pytest.raises(ValueError, match="sampling_method='ddim' but the scheduler"):
        _sampler(sampling_method="ddim")
    with pytest.raises(ValueError, match="output_dir and spacing"):
        _sampler().run()
