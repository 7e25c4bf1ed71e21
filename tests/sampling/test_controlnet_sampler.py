# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""ControlNetSampler: every sampling method, conditioning_scale, the zero-initialised ControlNet as a no-op."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet

from meddiff.data.errors import DataError
from meddiff.networks import Pseudo3DControlNet, Pseudo3DUNet, controlnet_from_denoiser
from meddiff.sampling import ControlNetSampler, LatentDiffusionSampler
from meddiff.schedulers import make_sampling_scheduler
from tests.sampling.test_latent_sampler import T, _autoencoder, _denoiser, _info


def _controlnet(zero: bool = True, denoiser: torch.nn.Module | None = None) -> Pseudo3DControlNet:
    torch.manual_seed(2)
    net = Pseudo3DControlNet.from_unet(denoiser or _denoiser(), conditioning_in_channels=3, conditioning_downsample=2)
    if not zero:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.fixture
def mask_dir(tmp_path):
    label = np.zeros((16, 16, 8), np.uint8)
    label[4:12, 4:12, 2:6] = 1
    label[6:9, 6:9, 3:5] = 2
    nib.save(nib.Nifti1Image(label, np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / "m.nii.gz")
    return tmp_path


def _samplers(method: str, mask_dir, objective: str = "ddpm", zero: bool = True, scale: float = 1.0):
    info = _info(objective=objective) if objective == "ddpm" else _info(objective="rflow", prediction_type="None")
    common = {"latent_info": info, "num_inference_steps": 3, "progress": False, "spacing": [1.0, 1.0, 1.0]}
    bare = LatentDiffusionSampler(_autoencoder(), _denoiser(), make_sampling_scheduler(method, T, "cosine", "epsilon"),
                                  **common)
    cond = ControlNetSampler(_controlnet(zero), mask_dir, {"num_label_classes": 3, "scale_factor": 0.5},
                             conditioning_scale=scale, autoencoder=_autoencoder(), diffusion_model=_denoiser(),
                             scheduler=make_sampling_scheduler(method, T, "cosine", "epsilon"), **common)
    return bare, cond


@pytest.mark.parametrize("method,objective", [("ddpm", "ddpm"), ("ddim", "ddpm"), ("dpmpp_2m", "ddpm"),
                                              ("rflow", "rflow")])
def test_every_method_zero_controlnet_matches_the_unconditioned_sampler(method, objective, mask_dir):
    bare, cond = _samplers(method, mask_dir, objective)
    mask = cond.load_mask(mask_dir / "m.nii.gz")
    assert mask.shape == (1, 16, 16, 8)
    expected = bare.generate([4])
    torch.testing.assert_close(cond.generate_for_masks([mask], [4]), expected, rtol=0, atol=1e-5)
    _, steered = _samplers(method, mask_dir, objective, zero=False)
    assert (steered.generate_for_masks([mask], [4]) - expected).abs().max() > 1e-3  # a trained one steers


def test_conditioning_scale_zero_is_unconditioned(mask_dir):
    bare, cond = _samplers("dpmpp_2m", mask_dir, zero=False, scale=0.0)
    mask = cond.load_mask(mask_dir / "m.nii.gz")
    torch.testing.assert_close(cond.generate_for_masks([mask], [1]), bare.generate([1]), rtol=0, atol=1e-5)


def test_errors_name_the_problem(mask_dir, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="mask_dir"):
        _samplers("ddim", mask_dir / "missing")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match="holds no NIfTI label map"):
        _samplers("ddim", empty)
    bad = tmp_path_factory.mktemp("bad")
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), 5, np.uint8), np.eye(4)), bad / "x.nii.gz")
    _, cond = _samplers("ddim", bad)
    with pytest.raises(DataError, match=r"x.nii.gz: label values \[5\] are outside 0..2"):
        cond.load_mask(bad / "x.nii.gz")
    with pytest.raises(ValueError, match="scale_factor"):
        ControlNetSampler(_controlnet(), mask_dir, {"num_label_classes": 3, "scale_factor": 0.7},
                          autoencoder=_autoencoder(), diffusion_model=_denoiser(),
                          scheduler=make_sampling_scheduler("ddim", T, "cosine", "epsilon"), latent_info=_info())


