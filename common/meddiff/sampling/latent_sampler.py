# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Sample volumes from a trained latent DDPM, decode them and write NIfTI + PNG with provenance."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import LatentDiffusionInferer
from torch import nn
from tqdm import tqdm

import meddiff
from meddiff.sampling.writers import affine_from_geometry, save_mosaic_png, save_nifti
from meddiff.transforms.intensity import scale_from_unit_range
from meddiff.utils import as_bool, atomic_write_json

__all__ = ["LatentDiffusionSampler", "file_sha256"]

logger = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (checkpoint provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LatentDiffusionSampler:
    """Draw ``num_samples`` volumes: latent noise -> scheduler loop -> autoencoder decode -> files.

    Sample ``i`` uses seed ``seed + i``, so any sample can be regenerated alone. Each sample is
    written as ``<prefix>_<i>.nii.gz`` (geometry from ``spacing``/``axcodes``, the training data's
    after preprocessing; intensities mapped from [-1, 1] back to ``intensity_range``) and
    ``<prefix>_<i>.png`` (mosaic of slices); ``samples.json`` records seeds, steps and weight hashes.

    Args:
        autoencoder: trained stage-1 model (``decode_stage_2_outputs``).
        diffusion_model: trained (EMA) denoiser.
        scheduler: MONAI scheduler used for sampling (DDIM by default in the configs).
        output_dir: folder for the outputs.
        latent_info: ``<diffusion_model>.json`` written by the diffusion trainer (path or dict) with
            ``scale_factor`` and ``latent_shape``.
        spacing: voxel spacing (mm) of the written volumes.
        axcodes: orientation codes of the written volumes.
        intensity_range: output intensity range that [-1, 1] maps back to (``None``: keep [-1, 1]).
        num_samples: number of volumes.
        num_inference_steps: scheduler steps.
        seed: base seed.
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
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        diffusion_model: nn.Module,
        scheduler: nn.Module,
        output_dir: str | Path,
        latent_info: str | Path | dict[str, Any],
        spacing: Sequence[float],
        axcodes: str = "RAS",
        intensity_range: Sequence[float] | None = None,
        num_samples: int = 4,
        num_inference_steps: int = 50,
        seed: int = 0,
        device: str | torch.device = "cpu",
        output_dtype: str = "float32",
        prefix: str = "sample",
        mosaic_slices: int = 16,
        mosaic_windows: Mapping[str, Sequence[float]] | None = None,
        extra_writers: Sequence[Callable[[torch.Tensor, np.ndarray, Path], Any]] = (),
        weights_files: Sequence[str | Path] = (),
        progress: bool = True,
        clip_latents: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if not isinstance(latent_info, dict):
            path = Path(latent_info)
            if not path.is_file():
                raise FileNotFoundError(f"latent info {path} not found: run train_diffusion first (it writes it).")
            latent_info = json.loads(path.read_text())
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.diffusion_model = diffusion_model.to(self.device).eval()
        self.scheduler = scheduler
        self.output_dir = Path(output_dir)
        self.scale_factor = float(latent_info["scale_factor"])
        self.latent_shape = [int(s) for s in latent_info["latent_shape"]]
        self.spacing = [float(s) for s in spacing]
        self.axcodes = axcodes
        self.intensity_range = None if intensity_range is None else [float(v) for v in intensity_range]
        self.num_samples = num_samples
        self.num_inference_steps = num_inference_steps
        self.seed = seed
        self.output_dtype = output_dtype
        self.prefix = prefix
        self.mosaic_slices = mosaic_slices
        self.mosaic_windows = dict(mosaic_windows) if mosaic_windows else None
        self.extra_writers = list(extra_writers)
        self.weights_files = [Path(p) for p in weights_files]
        self.progress = as_bool(progress, "progress")
        self.latent_range = None
        if as_bool(clip_latents, "clip_latents") and "latent_min" in latent_info:
            self.latent_range = [float(latent_info["latent_min"]), float(latent_info["latent_max"])]
            if hasattr(scheduler, "clip_sample_values"):
                scheduler.clip_sample = True
                scheduler.clip_sample_values = list(self.latent_range)
            else:
                raise ValueError(f"clip_latents needs a scheduler with clip_sample_values, got {type(scheduler).__name__}")

    @torch.no_grad()
    def sample(self, index: int) -> torch.Tensor:
        """Decoded sample ``index`` in [-1, 1], shape (1, H, W, D)."""
        self.scheduler.set_timesteps(num_inference_steps=self.num_inference_steps)
        inferer = LatentDiffusionInferer(scheduler=self.scheduler, scale_factor=self.scale_factor)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed + index)
            noise = torch.randn((1, *self.latent_shape), device=self.device)
            image = inferer.sample(input_noise=noise, autoencoder_model=self.autoencoder,
                                   diffusion_model=self.diffusion_model, scheduler=self.scheduler,
                                   verbose=self.progress)
        return image[0].clamp(-1.0, 1.0).float().cpu()

    def run(self) -> list[Path]:
        """Sample, write every volume and the manifest; returns the NIfTI paths."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        records = []
        for i in tqdm(range(self.num_samples), desc="sampling", disable=not self.progress, dynamic_ncols=True):
            tic = time.perf_counter()
            volume = self.sample(i)
            if self.intensity_range is not None:
                volume = scale_from_unit_range(volume, *self.intensity_range)
            affine = affine_from_geometry(self.spacing, self.axcodes, spatial_size=volume.shape[1:])
            stem = self.output_dir / f"{self.prefix}_{i:03d}"
            nifti = save_nifti(volume, affine, stem.with_name(stem.name + ".nii.gz"), dtype=self.output_dtype)
            if self.mosaic_windows is None:
                save_mosaic_png(volume, stem.with_name(stem.name + ".png"), num_slices=self.mosaic_slices)
            else:
                for name, window in self.mosaic_windows.items():
                    save_mosaic_png(volume, stem.with_name(f"{stem.name}_{name}.png"), num_slices=self.mosaic_slices,
                                    window=(float(window[0]), float(window[1])))
            for writer in self.extra_writers:
                writer(volume, affine, stem)
            written.append(nifti)
            records.append({"file": nifti.name, "seed": self.seed + i, "seconds": round(time.perf_counter() - tic, 2)})
            logger.info("wrote %s", nifti)
        atomic_write_json(self.output_dir / "samples.json", {
            "synthetic": True,
            "note": "Synthetic images generated by a diffusion model; not for diagnosis.",
            "samples": records,
            "scheduler": type(self.scheduler).__name__,
            "num_inference_steps": self.num_inference_steps,
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
