# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Per-case segmentation metrics on a labelled test set: Dice, HD95 and average surface distance.

Predictions go through the same preprocessing, inferer and postprocessing as inference (so they are
compared in the original image grid, after ``Invertd``), and are scored against the original labels
with the voxel spacing of each case, so distances are in millimetres.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import decollate_batch
from monai.inferers import Inferer
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.segmentation import parse_label_names
from meddiff.engines.segmentation_trainer import plain_tensor
from meddiff.utils import as_bool, atomic_write_json, atomic_write_text

__all__ = ["SegmentationEvaluator", "segmentation_metrics"]

logger = logging.getLogger(__name__)


def _spacing(x: torch.Tensor) -> list[float]:
    affine = getattr(x, "affine", None)
    if affine is None:
        return [1.0] * (x.ndim - 1)
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return [float(v) for v in np.sqrt((a**2).sum(axis=0))]


def segmentation_metrics(
    pred: torch.Tensor, label: torch.Tensor, label_names: Mapping[str, Any], spacing: list[float] | None = None,
    percentile: float = 95.0,
) -> dict[str, float]:
    """Dice, HD95 and symmetric average surface distance (mm) of every foreground class of one case.

    Args:
        pred: predicted class map ``(1, X, Y, Z)``.
        label: reference class map ``(1, X, Y, Z)``.
        label_names: declared classes (``{name: value}``); the class with value 0 is background.
        spacing: voxel size in mm (default 1).
        percentile: Hausdorff percentile.

    Returns:
        ``{"dice_<name>": ..., "hd95_<name>": ..., "asd_<name>": ...}``; distances are NaN when the
        prediction or the reference is empty.
    """
    names = parse_label_names(label_names)
    num_classes = max(names.values()) + 1
    p = one_hot(pred[None].long(), num_classes)
    y = one_hot(label[None].long(), num_classes)
    out: dict[str, float] = {}
    dice = compute_dice(p, y, include_background=True, ignore_empty=False)[0]
    tag = f"hd{percentile:g}"
    for name, value in sorted(names.items(), key=lambda kv: kv[1]):
        if value == 0:
            continue
        out[f"dice_{name}"] = float(dice[value])
        pv, yv = p[:, value : value + 1], y[:, value : value + 1]
        if not bool(pv.any()) or not bool(yv.any()):
            out[f"{tag}_{name}"] = out[f"asd_{name}"] = float("nan")
            continue
        out[f"{tag}_{name}"] = float(compute_hausdorff_distance(pv, yv, include_background=True,
                                                                percentile=percentile, spacing=spacing)[0, 0])
        out[f"asd_{name}"] = float(compute_average_surface_distance(pv, yv, include_background=True, symmetric=True,
                                                                    spacing=spacing)[0, 0])
    return out


def _json_safe(obj: Any) -> Any:
    """NaN and infinities become ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _summary(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for col in columns:
        values = np.asarray([r[col] for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        stats[col] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
            "median": float(np.median(finite)) if finite.size else math.nan,
            "min": float(finite.min()) if finite.size else math.nan,
            "max": float(finite.max()) if finite.size else math.nan,
            "num_nan": int(values.size - finite.size),
        }
    return stats


class SegmentationEvaluator:
    """Run the network over a labelled set and write per-case metrics and a summary.

    Writes ``<output_dir>/<metrics_file>`` (one row per case: ``case, image, label`` and
    ``dice_/hd95_/asd_<class>`` for every foreground class; distances in mm) and
    ``<output_dir>/<summary_file>`` (mean, std, median, min, max per metric), both atomically.

    Args:
        network: the trained network (weights loaded), in eval mode here.
        dataloader: batch size 1; items with ``image`` (preprocessed, invertible ``MetaTensor``) and ``label``
            (original grid, checked against the image).
        inferer: e.g. the inference config's ``SlidingWindowInferer``.
        postprocessing: maps a decollated item with ``pred`` logits to ``pred`` as a class map ``(1, X, Y, Z)``
            in the label's grid (the inference config's ``postprocessing``: softmax, ``Invertd``, argmax).
        output_dir: folder for the CSV and the summary.
        label_names: declared classes (``{name: value}`` or channel_def form).
        device: device to run on.
        percentile: Hausdorff percentile.
        metrics_file: per-case CSV name.
        summary_file: summary JSON name.
        amp: mixed precision on CUDA.
        progress: show a progress bar.
    """

    def __init__(
        self,
        network: nn.Module,
        dataloader: DataLoader,
        inferer: Inferer,
        postprocessing: Callable[[dict[str, Any]], dict[str, Any]],
        output_dir: str | os.PathLike,
        label_names: Mapping[str, Any],
        device: str | torch.device = "cpu",
        percentile: float = 95.0,
        metrics_file: str = "metrics.csv",
        summary_file: str = "summary.json",
        amp: bool | str = False,
        progress: bool | str = True,
    ) -> None:
        self.network = network
        self.dataloader = dataloader
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.output_dir = Path(output_dir)
        self.label_names = parse_label_names(label_names)
        self.device = torch.device(device)
        self.percentile = percentile
        self.metrics_file = metrics_file
        self.summary_file = summary_file
        self.amp = as_bool(amp, "amp") and self.device.type == "cuda"
        self.progress = as_bool(progress, "progress")

    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        """Evaluate every case.

        Returns:
            The summary (also written to ``summary_file``, with NaN as ``null``), with ``"cases"`` holding the
            per-case rows.

        Raises:
            DataError: a prediction and its label differ in shape (the postprocessing did not invert the
                preprocessing), or the dataset is empty.
        """
        self.network.to(self.device).eval()
        rows: list[dict[str, Any]] = []
        for batch in tqdm(self.dataloader, desc="evaluate", disable=not self.progress, dynamic_ncols=True):
            images = plain_tensor(batch["image"], self.device)  # the batch keeps the MetaTensor for Invertd
            with torch.autocast(device_type=self.device.type, enabled=self.amp):
                batch["pred"] = self.inferer(images, self.network).float()
            for item in decollate_batch(batch):
                item = self.postprocessing(item)
                pred, label = item["pred"].cpu(), item["label"]
                label_file = str(getattr(label, "meta", {}).get("filename_or_obj", "?"))
                image_file = str(getattr(item["image"], "meta", {}).get("filename_or_obj", "?"))
                if tuple(pred.shape[1:]) != tuple(label.shape[1:]):
                    raise DataError(label_file, f"prediction shape {tuple(pred.shape[1:])} differs from the label "
                                                f"{tuple(label.shape[1:])}: postprocessing must invert the resampling")
                case = Path(image_file).name
                for suffix in (".nii.gz", ".nii", ".npy"):
                    case = case.removesuffix(suffix)
                metrics = segmentation_metrics(pred, torch.as_tensor(label).cpu(), self.label_names,
                                               spacing=_spacing(label), percentile=self.percentile)
                rows.append({"case": case, "image": image_file, "label": label_file, **metrics})
                logger.info("%s: %s", case, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if not rows:
            raise DataError(str(self.output_dir), "no cases to evaluate: the test datalist is empty")
        columns = [k for k in rows[0] if k not in ("case", "image", "label")]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["case", *columns, "image", "label"], lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.output_dir / self.metrics_file, buffer.getvalue())
        summary = {"num_cases": len(rows), "label_names": self.label_names, "metrics": _summary(rows, columns),
                   "cases": rows}
        atomic_write_json(self.output_dir / self.summary_file, _json_safe(summary))
        for col, s in summary["metrics"].items():
            logger.info("%s: mean %.4f, median %.4f over %d cases", col, s["mean"], s["median"], len(rows))
        return summary
