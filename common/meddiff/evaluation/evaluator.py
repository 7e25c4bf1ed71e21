# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Evaluate a trained generation bundle: reconstruction, diversity, distribution distance, memorization audit.

Built from ``configs/evaluate.json`` (shared by the MRI and CT bundles) and run by ``python -m monai.bundle run``;
:meth:`GenerationEvaluator.run` writes ``metrics.json`` and a self-contained ``report.html`` to ``output_dir``.

Data seen by each metric (all volumes after the bundle's ``preprocessing``, i.e. in [-1, 1] on the training grid;
synthetic NIfTI files are reoriented to ``axcodes`` and mapped from ``intensity_range`` back to [-1, 1]):

* reconstruction: validation volumes through the autoencoder, compared in data units (``intensity_range``);
* diversity (MS-SSIM), MMD and FID: synthetic volumes against the **training** volumes (the distribution the model
  was fitted to), intensities scaled to [0, 1];
* memorization: every synthetic volume against every training volume, with validation volumes as the baseline.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage, Orientation, ScaleIntensityRange
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import meddiff
from meddiff.data.errors import DataError
from meddiff.evaluation import report as rpt
from meddiff.evaluation.fidelity import ConditioningFidelity
from meddiff.metrics import (
    DEFAULT_MSSSIM_WEIGHTS,
    FeatureExtractor,
    MemorizationAudit,
    audit_downsample_factor,
    fid_score,
    load_feature_network,
    mmd_score,
    not_computed,
    pairwise_msssim,
    pooled_intensities,
    random_pairs,
    reconstruction_metrics,
    summarize,
    to_audit_grid,
)
from meddiff.sampling.latent_sampler import file_sha256
from meddiff.transforms.intensity import scale_from_unit_range
from meddiff.utils import atomic_write_json, atomic_write_text, is_temporary

__all__ = ["GenerationEvaluator", "json_safe"]

logger = logging.getLogger(__name__)

AUDIT_DEFINITION = (
    "Image space: similarity = max over integer translations t with |t_k| <= max_shift (audit-grid voxels) of the "
    "Pearson correlation between the query window moved by t and the training volume's central crop (cropped by "
    "max_shift per side), on volumes average-pooled by downsample_factor. Feature space: cosine similarity of "
    "feature vectors centred on the mean training feature vector. Baseline: each validation volume's similarity to its nearest training volume. A synthetic "
    "volume is flagged in a space when its nearest-training similarity is strictly greater than the given "
    "percentile (linear interpolation) of the baseline; it is flagged overall if flagged in one of flag_spaces."
)


def json_safe(obj: Any) -> Any:
    """Recursively make ``obj`` strict JSON: ``inf``/``-inf`` -> ``"inf"``/``"-inf"``, NaN -> ``None``, tensors and
    numpy values -> Python lists and scalars, paths -> strings."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        if np.isnan(value):
            return None
        if np.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _first(batch: list[Any]) -> Any:
    return batch[0]


def _item_paths(dataset: Any) -> list[str]:
    data = getattr(dataset, "data", None)
    paths = []
    for k in range(len(dataset)):
        item = data[k] if data is not None and k < len(data) else None
        image = item.get("image") if isinstance(item, Mapping) else item
        paths.append(str(image) if isinstance(image, (str, os.PathLike)) else f"volume_{k:03d}")
    return paths


def _short_names(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common folder (the file name for a single path)."""
    if not paths:
        return []
    try:
        root = os.path.commonpath([os.path.dirname(p) or "." for p in paths])
    except ValueError:
        return [os.path.basename(p) for p in paths]
    return [os.path.relpath(p, root) if root else p for p in paths]


class _Collected:
    """What one pass over a set of volumes keeps: audit-grid volumes, pooled vectors, features, a few slices."""

    def __init__(self) -> None:
        self.grid: list[torch.Tensor] = []
        self.pooled: list[torch.Tensor] = []
        self.features: list[torch.Tensor] = []
        self.full: dict[int, torch.Tensor] = {}
        self.slices: list[list[np.ndarray]] = []

    def stacked(self, name: str) -> torch.Tensor | None:
        values = getattr(self, name)
        return torch.cat(values) if values else None


