# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sample volumes from a trained latent diffusion model, decode them and write NIfTI + PNG with provenance."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler
from torch import nn
from tqdm import tqdm

import meddiff
from meddiff.data.writers import affine_from_geometry, save_mosaic_png, save_nifti
from meddiff.engines.shape_chain import check_sampling_size
from meddiff.sampling.guidance import classifier_free_guidance, resolve_class_labels
from meddiff.sampling.tiled_decode import TiledDecoder
from meddiff.schedulers import DPMSolverMultistepScheduler, RFlowSampler, check_sampling_method, is_stochastic
from meddiff.transforms.intensity import scale_from_unit_range
from meddiff.transforms.spacing import check_spacing
from meddiff.utils import as_bool, atomic_write_json

__all__ = ["DTYPES", "LatentDiffusionSampler", "NIFTI_DESCRIP_BYTES", "file_sha256", "latent_diffusion_inferer",
           "read_latent_info", "sampling_method_of", "trained_setting"]

logger = logging.getLogger(__name__)

#: names accepted by ``sampling_dtype`` / ``decode_dtype``
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: size of the NIfTI-1 header's ``descrip`` field
NIFTI_DESCRIP_BYTES = 80


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (checkpoint provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_latent_info(latent_info: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The ``<diffusion_model>.json`` the diffusion trainer writes, from a path or a dict.

    Raises:
        FileNotFoundError: the file does not exist (stage 2 has not run).
    """
    if isinstance(latent_info, Mapping):
        return dict(latent_info)
    path = Path(latent_info)
    if not path.is_file():
        raise FileNotFoundError(f"latent info {path} not found: run train_diffusion first (it writes it).")
    return json.loads(path.read_text())


def trained_setting(latent_info: str | Path | Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A setting the diffusion trainer recorded in the latent info (e.g. ``num_classes``), or ``default``.

    Unlike :func:`read_latent_info`, a missing file gives ``default``: network definitions in
    ``inference.json`` use this, and they are built before any training (the zoo's ``verify_net_in_out``).

    Args:
        latent_info: ``<diffusion_model>.json`` (path or dict).
        key: the recorded setting.
        default: value when the file or the key is absent.
    """
    if not isinstance(latent_info, Mapping) and not Path(latent_info).is_file():
        return default
    value = read_latent_info(latent_info).get(key)
    return default if value is None else value


def latent_diffusion_inferer(
    scheduler: nn.Module, latent_info: str | Path | Mapping[str, Any]
) -> LatentDiffusionInferer:
    """MONAI's ``LatentDiffusionInferer`` over a sampling scheduler with the trained latent scale factor.

    Args:
        scheduler: the sampling scheduler.
        latent_info: ``<diffusion_model>.json`` written by the diffusion trainer (path or dict).

    Returns:
        The inferer (``inferer.sample(input_noise=, autoencoder_model=, diffusion_model=)`` works with it).
    """
    info = read_latent_info(latent_info)
    return LatentDiffusionInferer(scheduler=scheduler, scale_factor=float(info["scale_factor"]))


def sampling_method_of(scheduler: nn.Module) -> str:
    """The ``sampling_method`` name of a scheduler instance (``ddpm``, ``ddim``, ``dpmpp_2m``, ``rflow``).

    Raises:
        ValueError: a scheduler of another kind.
    """
    for kind, name in ((DPMSolverMultistepScheduler, "dpmpp_2m"), (DDIMScheduler, "ddim"), (DDPMScheduler, "ddpm"),
                       (RFlowScheduler, "rflow")):
        if isinstance(scheduler, kind):
            return name
    raise ValueError(f"unsupported sampling scheduler {type(scheduler).__name__}: use "
                     "meddiff.schedulers.make_sampling_scheduler (sampling_method ddpm, ddim, dpmpp_2m or rflow).")


def _autoencoder_compression(autoencoder: nn.Module) -> int:
    """Downsampling factor per axis of a MONAI ``VQVAE`` (product of its encoder's strides)."""
    params = getattr(getattr(autoencoder, "encoder", None), "downsample_parameters", None)
    if params is None:
        raise ValueError(f"cannot read the downsampling factor of {type(autoencoder).__name__}: give compression "
                         "(2 ** len(autoencoder_channels) for the bundles' VQ-GAN) with spatial_size.")
    strides = [p[0] for p in params]
    if any(not isinstance(s, int) for s in strides):
        raise ValueError(f"the autoencoder's strides {strides} differ per axis: give compression with spatial_size.")
    return math.prod(strides)


def _denoiser_factors(model: nn.Module) -> list[int]:
    """Downsampling factor of the denoiser per latent axis (H, W, D)."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "downsample_factor"):  # meddiff's pseudo-3D UNet: in-plane only, depth kept
        factor = int(model.downsample_factor)
        return [factor, factor, 1]
    if hasattr(model, "block_out_channels"):  # MONAI's DiffusionModelUNet: every axis
        factor = 2 ** (len(model.block_out_channels) - 1)
        return [factor] * 3
    return [1, 1, 1]


def _check_training_schedule(scheduler: nn.Module, info: Mapping[str, Any], objective: str) -> None:
    """Refuse a sampling scheduler whose ``num_train_timesteps``/``noise_schedule`` differ from the recorded ones.

    Latent info files written before these keys were recorded skip the check.

    Raises:
        ValueError: naming the key and the trained value.
    """
    trained_steps = info.get("num_train_timesteps")
    steps = getattr(scheduler, "num_train_timesteps", None)
    if trained_steps is not None and steps is not None and int(steps) != int(trained_steps):
        raise ValueError(f"num_train_timesteps={int(steps)} but the weights were trained with num_train_timesteps="
                         f"{int(trained_steps)} (latent_info_file): set num_train_timesteps to {int(trained_steps)}.")
    trained_schedule = info.get("noise_schedule")
    if objective != "ddpm" or trained_schedule in (None, "None") or not hasattr(scheduler, "alphas_cumprod"):
        return
    schedule = getattr(scheduler, "noise_schedule", None)
    if schedule is None:  # a scheduler built by hand: compare the schedule itself
        reference = Scheduler(int(scheduler.num_train_timesteps), str(trained_schedule)).alphas_cumprod
        if not torch.allclose(reference.float(), scheduler.alphas_cumprod.float(), atol=1e-6):
            raise ValueError(f"the sampling scheduler's noise schedule is not the one the weights were trained with, "
                             f"noise_schedule={trained_schedule!r} (latent_info_file): build it with that schedule.")
    elif str(schedule) != str(trained_schedule):
        raise ValueError(f"noise_schedule={schedule!r} but the weights were trained with noise_schedule="
                         f"{trained_schedule!r} (latent_info_file): set noise_schedule to {trained_schedule!r}.")


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


class LatentDiffusionSampler:
    """Draw volumes: latent noise -> scheduler loop -> autoencoder decode -> files (or tensors in memory).

    Sample ``i`` uses seed ``seed + i`` (its initial noise and, for stochastic samplers, every step's
    noise come from its own generator), so any sample can be regenerated alone and a volume does not
    depend on ``sample_batch_size``. :meth:`run` writes ``<prefix>_<i>.nii.gz`` (geometry from
    ``spacing``/``axcodes``, the training data's after preprocessing; intensities mapped from
    [-1, 1] back to ``intensity_range``), ``<prefix>_<i>.png`` (mosaic of slices) and
    ``samples.json`` (seeds, sampler, steps, weight hashes). :meth:`generate`, :meth:`sample_latents`
    and :meth:`decode` return tensors without writing files.

    The denoiser runs under autocast in ``sampling_dtype`` (bf16 by default: ~2x faster on CPUs with
    AVX512-BF16/AMX and on GPUs); scheduler arithmetic stays in float32.

    Args:
        autoencoder: trained stage-1 model (``decode_stage_2_outputs``).
        diffusion_model: trained (EMA) denoiser, called as ``model(x, timesteps=)``.
        scheduler: sampling scheduler (``meddiff.schedulers.make_sampling_scheduler``); taken from
            ``inferer`` when ``None``.
        output_dir: folder for :meth:`run`'s outputs.
        latent_info: ``<diffusion_model>.json`` written by the diffusion trainer (path or dict) with
            ``scale_factor``, ``latent_shape`` and (newer runs) ``objective``/``prediction_type``/
            ``num_train_timesteps``/``noise_schedule``, each checked against the scheduler when present.
        spacing: voxel spacing (mm) of the written volumes (needed by :meth:`run`).
        axcodes: orientation codes of the written volumes.
        intensity_range: output intensity range that [-1, 1] maps back to (``None``: keep [-1, 1]).
        num_samples: number of volumes :meth:`run` writes.
        num_inference_steps: network evaluations per volume (``ddpm`` always runs all
            ``num_train_timesteps``).
        seed: base seed: volume ``i`` of :meth:`run` uses ``seed + i``.
        seeds: one seed per volume of :meth:`run`, instead of ``seed`` and ``num_samples`` (the bundle's
            ``dataset``).
        device: device to sample on.
        output_dtype: NIfTI data type (e.g. ``"float32"``, ``"int16"``).
        prefix: file name prefix.
        mosaic_slices: slices in each PNG mosaic.
        mosaic_windows: named display windows (e.g. ``{"lung": [-1350, 150]}``), one
            ``<prefix>_<i>_<name>.png`` each; ``None``: one ``<prefix>_<i>.png`` with a percentile window.
        extra_writers: further outputs, each called as ``writer(volume, affine, stem)`` with the
            volume (1, X, Y, Z) in output units and the path stem (e.g. a DICOM series writer).
        weights_files: files whose SHA-256 goes into ``samples.json``.
        progress: show progress bars.
        clip_latents: clip the scheduler's x0 estimate at every step to the range of the scaled
            training latents (``latent_min``/``latent_max`` in ``latent_info``), as the paper's code
            clamps its normalised latents; without it an imperfect denoiser's x0 estimates at the
            noisiest steps blow up.
        inferer: MONAI ``LatentDiffusionInferer`` (see :func:`latent_diffusion_inferer`); gives the
            scheduler and the scale factor when set.
        sampling_method: expected method name (``ddpm``, ``ddim``, ``dpmpp_2m``, ``rflow``); checked
            against the scheduler and against the trained ``objective``.
        sample_batch_size: volumes denoised together.
        sampling_dtype: autocast dtype of the denoiser (``"bfloat16"``, ``"float16"`` (CUDA) or
            ``"float32"``: no autocast).
        decode_dtype: autocast dtype of the autoencoder decode (``"float32"``: exact).
        compile_model: wrap the denoiser in ``torch.compile``.
        decode_tile_size: latent voxels per decode tile and axis (one value or one per axis), used when
            the output volume has more than ``decode_tile_threshold`` voxels (see
            :class:`meddiff.sampling.tiled_decode.TiledDecoder`); ``None``: the fewest tiles of at most
            ``decode_tile_threshold`` image voxels.
        decode_overlap: latent voxels shared by neighbouring decode tiles (seams blended across them).
        decode_tile_threshold: image voxels per volume above which the decode is tiled (0: always;
            ``None``: never); default 256³.
        spatial_size: image size (H, W, D) to sample; ``None``: the training size (``latent_shape`` in
            ``latent_info``). Any size the autoencoder's compression divides and whose latent the denoiser's
            downsampling accepts (:func:`meddiff.engines.check_sampling_size`); the latent channels come from
            ``latent_info``.
        compression: the autoencoder's downsampling factor per axis (``2 ** len(autoencoder_channels)``); read
            from a MONAI ``VQVAE`` when ``None``. Used only with ``spatial_size``.
        class_label: with class-conditioned weights (``num_classes`` in ``latent_info``): the class name of
            every volume, or a list of names cycled over the volumes (volume ``i`` gets ``class_label[i % len]``,
            keyed by its seed); ``None``: unconditional (the null class). Unconditional weights need ``None``.
        guidance_scale: classifier-free guidance scale ``s``: the loop uses ``uncond + s * (cond - uncond)``
            from one batched pass (``1``: the conditional prediction alone, one pass; ``0``: unconditional).
        guidance_interval: ``[lo, hi]``, the noise levels, as fractions of ``num_train_timesteps``
            (1 = pure noise), at which guidance is applied; elsewhere the step takes the conditional prediction
            alone, one pass (Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
            Distribution Quality in Diffusion Models", 2024). ``[0, 1]`` (default): every step.
        guidance_rescale: ``phi`` of :func:`meddiff.sampling.classifier_free_guidance` (0: plain guidance).
        distributed: shard :meth:`run`'s volumes over the ranks of the initialised ``torch.distributed``
            process group (``configs/multi_gpu_inference.json`` under ``torchrun``): the batches of
            ``sample_batch_size`` volumes go round-robin to the ranks, so a volume is byte-identical to a
            one-process run's; rank 0 merges the manifest. ``output_dir`` must be one folder all ranks see.
        resume: :meth:`run` keeps the volumes an earlier run with the same settings wrote and recorded
            (the SHA-256 of every file in ``samples.json`` or a per-rank part file) and samples only the
            missing or altered ones; false: sample and write everything again.
        sample_spacing: with spacing-conditioned weights (``condition_on_spacing`` in ``latent_info``): the voxel
            spacing (mm per axis) the denoiser is conditioned on and the written volumes get (it replaces
            ``spacing``); ``None``: ``spacing``. A spacing outside the trained ``spacing_range`` is sampled with a
            warning. Weights trained without spacing conditioning need ``None``.

    Raises:
        ValueError: bad counts or dtypes, a scheduler that cannot clip, a ``spatial_size`` that cannot be
            sampled (the message gives the nearest valid sizes), or a sampling method, prediction type,
            ``num_train_timesteps`` or ``noise_schedule`` that does not fit the trained weights (the message
            names the keys and the trained values).
        FileNotFoundError: ``latent_info`` path missing.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        diffusion_model: nn.Module,
        scheduler: nn.Module | None = None,
        output_dir: str | Path | None = None,
        latent_info: str | Path | Mapping[str, Any] | None = None,
        spacing: Sequence[float] | None = None,
        axcodes: str = "RAS",
        intensity_range: Sequence[float] | None = None,
        num_samples: int = 4,
        num_inference_steps: int = 10,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        output_dtype: str = "float32",
        prefix: str = "sample",
        mosaic_slices: int = 16,
        mosaic_windows: Mapping[str, Sequence[float]] | None = None,
        extra_writers: Sequence[Callable[[torch.Tensor, np.ndarray, Path], Any]] = (),
        weights_files: Sequence[str | Path] = (),
        progress: bool = True,
        clip_latents: bool = True,
        inferer: LatentDiffusionInferer | None = None,
        sampling_method: str | None = None,
        sample_batch_size: int = 1,
        sampling_dtype: str = "float32",
        decode_dtype: str = "float32",
        compile_model: bool = False,
        decode_tile_size: int | Sequence[int] | None = None,
        decode_overlap: int | Sequence[int] = 8,
        decode_tile_threshold: int | None = 1 << 24,
        spatial_size: Sequence[int] | None = None,
        compression: int | None = None,
        class_label: str | Sequence[str] | None = None,
        guidance_scale: float = 1.5,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        guidance_rescale: float = 0.0,
        distributed: bool | str = False,
        resume: bool | str = True,
        sample_spacing: Sequence[float] | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if sample_batch_size < 1:
            raise ValueError(f"sample_batch_size must be >= 1, got {sample_batch_size}.")
        if latent_info is None:
            raise ValueError("latent_info is required: the <diffusion_model>.json written by train_diffusion.")
        if scheduler is None:
            if inferer is None:
                raise ValueError("give a sampling scheduler or an inferer holding one.")
            scheduler = inferer.scheduler
        elif inferer is not None and inferer.scheduler is not scheduler:
            raise ValueError("scheduler and inferer.scheduler differ: give one of them.")
        info = read_latent_info(latent_info)
        self.device = torch.device(device)
        self.sampling_dtype = _dtype(sampling_dtype, "sampling_dtype")
        self.decode_dtype = _dtype(decode_dtype, "decode_dtype")
        self.tiled_decoder = TiledDecoder(decode_tile_size, decode_overlap, decode_tile_threshold)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.diffusion_model = diffusion_model.to(self.device).eval()
        self.network = torch.compile(self.diffusion_model) if as_bool(compile_model, "compile_model") else \
            self.diffusion_model
        self.scheduler = scheduler
        self.inferer = inferer
        self.sampling_method = sampling_method_of(scheduler)
        if sampling_method is not None and sampling_method != self.sampling_method:
            raise ValueError(f"sampling_method={sampling_method!r} but the scheduler is a {self.sampling_method!r} "
                             f"sampler ({type(scheduler).__name__}).")
        self.objective = str(info.get("objective", "ddpm"))
        check_sampling_method(self.sampling_method, self.objective)
        _check_training_schedule(scheduler, info, self.objective)
        trained_type = info.get("prediction_type")
        if self.objective == "ddpm" and trained_type not in (None, "None") and \
                str(getattr(scheduler, "prediction_type", trained_type)) != str(trained_type):
            raise ValueError(
                f"prediction_type={scheduler.prediction_type!r} but the weights were trained with prediction_type="
                f"{trained_type!r} (latent_info_file): set prediction_type to {trained_type!r}.")
        self.scale_factor = float(info["scale_factor"]) if inferer is None else float(inferer.scale_factor)
        self.trained_latent_shape = [int(s) for s in info["latent_shape"]]
        self.latent_shape = self._latent_shape(spatial_size, compression)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        self.condition_on_spacing = bool(info.get("condition_on_spacing", False))
        self.sample_spacing = self._conditioning_spacing(sample_spacing, info)
        self.axcodes = axcodes
        self.intensity_range = None if intensity_range is None else [float(v) for v in intensity_range]
        self.seeds = [seed + i for i in range(num_samples)] if seeds is None else [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed.")
        self.num_samples = len(self.seeds)
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.output_dtype = output_dtype
        self.prefix = prefix
        self.mosaic_slices = mosaic_slices
        self.mosaic_windows = dict(mosaic_windows) if mosaic_windows else None
        self.extra_writers = list(extra_writers)
        self.weights_files = [Path(p) for p in weights_files]
        self.progress = as_bool(progress, "progress")
        self.sample_batch_size = int(sample_batch_size)
        self.num_classes = int(info.get("num_classes", 0) or 0)
        self.class_names = [str(c) for c in info.get("class_names", [])]
        self.guidance_scale = float(guidance_scale)
        self.guidance_interval = _guidance_interval(guidance_interval)
        self.guidance_rescale = float(guidance_rescale)
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}.")
        self.sample_classes = resolve_class_labels(class_label, info, self.num_samples)
        self._class_of_seed = dict(zip(reversed(self.seeds), reversed(self.sample_classes)))
        self.distributed = as_bool(distributed, "distributed")
        if self.distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed initialised: run with torchrun and "
                             "configs/multi_gpu_inference.json.")
        self.resume = as_bool(resume, "resume")
        self.latent_range = None
        if as_bool(clip_latents, "clip_latents") and "latent_min" in info:
            self.latent_range = [float(info["latent_min"]), float(info["latent_max"])]
            if hasattr(scheduler, "clip_sample_values"):
                scheduler.clip_sample = True
                scheduler.clip_sample_values = list(self.latent_range)
            else:
                raise ValueError(f"clip_latents needs a scheduler with clip_sample_values, got {type(scheduler).__name__}")

    def _conditioning_spacing(self, sample_spacing: Sequence[float] | None, info: Mapping[str, Any]) -> list[float] | None:
        """The spacing the denoiser is conditioned on (``None``: unconditioned weights); it becomes ``spacing``."""
        if not self.condition_on_spacing:
            if sample_spacing is not None:
                raise ValueError(f"sample_spacing={list(sample_spacing)} but the weights were trained without spacing "
                                 "conditioning (no condition_on_spacing in latent_info_file): leave sample_spacing null "
                                 "(the volumes get pixdim) or train with condition_on_spacing=true.")
            return None
        if not getattr(self.diffusion_model, "condition_on_spacing", False):
            raise ValueError("the weights were trained with condition_on_spacing=true (latent_info_file) but the "
                             f"denoiser {type(self.diffusion_model).__name__} has no spacing input: build diffusion_def "
                             "(@pseudo3d_unet_def) with condition_on_spacing from the latent info.")
        source = "sample_spacing"
        if sample_spacing is None:
            if self.spacing is None:
                raise ValueError("spacing-conditioned weights need sample_spacing (or spacing): the spacing to sample.")
            sample_spacing, source = self.spacing, "spacing (pixdim; give sample_spacing)"
        values = check_spacing(sample_spacing, source)
        trained = info.get("spacing_range")
        if trained and any(not lo - 1e-4 <= v <= hi + 1e-4 for v, lo, hi in zip(values, *trained)):
            logger.warning("sample_spacing %s mm is outside the trained spacing range %s to %s mm "
                           "(latent_info_file): the model extrapolates.", values, trained[0], trained[1])
        self.spacing = values  # the volumes are written at the spacing they were sampled at
        return values

    def _latent_shape(self, spatial_size: Sequence[int] | None, compression: int | None) -> list[int]:
        """The latent shape to sample: channels from ``latent_info``, spatial size from ``spatial_size``."""
        if spatial_size is None:
            return list(self.trained_latent_shape)
        if compression is None:
            compression = _autoencoder_compression(self.autoencoder)
        latent = check_sampling_size(spatial_size, compression, _denoiser_factors(self.diffusion_model),
                                     self.trained_latent_shape[1:])
        return [self.trained_latent_shape[0], *latent]

    @property
    def steps(self) -> int:
        """Network evaluations per volume: ``num_inference_steps``, or every training step for ``ddpm``."""
        if self.sampling_method == "ddpm":
            return int(self.scheduler.num_train_timesteps)
        return self.num_inference_steps

    def _autocast(self, dtype: torch.dtype) -> Any:
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _step(self, output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, next_t: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
        if isinstance(self.scheduler, RFlowScheduler) and not isinstance(self.scheduler, RFlowSampler):
            return self.scheduler.step(output, t, x, next_t)[0]
        return self.scheduler.step(output, t, x, generator=generator)[0]

    @torch.no_grad()
    def sample_latents(self, seeds: Sequence[int], class_labels: Sequence[str | None] | None = None) -> torch.Tensor:
        """Run the sampler for one volume per seed, ``sample_batch_size`` at a time.

        Args:
            seeds: one seed per volume (volume ``i`` of :meth:`run` uses ``seed + i``).
            class_labels: one class name (or ``None``: unconditional) per volume; default: the ``class_label``
                of the volume with that seed (a seed outside ``seeds``: the ``class_label`` list cycled).

        Returns:
            Latents as the denoiser sees them (scaled by ``scale_factor``), (N, C, h, w, d), float32, on ``device``.
        """
        seeds = [int(s) for s in seeds]
        classes = self.classes_of(seeds) if class_labels is None else list(class_labels)
        if len(classes) != len(seeds):
            raise ValueError(f"class_labels must have one entry per seed: {len(classes)} != {len(seeds)}.")
        size = self.sample_batch_size
        return torch.cat([self._sample_chunk(seeds[i:i + size], classes[i:i + size])
                          for i in range(0, len(seeds), size)])

    def classes_of(self, seeds: Sequence[int]) -> list[str | None]:
        """The class name (``None``: unconditional) each seed is sampled with."""
        cycled = self.sample_classes
        return [self._class_of_seed.get(int(s), cycled[j % len(cycled)]) for j, s in enumerate(seeds)]

    def _class_indices(self, classes: Sequence[str | None]) -> torch.Tensor | None:
        """(N,) class indices on ``device`` (the null class ``num_classes`` for ``None``); ``None`` if unconditional."""
        if not self.num_classes:
            return None
        index = {name: i for i, name in enumerate(self.class_names)}
        return torch.tensor([self.num_classes if c is None else index[c] for c in classes], device=self.device)

    def _denoiser(self) -> Callable[..., torch.Tensor]:
        """The denoiser :meth:`_predict` calls, as ``network(x, timesteps=, class_labels=)`` (``class_labels`` only
        with class-conditioned weights; the guided batch is doubled: conditional, then unconditional half).
        Subclasses that steer the denoiser (the ControlNet sampler) override it."""
        return self.network

    def _predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guided: bool) -> torch.Tensor:
        """The denoiser's prediction, with classifier-free guidance when ``guided`` (and the sample spacing)."""
        network = self._denoiser()
        if self.sample_spacing is not None:  # one (1, 3) spacing, broadcast over the (guided: doubled) batch
            network = functools.partial(network, spacing=torch.tensor([self.sample_spacing], device=x.device))
        if labels is None:
            return network(x, timesteps=t)
        if not guided:
            return network(x, timesteps=t, class_labels=labels)
        return classifier_free_guidance(network, x, t, labels, self.num_classes, self.guidance_scale,
                                        self.guidance_rescale)

    def _guided_at(self, t: torch.Tensor) -> bool:
        """Whether timestep ``t`` lies in ``guidance_interval`` (noise level as a fraction of the training steps)."""
        level = float(t) / float(self.scheduler.num_train_timesteps)
        return self.guidance_interval[0] <= level <= self.guidance_interval[1]

    def _sample_chunk(self, seeds: list[int], classes: Sequence[str | None] | None = None) -> torch.Tensor:
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        x = torch.cat([torch.randn((1, *self.latent_shape), generator=g, device=self.device) for g in generators])
        self.scheduler.set_timesteps(self.steps)
        timesteps = self.scheduler.timesteps
        next_timesteps = torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype)))
        per_sample = is_stochastic(self.scheduler) and len(seeds) > 1
        classes = self.classes_of(seeds) if classes is None else list(classes)
        labels = self._class_indices(classes)
        guided = labels is not None and self.guidance_scale != 1.0 and any(c is not None for c in classes)
        for t, next_t in tqdm(list(zip(timesteps, next_timesteps)), desc="denoising", leave=False,
                              disable=not self.progress or self.distributed, dynamic_ncols=True):  # ranks: 1 bar
            t_batch = t.to(self.device).expand(len(seeds))
            with self._autocast(self.sampling_dtype):
                output = self._predict(x, t_batch, labels, guided and self._guided_at(t))
            output = output.float()
            if per_sample:
                x = torch.cat([self._step(output[i:i + 1], t, x[i:i + 1], next_t, g)
                               for i, g in enumerate(generators)])
            else:
                x = self._step(output, t, x, next_t, generators[0])
        return x.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents from :meth:`sample_latents` into images.

        Args:
            latents: (N, C, h, w, d), scaled as the denoiser sees them.

        Returns:
            Images (N, 1, H, W, D) in [-1, 1], float32, on ``device``.
        """
        z = latents.to(self.device).float() / self.scale_factor
        if self.tiled_decoder.applies(self.autoencoder, z):  # large volumes: overlapping tiles, bounded memory
            return self.tiled_decoder(self.autoencoder, z, lambda: self._autocast(self.decode_dtype)).clamp_(-1.0, 1.0)
        if self.decode_dtype != torch.float32 and hasattr(self.autoencoder, "quantize") and \
                hasattr(self.autoencoder, "decode"):
            # VQ-GAN: the nearest-code search stays float32 (a bf16 distance can pick another code)
            codes, _ = self.autoencoder.quantize(z)
            with self._autocast(self.decode_dtype):
                images = self.autoencoder.decode(codes)
        else:
            with self._autocast(self.decode_dtype):
                images = self.autoencoder.decode_stage_2_outputs(z)
        return images.float().clamp(-1.0, 1.0)

    def generate(self, seeds: Sequence[int], class_labels: Sequence[str | None] | None = None) -> torch.Tensor:
        """Sample and decode one volume per seed (no files written).

        Args:
            seeds: one seed per volume.
            class_labels: one class name (``None``: unconditional) per volume; default as :meth:`sample_latents`.

        Returns:
            Images (N, 1, H, W, D) in [-1, 1], float32, on CPU.
        """
        latents = self.sample_latents(seeds, class_labels)
        size = self.sample_batch_size
        return torch.cat([self.decode(latents[i:i + size]).cpu() for i in range(0, len(latents), size)])

    def sample(self, index: int) -> torch.Tensor:
        """Decoded sample ``index`` (seed ``seeds[index]``) in [-1, 1], shape (1, H, W, D), on CPU."""
        return self.generate([self.seeds[index]])[0]

    def nifti_description(self, seed: int, **extra: Any) -> str:
        """The NIfTI ``descrip`` of a generated volume: says it is synthetic, how it was sampled and its seed.

        E.g. ``"SYNTHETIC meddiff rflow10 seed=3"``; ``extra`` items follow as ``key=value`` (e.g.
        ``class=glioma g=3.0``). Cut to the field's 80 bytes (non-ASCII characters become ``?``).

        Args:
            seed: the volume's seed.
            extra: further ``key=value`` items.

        Returns:
            ASCII text of at most :data:`NIFTI_DESCRIP_BYTES` bytes, starting with ``SYNTHETIC``.
        """
        text = " ".join(["SYNTHETIC meddiff", f"{self.sampling_method}{self.steps}", f"seed={int(seed)}",
                         *(f"{key}={value}" for key, value in extra.items())])
        text = text.encode("ascii", "replace").decode("ascii")
        if len(text) > NIFTI_DESCRIP_BYTES:
            logger.warning("NIfTI description cut to %d bytes: %r", NIFTI_DESCRIP_BYTES, text)
        return text[:NIFTI_DESCRIP_BYTES]

    def run(self) -> list[Path]:
        """Sample, write every volume and the manifest ``samples.json``; returns the NIfTI paths.

        Volumes are sampled in batches of ``sample_batch_size`` (volume ``i``: seed ``seeds[i]``). With
        ``distributed``, rank ``r`` of ``W`` takes batches ``r, r + W, ...`` and writes only their files.
        After every batch a rank records its files' SHA-256 in a part file ``samples.part-rank<r>-*.json``
        (what a preempted run leaves behind); at the end the ranks' records are gathered and rank 0 writes
        ``samples.json`` (atomically) and removes the part files. With ``resume``,
        a volume whose files an earlier run with the same settings recorded and whose hashes still match is
        kept (its files are not rewritten); a batch with a missing or altered volume is sampled again
        whole, so the new volume is byte-identical to an uninterrupted run's, and only that volume's files
        are written.

        Returns:
            The NIfTI paths of this rank's volumes (all of them in a one-process run).

        Raises:
            ValueError: ``output_dir`` or ``spacing`` not given.
        """
        provenance = self._start_run()
        earlier = self._earlier_records(provenance) if self.resume else {}

        def sample(chunk: list[int]) -> dict[int, tuple[dict[str, Any], bool]]:
            done = {i: (earlier[i], False) for i in chunk if i in earlier and self._verified(earlier[i])}
            if len(done) < len(chunk):
                tic = time.perf_counter()
                volumes = self.generate([self.seeds[i] for i in chunk])  # the whole batch: same bytes as before
                seconds = (time.perf_counter() - tic) / len(chunk)
                for i, volume in zip(chunk, volumes):
                    if i in done:
                        continue
                    files = self._write(i, volume)
                    record = {"file": files[0].name, "seed": self.seeds[i], "seconds": round(seconds, 2),
                              "sha256": {self._relative(f): file_sha256(f) for f in files}}
                    if self.num_classes:
                        record["class_label"] = self.sample_classes[i]
                    done[i] = (record, True)
            return done

        indices = list(range(self.num_samples))
        chunks = [indices[i:i + self.sample_batch_size] for i in range(0, len(indices), self.sample_batch_size)]
        return self._run_chunks(chunks, sample, provenance, "samples")

    def _start_run(self) -> dict[str, Any]:
        """Check that :meth:`run` can write, make ``output_dir``; returns this run's provenance."""
        if self.output_dir is None or self.spacing is None:
            raise ValueError("run() writes files: give output_dir and spacing.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return self._provenance()

    def _run_chunks(self, chunks: list[list[Hashable]],
                    sample: Callable[[list[Hashable]], dict[Hashable, tuple[dict[str, Any], bool]]],
                    provenance: dict[str, Any], what: str) -> list[Path]:
        """The batches of a run shared over the ranks, with part files, progress and the merged manifest.

        Rank ``r`` of ``W`` takes ``chunks[r::W]``; ``sample(chunk)`` returns ``{key: (record, newly written)}`` for
        each key of the chunk. After a chunk with new volumes the rank's records go to its part file
        ``samples.part-rank<r>-*.json``; at the end the ranks' records are gathered and rank 0 writes the
        manifests (:meth:`_write_manifests`, records sorted by key) and removes the part files.

        Returns:
            The image paths of this rank's volumes, in chunk order.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        mine = chunks[rank::world]
        tag = f"rank {rank}/{world}: " if world > 1 else ""
        part = self.output_dir / f"samples.part-rank{rank}-pid{os.getpid()}.json"
        records: dict[Hashable, dict[str, Any]] = {}
        written: list[Path] = []
        generated = 0
        position = int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else None
        with tqdm(total=sum(len(c) for c in mine), desc=f"{tag}sampling", disable=not self.progress, dynamic_ncols=True,
                  position=position) as bar:  # closed before an error reaches the terminal
            for chunk in mine:
                done = sample(chunk)
                new = sum(is_new for _, is_new in done.values())
                records.update({key: record for key, (record, _) in done.items()})
                written.extend(self.output_dir / done[key][0]["file"] for key in chunk)
                generated += new
                bar.update(len(chunk))
                if new:
                    atomic_write_json(part, {**provenance, "samples": [records[key] for key in sorted(records)]})
        logger.info("%s%d %s written, %d kept from an earlier run, in %s", tag, generated, what,
                    sum(len(c) for c in mine) - generated, self.output_dir)
        if self.distributed:
            gathered: list[dict[Hashable, dict[str, Any]] | None] = [None] * world
            dist.all_gather_object(gathered, records)
            records = {key: r for rank_records in gathered for key, r in rank_records.items()}
        if rank == 0:
            self._write_manifests(provenance, [records[key] for key in sorted(records)])
            for path in self.output_dir.glob("samples.part-rank*.json"):
                path.unlink(missing_ok=True)
        if self.distributed:
            dist.barrier()  # the manifests exist on return, on every rank
        return written

    def _write_manifests(self, provenance: Mapping[str, Any], records: list[dict[str, Any]]) -> None:
        """Rank 0, at the end of :meth:`run`: ``samples.json`` (atomically) with every rank's records."""
        atomic_write_json(self.output_dir / "samples.json",
                          {**provenance, "samples": records, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _provenance(self) -> dict[str, Any]:
        """Manifest fields of this run's settings; a recorded volume is reused only when they are unchanged."""
        return {
            "synthetic": True,
            "note": "Synthetic images generated by a diffusion model; not for diagnosis.",
            "scheduler": type(self.scheduler).__name__,
            "sampling_method": self.sampling_method,
            "objective": self.objective,
            "num_inference_steps": self.steps,
            "sample_batch_size": self.sample_batch_size,
            "sampling_dtype": str(self.sampling_dtype).replace("torch.", ""),
            "decode_dtype": str(self.decode_dtype).replace("torch.", ""),
            "decode_tiling": {"tile_size": self.tiled_decoder.tile_size, "overlap": self.tiled_decoder.overlap,
                              "threshold": self.tiled_decoder.threshold},
            "scale_factor": self.scale_factor,
            "latent_shape": self.latent_shape,
            "latent_clip_range": self.latent_range,
            "spacing": self.spacing,
            "axcodes": self.axcodes,
            "intensity_range": self.intensity_range,
            "output_dtype": str(self.output_dtype),
            "prefix": self.prefix,
            "weights": {p.name: file_sha256(p) for p in self.weights_files if p.is_file()},
            "meddiff_version": meddiff.__version__,
            **({"num_classes": self.num_classes, "class_names": self.class_names, "guidance_scale": self.guidance_scale,
                "guidance_interval": self.guidance_interval, "guidance_rescale": self.guidance_rescale,
                "class_labels": self.sample_classes} if self.num_classes else {}),
            **({"condition_on_spacing": True, "sample_spacing": self.sample_spacing}
               if self.sample_spacing is not None else {}),
        }

    def _class_fields(self, index: int) -> dict[str, Any]:
        """NIfTI description items of volume ``index``'s class: ``class=<name> g=<guidance_scale>`` (or
        ``class=uncond``); none for unconditional weights."""
        if not self.num_classes:
            return {}
        name = self.sample_classes[index]
        if name is None:
            return {"class": "uncond"}
        return {"class": name.replace(" ", "_"), "g": f"{self.guidance_scale:g}"}

    def _manifests(self) -> list[Path]:
        """``samples.json`` and the per-rank part files left in ``output_dir``, oldest first."""
        paths = list(self.output_dir.glob("samples.part-rank*.json"))
        whole = self.output_dir / "samples.json"
        paths.sort(key=lambda p: p.stat().st_mtime)
        return ([whole] if whole.is_file() else []) + paths

    @staticmethod
    def _matching_manifests(provenance: Mapping[str, Any], paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
        """The manifests among ``paths`` written with the settings ``provenance`` (others are skipped and logged)."""
        provenance = json.loads(json.dumps(provenance))  # as read back (tuples become lists)
        for path in paths:
            try:
                manifest = json.loads(path.read_text())
            except (OSError, ValueError):
                logger.warning("ignoring unreadable manifest %s", path)
                continue
            if not isinstance(manifest, dict):
                continue
            changed = sorted(k for k in provenance if manifest.get(k) != provenance[k])
            if changed:
                logger.info("%s was written with other settings (%s): its volumes are sampled again", path,
                            ", ".join(changed))
                continue
            yield manifest

    def _earlier_records(self, provenance: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
        """Records of earlier runs with the same settings, by volume index (files not yet verified)."""
        names = {f"{self.prefix}_{i:03d}.nii.gz": i for i in range(self.num_samples)}
        found: dict[int, dict[str, Any]] = {}
        for manifest in self._matching_manifests(provenance, self._manifests()):
            for record in manifest.get("samples", []):
                i = names.get(record.get("file"))
                if i is not None and record.get("seed") == self.seeds[i] and record.get("sha256"):
                    found[i] = record
        return found

    def _verified(self, record: Mapping[str, Any]) -> bool:
        """Whether every file of a record exists with its recorded SHA-256."""
        for name, digest in record["sha256"].items():
            path = self.output_dir / name
            if not path.is_file() or file_sha256(path) != digest:
                logger.info("%s is missing or altered: sampling seed %s again", path, record["seed"])
                return False
        return True

    def _relative(self, path: Path) -> str:
        return Path(path).relative_to(self.output_dir).as_posix()

    def _write(self, index: int, volume: torch.Tensor) -> list[Path]:
        """Write volume ``index`` (NIfTI, PNG mosaics, extra writers' outputs); returns the files, NIfTI first."""
        if self.intensity_range is not None:
            volume = scale_from_unit_range(volume, *self.intensity_range)
        affine = affine_from_geometry(self.spacing, self.axcodes, spatial_size=volume.shape[1:])
        stem = self.output_dir / f"{self.prefix}_{index:03d}"
        nifti = save_nifti(volume, affine, stem.with_name(stem.name + ".nii.gz"), dtype=self.output_dtype,
                           description=self.nifti_description(self.seeds[index], **self._class_fields(index)))
        files = [nifti, *self._write_mosaics_and_extras(volume, affine, stem)]
        logger.info("wrote %s", nifti)
        return files

    def _write_mosaics_and_extras(self, volume: torch.Tensor, affine: np.ndarray, stem: Path) -> list[Path]:
        """PNG mosaics (``<stem>.png``, or ``<stem>_<window>.png`` per ``mosaic_windows``) and the extra writers'
        outputs of one volume in output units; returns their files."""
        files = []
        if self.mosaic_windows is None:
            files.append(save_mosaic_png(volume, stem.with_name(stem.name + ".png"), num_slices=self.mosaic_slices))
        else:  # e.g. the CT bundle's lung / soft-tissue windows
            for name, window in self.mosaic_windows.items():
                files.append(save_mosaic_png(volume, stem.with_name(f"{stem.name}_{name}.png"),
                                             num_slices=self.mosaic_slices, window=(float(window[0]), float(window[1]))))
        for writer in self.extra_writers:
            files.extend(_output_files(writer(volume, affine, stem)))
        return files


def _guidance_interval(interval: Sequence[float]) -> list[float]:
    """``guidance_interval`` checked: two fractions ``0 <= lo <= hi <= 1``."""
    values = [float(v) for v in interval] if isinstance(interval, Sequence) and not isinstance(interval, str) else []
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1 (fractions of "
                         f"num_train_timesteps, 1 = pure noise), got {interval!r}.")
    return values


def _output_files(output: Any) -> list[Path]:
    """The files an extra writer returned: a path, a folder (its files) or several of them; ``None``: none."""
    if output is None:
        return []
    if isinstance(output, (str, Path)):
        path = Path(output)
        return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [f for item in output for f in _output_files(item)]