def test_run_writes_pairs_and_a_rerun_keeps_or_restores_them(mask_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")

    def sampler() -> ControlNetSampler:
        _, cond = _samplers("ddim", mask_dir, zero=False)
        cond.output_dir, cond.num_samples_per_mask = out, 2
        cond.seeds, cond.num_samples = [7, 8], 2
        return cond

    first = sampler().run()
    assert [p.name for p in first] == ["m_000_image.nii.gz", "m_001_image.nii.gz"]
    manifest = json.loads((out / "samples.json").read_text())
    image = nib.load(out / "m_001_image.nii.gz")
    np.testing.assert_array_equal(image.affine, nib.load(out / "m_001_label.nii.gz").affine)
    before = image.get_fdata()
    kept = (out / "m_000_image.nii.gz").stat().st_mtime_ns
    (out / "m_001_image.nii.gz").unlink()
    sampler().run()
    assert (out / "m_000_image.nii.gz").stat().st_mtime_ns == kept  # recorded and intact: not sampled again
    np.testing.assert_array_equal(nib.load(out / "m_001_image.nii.gz").get_fdata(), before)  # restored, same bytes
    again = json.loads((out / "samples.json").read_text())
    assert again["samples"][0] == manifest["samples"][0]
    assert {k: v for k, v in again.items() if k not in ("samples", "time")} == \
        {k: v for k, v in manifest.items() if k not in ("samples", "time")}
    assert manifest["conditioning_scale"] == 1.0 and manifest["samples"][1]["seed"] == 8
    pairs = json.loads((out / "dataset.json").read_text())
    assert pairs["training"] == [{"image": f"m_00{k}_image.nii.gz", "label": f"m_00{k}_label.nii.gz"} for k in (0, 1)]


def _class_denoiser() -> Pseudo3DUNet:
    torch.manual_seed(1)
    net = Pseudo3DUNet(3, 4, 4, channels=(8, 16), attention_levels=(False, True), num_head_channels=8,
                       norm_num_groups=4, num_class_embeds=3)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # zero-initialised: give it a non-trivial output
    return net


CLASS_INFO = {"num_classes": 2, "class_names": ["a", "b"]}


def _class_samplers(mask_dir, class_label, zero: bool = True, batch: int = 2, method: str = "dpmpp_2m"):
    """The class-conditioned unconditioned sampler and the ControlNet sampler on the same denoiser, guidance on."""
    common = {"latent_info": _info(**CLASS_INFO), "num_inference_steps": 3, "progress": False,
              "spacing": [1.0, 1.0, 1.0], "class_label": class_label, "guidance_scale": 2.5,
              "guidance_interval": [0.5, 1.0], "guidance_rescale": 0.3, "sample_batch_size": batch}
    bare = LatentDiffusionSampler(_autoencoder(), _class_denoiser(),
                                  make_sampling_scheduler(method, T, "cosine", "epsilon"), **common)
    cond = ControlNetSampler(_controlnet(zero, _class_denoiser()), mask_dir, {"num_label_classes": 3, "scale_factor": 0.5, **CLASS_INFO},
                             num_samples_per_mask=2, autoencoder=_autoencoder(), diffusion_model=_class_denoiser(),
                             scheduler=make_sampling_scheduler(method, T, "cosine", "epsilon"), **common)
    return bare, cond


def test_zero_controlnet_on_a_class_conditioned_denoiser_matches_the_guided_sampler(mask_dir):
    bare, cond = _class_samplers(mask_dir, ["b", "a"])
    mask = cond.load_mask(mask_dir / "m.nii.gz")
    assert cond.classes_of([0, 1]) == ["b", "a"]
    expected = bare.generate([0, 1])  # seed 0: class b, seed 1: class a; a guided batch of two
    torch.testing.assert_close(cond.generate_for_masks([mask, mask], [0, 1]), expected, rtol=0, atol=0)
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    # the classes steer the ControlNet sampler too (same seed, other class), and a trained ControlNet steers it
    swapped = cond.generate_for_masks([mask, mask], [0, 1], class_labels=["a", "b"])
    assert (swapped - expected).abs().max() > 1e-3
    _, steered = _class_samplers(mask_dir, ["b", "a"], zero=False)
    assert (steered.generate_for_masks([mask, mask], [0, 1]) - expected).abs().max() > 1e-3
    # one volume at a time (a guided batch of one): the same volumes
    _, single = _class_samplers(mask_dir, ["b", "a"], zero=False, batch=1)
    torch.testing.assert_close(single.generate_for_masks([mask, mask], [0, 1]),
                               steered.generate_for_masks([mask, mask], [0, 1]), rtol=0, atol=1e-5)
    assert cond.class_record(1) == {"class_label": "a"} and cond.class_description(0) == {"class": "b", "g": "2.5"}


def test_class_mismatch_errors(mask_dir):
    kwargs = {"autoencoder": _autoencoder(), "diffusion_model": _class_denoiser(), "latent_info": _info(**CLASS_INFO),
              "scheduler": make_sampling_scheduler("ddim", T, "cosine", "epsilon")}
    with pytest.raises(ValueError, match=r"trained on a denoiser with num_classes=0 \[\] \(controlnet_info\)"):
        ControlNetSampler(_controlnet(), mask_dir, {"num_label_classes": 3, "num_classes": 0}, **kwargs)
    with pytest.raises(ValueError, match="needs a controlnet_def with num_class_embeds=3, got None"):
        ControlNetSampler(_controlnet(), mask_dir, {"num_label_classes": 3, **CLASS_INFO}, **kwargs)
    with pytest.raises(ValueError, match=r"class_label \['c'\] unknown"):
        _class_samplers(mask_dir, "c")


def test_monai_controlnet_on_a_class_conditioned_monai_unet(mask_dir):
    """MONAI's ControlNet + DiffusionModelUNet: class labels reach both, zero residuals leave the guided volumes."""
    arch = {"spatial_dims": 3, "in_channels": 4, "channels": (8, 16), "attention_levels": (False, True),
            "num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 4, "num_class_embeds": 3}

    def unet() -> DiffusionModelUNet:
        torch.manual_seed(1)
        net = DiffusionModelUNet(out_channels=4, **arch)
        for p in net.out.parameters():  # zero-initialised: give it a non-trivial output
            torch.nn.init.normal_(p, std=0.05)
        return net

    controlnet = controlnet_from_denoiser(ControlNet(conditioning_embedding_in_channels=3,
                                                     conditioning_embedding_num_channels=(8, 16), **arch), unet())
    common = {"latent_info": _info(**CLASS_INFO), "num_inference_steps": 3, "progress": False,
              "spacing": [1.0, 1.0, 1.0], "class_label": ["b", "a"], "guidance_scale": 2.5,
              "guidance_interval": [0.5, 1.0], "sample_batch_size": 2}
    bare = LatentDiffusionSampler(_autoencoder(), unet(), make_sampling_scheduler("dpmpp_2m", T, "cosine", "epsilon"),
                                  **common)
    cond = ControlNetSampler(controlnet, mask_dir, {"num_label_classes": 3, "scale_factor": 0.5, **CLASS_INFO},
                             num_samples_per_mask=2, autoencoder=_autoencoder(), diffusion_model=unet(),
                             scheduler=make_sampling_scheduler("dpmpp_2m", T, "cosine", "epsilon"), **common)
    mask = cond.load_mask(mask_dir / "m.nii.gz")
    expected = bare.generate([0, 1])
    torch.testing.assert_close(cond.generate_for_masks([mask, mask], [0, 1]), expected, rtol=0, atol=0)
    assert (expected[0] - expected[1]).abs().max() > 1e-3
