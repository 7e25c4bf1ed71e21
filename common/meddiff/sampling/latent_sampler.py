# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sample volumes from a trained latent diffusion model, decode them and write NIfTI + PNG with provenance."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import LatentDiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from torch import nn
from tqdm import tqdm

import meddiff
from meddiff.data.writers import affine_from_geometry, save_mosaic_png, save_nifti
from meddiff.schedulers import DPMSolverMultistepScheduler, RFlowSampler, check_sampling_method, is_stochastic
from meddiff.transforms.intensity import scale_from_unit_range
from meddiff.utils import as_bool, atomic_write_json

__all__ = ["DTYPES", "LatentDiffusionSampler", "file_sha256", "latent_diffusion_inferer", "read_latent_info",
           "sampling_method_of"]

logger = logging.getLogger(__name__)

#: names accepted by ``sampling_dtype`` / ``decode_dtype``
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            ``scale_factor``, ``latent_shape`` and (newer runs) ``objective``/``prediction_type``.
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

    Raises:
        ValueError: bad counts or dtypes, a scheduler that cannot clip, or a sampling method or
            prediction type that does not fit the trained weights (the message names the keys).
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
        trained_type = info.get("prediction_type")
        if self.objective == "ddpm" and trained_type not in (None, "None") and \
                str(getattr(scheduler, "prediction_type", trained_type)) != str(trained_type):
            raise ValueError(
                f"prediction_type={scheduler.prediction_type!r} but the weights were trained with prediction_type="
                f"{trained_type!r} (latent_info_file): set prediction_type to {trained_type!r}.")
        self.scale_factor = float(info["scale_factor"]) if inferer is None else float(inferer.scale_factor)
        self.latent_shape = [int(s) for s in info["latent_shape"]]
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.spacing = None if spacing is None else [float(s) for s in spacing]
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
        self.latent_range = None
        if as_bool(clip_latents, "clip_latents") and "latent_min" in info:
            self.latent_range = [float(info["latent_min"]), float(info["latent_max"])]
            if hasattr(scheduler, "clip_sample_values"):
                scheduler.clip_sample = True
                scheduler.clip_sample_values = list(self.latent_range)
            else:
                raise ValueError(f"clip_latents needs a scheduler with clip_sample_values, got {type(scheduler).__name__}")

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
    def sample_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """Run the sampler for one volume per seed, ``sample_batch_size`` at a time.

        Args:
            seeds: one seed per volume (volume ``i`` of :meth:`run` uses ``seed + i``).

        Returns:
            Latents as the denoiser sees them (scaled by ``scale_factor``), (N, C, h, w, d), float32, on ``device``.
        """
        seeds = [int(s) for s in seeds]
        chunks = [seeds[i:i + self.sample_batch_size] for i in range(0, len(seeds), self.sample_batch_size)]
        return torch.cat([self._sample_chunk(chunk) for chunk in chunks])

    def _sample_chunk(self, seeds: list[int]) -> torch.Tensor:
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        x = torch.cat([torch.randn((1, *self.latent_shape), generator=g, device=self.device) for g in generators])
        self.scheduler.set_timesteps(self.steps)
        timesteps = self.scheduler.timesteps
        next_timesteps = torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype)))
        per_sample = is_stochastic(self.scheduler) and len(seeds) > 1
        for t, next_t in tqdm(list(zip(timesteps, next_timesteps)), desc="denoising", leave=False,
                              disable=not self.progress, dynamic_ncols=True):
            t_batch = t.to(self.device).expand(len(seeds))
            with self._autocast(self.sampling_dtype):
                output = self.network(x, timesteps=t_batch)
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

    def generate(self, seeds: Sequence[int]) -> torch.Tensor:
        """Sample and decode one volume per seed (no files written).

        Args:
            seeds: one seed per volume.

        Returns:
            Images (N, 1, H, W, D) in [-1, 1], float32, on CPU.
        """
        latents = self.sample_latents(seeds)
        size = self.sample_batch_size
        return torch.cat([self.decode(latents[i:i + size]).cpu() for i in range(0, len(latents), size)])

    def sample(self, index: int) -> torch.Tensor:
        """Decoded sample ``index`` (seed ``seeds[index]``) in [-1, 1], shape (1, H, W, D), on CPU."""
        return self.generate([self.seeds[index]])[0]

    def run(self) -> list[Path]:
        """Sample, write every volume and the manifest; returns the NIfTI paths.

        Raises:
            ValueError: ``output_dir`` or ``spacing`` not given.
        """
        if self.output_dir is None or self.spacing is None:
            raise ValueError("run() writes files: give output_dir and spacing.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        records = []
        indices = list(range(self.num_samples))
        chunks = [indices[i:i + self.sample_batch_size] for i in range(0, len(indices), self.sample_batch_size)]
        bar = tqdm(total=self.num_samples, desc="sampling", disable=not self.progress, dynamic_ncols=True)
        for chunk in chunks:
            tic = time.perf_counter()
            volumes = self.generate([self.seeds[i] for i in chunk])
            seconds = (time.perf_counter() - tic) / len(chunk)
            for i, volume in zip(chunk, volumes):
                written.append(self._write(i, volume))
                records.append({"file": written[-1].name, "seed": self.seeds[i], "seconds": round(seconds, 2)})
                bar.update(1)
        bar.close()
        atomic_write_json(self.output_dir / "samples.json", {
            "synthetic": True,
            "note": "Synthetic images generated by a diffusion model; not for diagnosis.",
            "samples": records,
            "scheduler": type(self.scheduler).__name__,
            "sampling_method": self.sampling_method,
            "objective": self.objective,
            "num_inference_steps": self.steps,
            "sample_batch_size": self.sample_batch_size,
            "sampling_dtype": str(self.sampling_dtype).replace("torch.", ""),
            "decode_dtype": str(self.decode_dtype).replace("torch.", ""),
            "scale_factor": self.scale_factor,
            "latent_shape": self.latent_shape,
            "latent_clip_range": self.latent_range,
            "spacing": self.spacing,
            "axcodes": self.axcodes,
            "weights": {p.name: file_sha256(p) for p in self.weights_files if p.is_file()},
            "meddiff_version": meddiff.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        logger.info("%d samples written to %s", len(written), self.output_dir)
        return written

    def _write(self, index: int, volume: torch.Tensor) -> Path:
        if self.intensity_range is not None:
            volume = scale_from_unit_range(volume, *self.intensity_range)
        affine = affine_from_geometry(self.spacing, self.axcodes, spatial_size=volume.shape[1:])
        stem = self.output_dir / f"{self.prefix}_{index:03d}"
        nifti = save_nifti(volume, affine, stem.with_name(stem.name + ".nii.gz"), dtype=self.output_dtype)
        if self.mosaic_windows is None:
            save_mosaic_png(volume, stem.with_name(stem.name + ".png"), num_slices=self.mosaic_slices)
        else:
            for name, window in self.mosaic_windows.items():
                save_mosaic_png(volume, stem.with_name(f"{stem.name}_{name}.png"), num_slices=self.mosaic_slices,
                                window=(float(window[0]), float(window[1])))
        for writer in self.extra_writers:
            writer(volume, affine, stem)
        logger.info("wrote %s", nifti)
        return nifti