class GenerationEvaluator:
    """Evaluate the autoencoder, the synthetic volumes and their privacy; write ``metrics.json`` and ``report.html``.

    Metrics (definitions in ``meddiff.metrics``): PSNR/SSIM/MAE of validation reconstructions in data units;
    MS-SSIM of random synthetic pairs and of random real pairs (Khader et al.'s diversity measure); MMD on pooled
    intensities, and MMD and FID on network features when ``feature_weights`` is given (FID is otherwise recorded as
    not computed, with the reason); the memorization audit of
    :class:`meddiff.metrics.MemorizationAudit` in image space and in feature space (the feature network, or the
    autoencoder's ``encode_stage_2_inputs`` latents without feature weights).

    Args:
        autoencoder: trained stage-1 model (``forward`` returns the reconstruction first; ``encode_stage_2_inputs``).
        train_dataset: preprocessed training items (``{"image": (1, H, W, D) in [-1, 1]}``), e.g. a MONAI
            ``Dataset``; its ``data`` attribute (the datalist items) names the volumes.
        val_dataset: preprocessed validation items, likewise.
        synthetic_dir: folder of synthetic NIfTI volumes in data units (the inference workflow's ``output_dir``).
        output_dir: folder for ``metrics.json`` and ``report.html``.
        intensity_range: data units that [-1, 1] maps to (the bundle's ``intensity_range``).
        spatial_size: expected volume shape after preprocessing; ``None``: that of the first training volume.
        spacing: expected voxel spacing of the synthetic files (mm); a mismatch is logged as a warning.
        axcodes: orientation the synthetic files are brought to before comparison.
        intensity_units: label of the data units in the report (e.g. ``"HU"``).
        synthetic_pattern: glob of the synthetic files inside ``synthetic_dir``.
        device: where to run the networks and metrics.
        num_pairs: random pairs for MS-SSIM, for synthetic and for real volumes each.
        pair_seed: seed of the pair draw.
        msssim_kernel_size: MS-SSIM Gaussian window (shrunk with the scales for small volumes).
        msssim_weights: MS-SSIM per-scale weights, finest first.
        ssim_kernel_size: SSIM window of the reconstruction metric.
        mmd_grid: grid the volumes are average-pooled to for the intensity MMD.
        audit_max_shift: translations searched by the audit, in audit-grid voxels (int or three ints).
        audit_max_size: the audit works on volumes average-pooled by the smallest integer factor that brings the
            largest axis to at most this size.
        audit_percentile: baseline percentile of the flag rule.
        audit_flag_spaces: spaces whose flags count for the overall flag (``"image"``, ``"feature"``).
        feature_network: network giving feature vectors (e.g. ``resnet10(feed_forward=False)``), or ``None``.
        feature_weights: local weights file of ``feature_network``; ``None``: no FID, no feature MMD.
        weights_files: name -> checkpoint path whose SHA-256 goes into ``metrics.json`` (missing files noted).
        config: bundle settings recorded verbatim in ``metrics.json``.
        report_num_samples: volumes shown in the sample and reconstruction figures.
        report_num_pairs: closest synthetic/training pairs shown.
        num_workers: data loader workers for the real volumes.
        progress: show progress bars.
        segmentation_bundle: a MONAI segmentation bundle folder; set, every synthetic image is segmented with it
            and scored against the conditioning label map written beside it (``<case>_<k>_label.nii.gz`` next to
            ``<case>_<k>_image.nii.gz``): Dice per label (:class:`meddiff.evaluation.ConditioningFidelity`).
            ``None``: no conditioning fidelity.
        segmentation_label_map: conditioning label -> segmenter label(s); ``None``: identity.
        segmentation_model_file: weights of the segmentation bundle; ``None``: the bundle's own.

    Raises:
        ValueError: on bad settings (non-positive counts, percentile outside [0, 100], feature weights without a
            feature network, an empty intensity range).
        FileNotFoundError: ``segmentation_bundle`` is not a folder or lacks ``configs/inference.json`` or its weights.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        train_dataset: Any,
        val_dataset: Any,
        synthetic_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        intensity_range: Sequence[float],
        spatial_size: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        axcodes: str = "RAS",
        intensity_units: str = "data units",
        synthetic_pattern: str = "sample_*.nii.gz",
        device: str | torch.device = "cpu",
        num_pairs: int = 100,
        pair_seed: int = 0,
        msssim_kernel_size: int = 7,
        msssim_weights: Sequence[float] = DEFAULT_MSSSIM_WEIGHTS,
        ssim_kernel_size: int = 11,
        mmd_grid: Sequence[int] = (16, 16, 16),
        audit_max_shift: int | Sequence[int] = 2,
        audit_max_size: int = 64,
        audit_percentile: float = 95.0,
        audit_flag_spaces: Sequence[str] = ("image",),
        feature_network: nn.Module | None = None,
        feature_weights: str | os.PathLike | None = None,
        weights_files: Mapping[str, str | os.PathLike | None] | None = None,
        config: Mapping[str, Any] | None = None,
        report_num_samples: int = 4,
        report_num_pairs: int = 4,
        num_workers: int = 0,
        progress: bool = True,
        segmentation_bundle: str | os.PathLike | None = None,
        segmentation_label_map: Mapping[Any, Any] | None = None,
        segmentation_model_file: str | os.PathLike | None = None,
    ) -> None:
        low, high = (float(v) for v in intensity_range)
        if low == high:
            raise ValueError(f"intensity_range must have two different values, got {list(intensity_range)}.")
        if num_pairs < 0 or report_num_samples < 0 or report_num_pairs < 0 or audit_max_size < 1:
            raise ValueError("num_pairs, report_num_samples, report_num_pairs must be >= 0 and audit_max_size >= 1, "
                             f"got {num_pairs}, {report_num_samples}, {report_num_pairs}, {audit_max_size}.")
        if not 0.0 <= float(audit_percentile) <= 100.0:
            raise ValueError(f"audit_percentile must be in [0, 100], got {audit_percentile}.")
        if feature_weights is not None and feature_network is None:
            raise ValueError(f"feature_weights {feature_weights} given but no feature_network to load them into.")
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.synthetic_dir = Path(synthetic_dir)
        self.output_dir = Path(output_dir)
        self.intensity_range = [low, high]
        self.spatial_size = None if spatial_size is None else [int(s) for s in spatial_size]
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        self.axcodes = axcodes
        self.intensity_units = intensity_units
        self.synthetic_pattern = synthetic_pattern
        self.num_pairs = int(num_pairs)
        self.pair_seed = int(pair_seed)
        self.msssim_kernel_size = int(msssim_kernel_size)
        self.msssim_weights = [float(w) for w in msssim_weights]
        self.ssim_kernel_size = int(ssim_kernel_size)
        self.mmd_grid = [int(g) for g in mmd_grid]
        self.audit = MemorizationAudit(max_shift=audit_max_shift, percentile=audit_percentile,
                                       flag_spaces=audit_flag_spaces, device=self.device, progress=progress)
        self.audit_max_size = int(audit_max_size)
        self.feature_weights = None if feature_weights is None else Path(feature_weights)
        self.feature_network = feature_network
        self.weights_files = dict(weights_files or {})
        self.config = dict(config or {})
        self.report_num_samples = int(report_num_samples)
        self.report_num_pairs = int(report_num_pairs)
        self.num_workers = int(num_workers)
        self.progress = progress
        self.fidelity = None if segmentation_bundle in (None, "") else ConditioningFidelity(
            segmentation_bundle, label_map=segmentation_label_map, model_file=segmentation_model_file,
            device=self.device, progress=progress)
        self._load = LoadImage(image_only=True, ensure_channel_first=True)
        self._orient = Orientation(axcodes=axcodes)
        self._to_unit = ScaleIntensityRange(a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True)

    # ------------------------------------------------------------------ inputs
    def synthetic_files(self) -> list[Path]:
        """The synthetic volumes, sorted.

        Raises:
            DataError: the folder is missing or holds no file matching ``synthetic_pattern``.
        """
        if not self.synthetic_dir.is_dir():
            raise DataError(self.synthetic_dir, "synthetic folder does not exist: run the inference workflow first "
                                                "or pass --synthetic_dir")
        files = sorted(p for p in self.synthetic_dir.glob(self.synthetic_pattern) if not is_temporary(p))
        if not files:
            raise DataError(self.synthetic_dir, f"no synthetic volumes matching {self.synthetic_pattern!r}: run the "
                                                "inference workflow first or pass --synthetic_dir")
        return files

    def load_synthetic(self, path: Path, expected_shape: Sequence[int]) -> torch.Tensor:
        """Load one synthetic file as (1, H, W, D) in [-1, 1], oriented to ``axcodes``.

        Raises:
            DataError: unreadable file, wrong shape (compared with the real volumes), or non-finite voxels.
        """
        try:
            image = self._load(str(path))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
            raise DataError(path, f"cannot be read as a volume ({e})") from e
        if image.ndim != 4 or image.shape[0] != 1:
            raise DataError(path, f"expected one 3D volume, got array of shape {tuple(image.shape)}")
        image = self._orient(image)
        shape = list(image.shape[1:])
        if shape != list(expected_shape):
            raise DataError(path, f"shape {shape} after reorientation to {self.axcodes} does not match the real "
                                  f"volumes' {list(expected_shape)} (spatial_size): evaluate samples of this bundle's "
                                  "geometry")
        if self.spacing is not None:
            spacing = [float(s) for s in nib.affines.voxel_sizes(np.asarray(image.affine, dtype=np.float64))]
            if not np.allclose(spacing, self.spacing, rtol=1e-3, atol=1e-3):
                logger.warning("%s: voxel spacing %s differs from the bundle's pixdim %s", path,
                               [round(s, 4) for s in spacing], self.spacing)
        data = torch.as_tensor(np.asarray(image.array if hasattr(image, "array") else image), dtype=torch.float32)
        if not torch.isfinite(data).all():
            raise DataError(path, "contains NaN or Inf voxels")
        return torch.as_tensor(self._to_unit(data), dtype=torch.float32)

    def _iterate(self, dataset: Any, desc: str) -> Any:
        loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=self.num_workers, collate_fn=_first)
        for k, item in enumerate(tqdm(loader, desc=desc, disable=not self.progress, dynamic_ncols=True)):
            image = item["image"] if isinstance(item, Mapping) else item
            yield k, torch.as_tensor(image, dtype=torch.float32).reshape(1, *image.shape[-3:])

    # ------------------------------------------------------------------ per-volume work
    def _collect(self, store: _Collected, k: int, unit: torch.Tensor, factor: int, keep_full: set[int],
                 features: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Keep what the metrics need of volume ``k`` ((1, H, W, D) in [-1, 1])."""
        x = unit[None].to(self.device)
        store.grid.append(to_audit_grid(x, factor).cpu())
        zero_one = (x + 1.0) / 2.0
        store.pooled.append(pooled_intensities(zero_one, self.mmd_grid).cpu())
        store.features.append(features(x))
        if k in keep_full:
            store.full[k] = zero_one[0].to(torch.float16).cpu()  # half precision: only for MS-SSIM pairs
        if k < self.report_num_samples:
            store.slices.append(rpt.orthogonal_slices(zero_one[0].cpu().numpy()))

    @torch.no_grad()
    def _latent_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode_stage_2_inputs(x).flatten(1).float().cpu()

    @torch.no_grad()
    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        out = self.autoencoder(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.clamp(-1.0, 1.0)

    def _hashes(self) -> dict[str, Any]:
        hashes: dict[str, Any] = {}
        for name, path in self.weights_files.items():
            if path is None:
                continue
            p = Path(path)
            hashes[name] = {"path": str(p), "sha256": file_sha256(p) if p.is_file() else None,
                            **({} if p.is_file() else {"missing": True})}
        return hashes

    def _synthetic_pass(self, files: Sequence[Path], expected: Sequence[int], factor: int,
                        pairs: Sequence[tuple[int, int]], features: Callable[[torch.Tensor], torch.Tensor]
                        ) -> _Collected:
        """Load and check every synthetic file (first, so bad files fail before the long passes)."""
        syn = _Collected()
        keep = {i for p in pairs for i in p}
        for k, path in enumerate(tqdm(files, desc="synthetic volumes", disable=not self.progress,
                                      dynamic_ncols=True)):
            self._collect(syn, k, self.load_synthetic(path, expected), factor, keep, features)
        return syn

    def _validation_pass(self, val_paths: Sequence[str], expected: Sequence[int], factor: int,
                         features: Callable[[torch.Tensor], torch.Tensor]
                         ) -> tuple[_Collected, dict[str, list[float]], list[tuple[np.ndarray, np.ndarray]]]:
        """Reconstruction metrics in data units, and what the audit baseline needs, of every validation volume."""
        val = _Collected()
        values: dict[str, list[float]] = {"psnr": [], "ssim": [], "mae": []}
        slices: list[tuple[np.ndarray, np.ndarray]] = []
        for k, unit in self._iterate(self.val_dataset, "validation volumes"):
            self._check_real_shape(unit, expected, val_paths[k])
            x = unit[None].to(self.device)
            data_x = scale_from_unit_range(x, *self.intensity_range)
            data_r = scale_from_unit_range(self._reconstruct(x), *self.intensity_range)
            for key, vals in reconstruction_metrics(data_r, data_x, self.intensity_range,
                                                    self.ssim_kernel_size).items():
                values[key].extend(vals)
            if k < self.report_num_samples:
                slices.append((rpt.orthogonal_slices(data_x[0].cpu().numpy())[0],
                               rpt.orthogonal_slices(data_r[0].cpu().numpy())[0]))
            self._collect(val, k, unit, factor, set(), features)
        return val, values, slices

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        """Compute every metric, write ``metrics.json`` and ``report.html``, and return the metrics.

        Returns:
            The metrics dictionary as written (strict JSON types).

        Raises:
            DataError: empty or missing synthetic folder, a synthetic volume of the wrong shape or with NaN.
            ValueError: no training or no validation volumes, or a real volume of an unexpected shape.
        """
        tic = time.perf_counter()
        files = self.synthetic_files()
        label_files = self.fidelity.label_files(files) if self.fidelity is not None else None  # fail early
        num_train, num_val = len(self.train_dataset), len(self.val_dataset)
        if num_train == 0 or num_val == 0:
            raise ValueError(f"evaluation needs training and validation volumes, got {num_train} and {num_val} "
                             "(check dataset_dir and val_fraction).")
        expected = self.spatial_size
        if expected is None:
            expected = list(next(self._iterate(self.train_dataset, "shape"))[1].shape[1:])
        factor = audit_downsample_factor(expected, self.audit_max_size)
        train_paths, val_paths = _item_paths(self.train_dataset), _item_paths(self.val_dataset)
        train_names, val_names = _short_names(train_paths), _short_names(val_paths)
        syn_names = [f.name for f in files]

        extractor: FeatureExtractor | None = None
        feature_info: dict[str, Any]
        if self.feature_weights is not None and self.feature_network is not None:
            load_feature_network(self.feature_network, self.feature_weights)
            extractor = FeatureExtractor(self.feature_network, device=self.device)
            feature_info = {"space": "feature_network", "network": type(self.feature_network).__name__,
                            "weights": str(self.feature_weights), "input": "each volume z-scored over all voxels"}
        else:
            feature_info = {"space": "autoencoder_latent", "network": type(self.autoencoder).__name__,
                            "weights": None,
                            "input": "flattened encode_stage_2_inputs latents of the trained autoencoder"}
        features = extractor if extractor is not None else self._latent_features

        syn_pairs = random_pairs(len(files), self.num_pairs, self.pair_seed)
        real_pairs = random_pairs(num_train, self.num_pairs, self.pair_seed)
        syn = self._synthetic_pass(files, expected, factor, syn_pairs, features)
        fidelity = None
        if self.fidelity is not None:
            logger.info("conditioning fidelity: %d synthetic volumes segmented with %s", len(files),
                        self.fidelity.bundle_dir)
            fidelity = self.fidelity.evaluate(files, label_files)
        val, recon_values, recon_slices = self._validation_pass(val_paths, expected, factor, features)
        train = _Collected()
        for k, unit in self._iterate(self.train_dataset, "training volumes"):
            self._check_real_shape(unit, expected, train_paths[k])
            self._collect(train, k, unit, factor, {i for p in real_pairs for i in p}, features)

        logger.info("diversity: MS-SSIM of %d synthetic and %d real pairs", len(syn_pairs), len(real_pairs))
        msssim_kwargs = {"kernel_size": self.msssim_kernel_size, "weights": self.msssim_weights,
                         "device": self.device, "progress": self.progress}
        syn_msssim, msssim_settings = pairwise_msssim(syn.full, syn_pairs, desc="MS-SSIM synthetic", **msssim_kwargs)
        real_msssim, real_settings = pairwise_msssim(train.full, real_pairs, desc="MS-SSIM real", **msssim_kwargs)
        if not syn_pairs:
            msssim_settings = real_settings

        logger.info("memorization audit: %d synthetic, %d validation vs %d training volumes", len(files), num_val,
                    num_train)
        audit = self.audit(syn.stacked("grid"), val.stacked("grid"), train.stacked("grid"),
                           syn.stacked("features"), val.stacked("features"), train.stacked("features"))
        audit.settings["spatial_shape"] = list(expected)

        if extractor is not None:
            fid = fid_score(train.stacked("features"), syn.stacked("features"))
            mmd_features = mmd_score(train.stacked("features"), syn.stacked("features"))
        else:
            reason = ("no fid_weights_file given: FID needs a pretrained feature network and nothing is downloaded; "
                      "pass --fid_weights_file <local weights that fit feature_def>")
            fid = not_computed(reason)
            mmd_features = not_computed(reason)
        distribution = {
            "real_set": "training",
            "mmd_intensity": {**mmd_score(train.stacked("pooled"), syn.stacked("pooled")),
                              "definition": "MONAI MMDMetric (unbiased, linear kernel) on volumes scaled to [0, 1], "
                                            "average-pooled to mmd_grid, flattened and divided by sqrt(length)",
                              "grid": self.mmd_grid},
            "mmd_features": mmd_features,
            "fid": fid,
            "features": feature_info,
        }

        metrics = {
            "meddiff_version": meddiff.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": self.config,
            "settings": self._settings(factor, msssim_settings),
            "checkpoints": self._hashes(),
            "data": {
                "num_training": num_train, "num_validation": num_val, "num_synthetic": len(files),
                "spatial_shape": expected, "synthetic_dir": str(self.synthetic_dir),
                "synthetic_files": syn_names, "training_files": train_paths, "validation_files": val_paths,
                "synthetic_manifest": self._manifest(),
            },
            "reconstruction": {
                "set": "validation", "units": self.intensity_units, "intensity_range": self.intensity_range,
                "per_volume": [{"file": val_paths[k], **{m: recon_values[m][k] for m in recon_values}}
                               for k in range(num_val)],
                "summary": {m: summarize(v) for m, v in recon_values.items()},
            },
            "diversity": {
                "metric": "3D MS-SSIM (MONAI MultiScaleSSIMMetric) on volumes scaled to [0, 1], data range 1",
                **msssim_settings,
                "synthetic": {"pairs": syn_pairs, "values": syn_msssim, "summary": summarize(syn_msssim)},
                "real": {"set": "training", "pairs": real_pairs, "values": real_msssim,
                         "summary": summarize(real_msssim)},
            },
            "distribution": distribution,
            "memorization": self._audit_record(audit, syn_names, train_paths, val_paths, factor, feature_info),
            "conditioning_fidelity": fidelity,
            "seconds": round(time.perf_counter() - tic, 1),
        }
        metrics = json_safe(metrics)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_dir / "metrics.json", metrics)
        logger.info("wrote %s", self.output_dir / "metrics.json")
        html_text = self._report(metrics, syn, train, recon_slices, files, syn_names, train_names, val_names, audit)
        atomic_write_text(self.output_dir / "report.html", html_text)
        logger.info("wrote %s (%.0f s); %d of %d synthetic volumes flagged by the memorization audit",
                    self.output_dir / "report.html", time.perf_counter() - tic,
                    metrics["memorization"]["num_flagged"], len(files))
        return metrics

    def _check_real_shape(self, unit: torch.Tensor, expected: Sequence[int], name: str) -> None:
        if list(unit.shape[1:]) != list(expected):
            raise ValueError(f"{name}: shape {list(unit.shape[1:])} after preprocessing differs from spatial_size "
                             f"{list(expected)}.")

    def _manifest(self) -> dict[str, Any] | None:
        path = self.synthetic_dir / "samples.json"
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("%s: unreadable sampling manifest (%s)", path, e)
            return None
        ours = {Path(str(p)).name: file_sha256(p) for p in self.weights_files.values()
                if p is not None and Path(p).is_file()}
        theirs = manifest.get("weights", {}) if isinstance(manifest, Mapping) else {}
        stale = sorted(name for name, digest in theirs.items() if name in ours and ours[name] != digest)
        if stale:
            logger.warning("%s: samples were drawn with other weights than the evaluated %s", path, stale)
        return {"file": str(path), "weights": theirs, "weights_differ_from_evaluated": stale,
                "num_inference_steps": manifest.get("num_inference_steps") if isinstance(manifest, Mapping) else None}

    def _settings(self, factor: int, msssim_settings: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "synthetic_pattern": self.synthetic_pattern, "num_pairs": self.num_pairs, "pair_seed": self.pair_seed,
            "msssim_kernel_size": self.msssim_kernel_size, "msssim_weights": self.msssim_weights,
            "msssim_used": dict(msssim_settings), "ssim_kernel_size": self.ssim_kernel_size,
            "mmd_grid": self.mmd_grid, "audit_max_shift": self.audit.max_shift,
            "audit_max_size": self.audit_max_size, "audit_downsample_factor": factor,
            "audit_percentile": self.audit.percentile, "audit_flag_spaces": list(self.audit.flag_spaces),
            "feature_weights": None if self.feature_weights is None else str(self.feature_weights),
            "intensity_range": self.intensity_range, "axcodes": self.axcodes, "spacing": self.spacing,
            "device": str(self.device),
            "segmentation_bundle": None if self.fidelity is None else str(self.fidelity.bundle_dir),
        }

    @staticmethod
    def _audit_record(audit: Any, syn_names: Sequence[str], train_paths: Sequence[str], val_paths: Sequence[str],
                      factor: int, feature_info: Mapping[str, Any]) -> dict[str, Any]:
        def space(s: Any) -> dict[str, Any]:
            entries = []
            for k, name in enumerate(syn_names):
                entry = {"file": name, "nearest_training": train_paths[int(s.nearest[k])],
                         "similarity": float(s.similarity[k]), "flagged": bool(s.flagged[k])}
                if s.shift is not None:
                    entry["shift_voxels"] = [int(v) for v in s.shift[k]]
                entries.append(entry)
            baseline = [{"file": val_paths[k], "nearest_training": train_paths[int(s.baseline_nearest[k])],
                         "similarity": float(s.baseline_similarity[k])} for k in range(len(val_paths))]
            return {"threshold": s.threshold, "synthetic": entries, "baseline": baseline,
                    "num_flagged": int(s.flagged.sum()),
                    "synthetic_summary": summarize(s.similarity.tolist()),
                    "baseline_summary": summarize(s.baseline_similarity.tolist())}

        flagged = [syn_names[k] for k in range(len(syn_names)) if bool(audit.flagged[k])]
        return {
            "definition": AUDIT_DEFINITION,
            "max_shift": audit.settings["max_shift"], "percentile": audit.settings["percentile"],
            "flag_spaces": list(audit.flag_spaces),
            "downsample_factor": factor,
            "image": {"similarity": "max-over-shifts NCC", **space(audit.image)},
            "feature": None if audit.feature is None else {"similarity": "cosine", "space": feature_info["space"],
                                                           **space(audit.feature)},
            "flagged": flagged, "num_flagged": len(flagged),
            "baseline_warning": (f"only {len(val_paths)} validation volumes: the baseline percentile is coarse"
                                 if len(val_paths) < 20 else None),
        }

    # ------------------------------------------------------------------ report
    def _report(self, metrics: Mapping[str, Any], syn: _Collected, train: _Collected,
                recon_slices: Sequence[tuple[np.ndarray, np.ndarray]], files: Sequence[Path],
                syn_names: Sequence[str], train_names: Sequence[str], val_names: Sequence[str], audit: Any) -> str:
        fmt = rpt.format_value
        sections: list[tuple[str, str]] = []
        data = metrics["data"]
        mem = metrics["memorization"]
        status = (f'<p class="bad">{mem["num_flagged"]} of {data["num_synthetic"]} synthetic volumes flagged as '
                  f'possible copies: {", ".join(mem["flagged"])}</p>' if mem["num_flagged"]
                  else f'<p class="ok">No synthetic volume flagged (of {data["num_synthetic"]}).</p>')
        ck = [[name, info.get("sha256") or "missing", info["path"]] for name, info in metrics["checkpoints"].items()]
        sections.append(("Summary", status + rpt.html_table(
            ["item", "value"],
            [["training / validation / synthetic volumes",
              f"{data['num_training']} / {data['num_validation']} / {data['num_synthetic']}"],
             ["volume shape", data["spatial_shape"]], ["synthetic folder", data["synthetic_dir"]],
             ["meddiff", metrics["meddiff_version"]], ["evaluated", metrics["time"]]])
            + rpt.html_table(["checkpoint", "sha256", "path"], ck)))

        k = min(self.report_num_samples, len(syn.slices), len(train.slices))
        if k:
            sections.append(("Samples", '<p class="note">Central axial, coronal and sagittal slices; intensities '
                             'scaled to [0, 1] from the intensity range, same window for all.</p>' + rpt.html_image(
                                 rpt.samples_figure(train.slices[:k], syn.slices[:k], train_names[:k],
                                                    syn_names[:k]), "real and synthetic samples")))

        rec = metrics["reconstruction"]
        summary_rows = [[m.upper(), s["mean"], s["sd"], s["num_infinite"]] for m, s in rec["summary"].items()]
        per = [[val_names[i], v["psnr"], v["ssim"], v["mae"]] for i, v in enumerate(rec["per_volume"])]
        body = (f'<p class="note">Validation volumes through the autoencoder; PSNR (peak = width of the intensity '
                f'range {fmt(rec["intensity_range"])}) and MAE in {html.escape(rec["units"])}, SSIM on the same '
                'units. Exact reconstructions have infinite PSNR, counted apart from the mean.</p>'
                + rpt.html_table(["metric", "mean", "sd", "infinite"], summary_rows)
                + rpt.html_table(["validation volume", "PSNR (dB)", "SSIM", f"MAE ({rec['units']})"], per))
        if recon_slices:
            body += rpt.html_image(rpt.reconstruction_figure([a for a, _ in recon_slices],
                                                             [b for _, b in recon_slices], val_names,
                                                             self.intensity_range, self.intensity_units),
                                   "reconstructions")
        sections.append(("Reconstruction", body))

        div = metrics["diversity"]
        sections.append(("Diversity (MS-SSIM)", (
            f'<p class="note">{html.escape(div["metric"])}; window {div["kernel_size"]}, '
            f'{len(div["weights"])} scales. Lower = more varied. Compare synthetic with real, as Khader et al.</p>'
            + rpt.html_table(["pairs of", "n", "mean", "sd"],
                             [["synthetic", div["synthetic"]["summary"]["n"], div["synthetic"]["summary"]["mean"],
                               div["synthetic"]["summary"]["sd"]],
                              ["real (training)", div["real"]["summary"]["n"], div["real"]["summary"]["mean"],
                               div["real"]["summary"]["sd"]]])
            + rpt.html_image(rpt.diversity_figure([float(v) for v in div["synthetic"]["values"]],
                                                  [float(v) for v in div["real"]["values"]]), "MS-SSIM histograms"))))

        dist = metrics["distribution"]
        rows = []
        for key, label in (("mmd_intensity", "MMD, pooled intensities"), ("mmd_features", "MMD, features"),
                           ("fid", "FID, features")):
            entry = dist[key]
            rows.append([label, entry["value"] if entry["computed"] else "not computed",
                         entry.get("reason") or entry.get("definition") or ""])
        sections.append(("Distribution distance", (
            f'<p class="note">Synthetic vs training volumes. Features: {html.escape(dist["features"]["space"])} '
            f'({html.escape(dist["features"]["input"])}).</p>'
            + rpt.html_table(["metric", "value", "note"], rows))))

        if metrics.get("conditioning_fidelity"):
            sections.append(("Conditioning fidelity", self._fidelity_html(metrics["conditioning_fidelity"])))
        sections.append(("Memorization audit", self._audit_html(mem, audit, files, syn_names, train_names,
                                                                 val_names)))
        title = f"Generation bundle evaluation: {self.config.get('bundle_name', 'bundle')}"
        return rpt.html_report(title, sections,
                               footer=f"metrics.json holds every number; settings: "
                                      f"{html.escape(json.dumps(metrics['settings']))}")

    @staticmethod
    def _fidelity_html(fid: Mapping[str, Any]) -> str:
        labels = list(fid["per_label"])
        body = (f'<p class="note">Each synthetic image segmented by {html.escape(fid["segmentation_bundle"])} '
                f'(weights {html.escape(fid["model_file"])}); {html.escape(fid["definition"])} Real images '
                'segmented by the same bundle give the ceiling of this number.</p>')
        body += rpt.html_table(
            ["conditioning label", "segmenter label(s)", "mean Dice", "median", "sd", "min", "n", "undefined"],
            [[label, s["name"], s["mean"], s["median"], s["sd"], s["min"], s["n"], s["num_undefined"]]
             for label, s in fid["per_label"].items()])
        body += rpt.html_table(["synthetic", "label map", *[f"Dice {label}" for label in labels]],
                               [[c["image"], c["label"], *[c["dice"].get(label) for label in labels]]
                                for c in fid["cases"]])
        return body

    def _audit_html(self, mem: Mapping[str, Any], audit: Any, files: Sequence[Path], syn_names: Sequence[str],
                    train_names: Sequence[str], val_names: Sequence[str]) -> str:
        spaces = [{"title": f"image space (NCC, max over shifts of ±{mem['max_shift']} voxels)",
                   "baseline": audit.image.baseline_similarity.tolist(), "synthetic": audit.image.similarity.tolist(),
                   "threshold": audit.image.threshold, "xlabel": "similarity to nearest training volume"}]
        if audit.feature is not None:
            spaces.append({"title": f"feature space (cosine, {mem['feature']['space']})",
                           "baseline": audit.feature.baseline_similarity.tolist(),
                           "synthetic": audit.feature.similarity.tolist(), "threshold": audit.feature.threshold,
                           "xlabel": "cosine similarity to nearest training volume"})
        body = (f'<p class="note">{html.escape(mem["definition"])} Percentile: {mem["percentile"]}; audit grid '
                f'downsampled by {mem["downsample_factor"]}.</p>')
        if mem.get("baseline_warning"):
            body += f'<p class="note">{html.escape(mem["baseline_warning"])}.</p>'
        body += rpt.html_image(rpt.nn_similarity_figure(spaces), "nearest-neighbour similarity histograms")
        feat = mem["feature"]
        rows, flags = [], []
        for k, entry in enumerate(mem["image"]["synthetic"]):
            f_entry = feat["synthetic"][k] if feat else None
            rows.append([entry["file"], train_names[int(audit.image.nearest[k])], entry["similarity"],
                         entry.get("shift_voxels"), entry["flagged"],
                         None if f_entry is None else train_names[int(audit.feature.nearest[k])],
                         None if f_entry is None else f_entry["similarity"],
                         None if f_entry is None else f_entry["flagged"], bool(audit.flagged[k])])
            flags.append(bool(audit.flagged[k]))
        body += rpt.html_table(["synthetic", "nearest training (image)", "NCC", "shift", "image flag",
                                "nearest training (feature)", "cosine", "feature flag",
                                f"flagged ({' or '.join(mem['flag_spaces'])})"], rows, flags)
        thresholds = [["image (NCC)", mem["image"]["threshold"]]]
        if feat:
            thresholds.append([f"feature (cosine, {feat['space']})", feat["threshold"]])
        body += rpt.html_table(["space", f"threshold ({mem['percentile']}th percentile of baseline)"], thresholds)
        base_rows = [[val_names[k], train_names[int(audit.image.baseline_nearest[k])],
                      float(audit.image.baseline_similarity[k])] for k in range(len(val_names))]
        body += rpt.html_table(["validation (baseline)", "nearest training", "NCC"], base_rows)
        order = torch.argsort(audit.image.similarity, descending=True)[: self.report_num_pairs].tolist()
        pairs = []
        for k in order:
            t = int(audit.image.nearest[k])
            unit = self.load_synthetic(files[k], audit.settings["spatial_shape"])
            real = torch.as_tensor(self.train_dataset[t]["image"], dtype=torch.float32).reshape(unit.shape)
            shift = audit.image.shift[k].tolist()
            unit = torch.roll(unit, shifts=[-v * mem["downsample_factor"] for v in shift], dims=(1, 2, 3))  # align for display
            pairs.append({"synthetic": rpt.orthogonal_slices(((unit + 1) / 2).numpy()),
                          "training": rpt.orthogonal_slices(((real + 1) / 2).numpy()),
                          "synthetic_name": syn_names[k], "training_name": train_names[t],
                          "similarity": float(audit.image.similarity[k]), "shift": shift,
                          "flagged": bool(audit.flagged[k])})
        if pairs:
            body += ('<p class="note">Synthetic volumes most similar to a training volume (image space), next to '
                     'that training volume; each synthetic volume is translated by its best shift so that the slices '
                     'correspond.</p>' + rpt.html_image(rpt.closest_pairs_figure(pairs), "closest pairs"))
        return body
