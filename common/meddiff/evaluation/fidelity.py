# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Conditioning fidelity of mask-conditioned samples: segment each generated image, Dice against its mask.

A mask-conditioned sampler (``meddiff.sampling.ControlNetSampler``) writes ``<case>_<k>_image.nii.gz`` and, beside
it, ``<case>_<k>_label.nii.gz`` (the conditioning label map as used, same grid). :class:`ConditioningFidelity`
segments every generated image with a MONAI segmentation bundle (its own ``configs/inference.json``: preprocessing,
network and weights, inferer and postprocessing, run in this process, so predictions come back onto the image grid
the way that bundle's postprocessing puts them there) and reports the Dice between the conditioning label map and
that segmentation, per label (MAISI reports the same measure). Real images segmented by the same bundle give the
ceiling of this number: a generator cannot score above what the segmenter reaches on real data.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, LoadImage, ResampleToMatch, SaveImage, SaveImaged
from tqdm import tqdm

from meddiff.data.errors import DataError

__all__ = ["FIDELITY_DEFINITION", "ConditioningFidelity", "conditioning_label_file", "dice_per_label"]

logger = logging.getLogger(__name__)

FIDELITY_DEFINITION = (
    "Dice = 2|C ∩ S| / (|C| + |S|) between the voxels of a conditioning label C in the label map the image was "
    "generated from and the voxels of the matching label(s) S in the segmentation bundle's prediction of that "
    "image, on the image grid. Undefined (null) when both are empty; 0 when only one is."
)


def conditioning_label_file(image_file: str | os.PathLike, image_tag: str = "_image",
                            label_tag: str = "_label") -> Path:
    """The conditioning label map written beside a generated image: the last ``image_tag`` replaced by ``label_tag``.

    Args:
        image_file: generated image, e.g. ``case_0_image.nii.gz``.
        image_tag: part of the file name that marks the image.
        label_tag: what replaces it in the label map's name.

    Returns:
        The label map path (``case_0_label.nii.gz``).

    Raises:
        DataError: the name does not contain ``image_tag``.
    """
    path = Path(image_file)
    head, tag, tail = path.name.rpartition(image_tag)
    if not tag:
        raise DataError(path, f"name has no {image_tag!r} to find its conditioning label map by (expected "
                              f"<case>_<k>{image_tag}.nii.gz from mask-conditioned sampling)")
    return path.with_name(head + label_tag + tail)


def dice_per_label(condition: np.ndarray, segmentation: np.ndarray,
                   label_map: Mapping[int, Sequence[int]]) -> dict[int, float]:
    """Dice between each conditioning label and its segmenter label(s).

    Args:
        condition: ``(H, W, D)`` integer conditioning label map.
        segmentation: ``(H, W, D)`` integer segmentation of the generated image.
        label_map: conditioning label -> segmenter labels whose union it is compared with.

    Returns:
        Conditioning label -> Dice in [0, 1]; NaN when the label is absent from both maps.

    Raises:
        ValueError: the two maps differ in shape.
    """
    if condition.shape != segmentation.shape:
        raise ValueError(f"label map shape {condition.shape} differs from segmentation shape {segmentation.shape}.")
    out = {}
    for label, targets in label_map.items():
        a = condition == label
        b = np.isin(segmentation, list(targets))
        total = int(a.sum()) + int(b.sum())
        out[int(label)] = float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
    return out


def _median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else None


class ConditioningFidelity:
    """Segment generated images with a MONAI segmentation bundle and score them against their conditioning masks.

    Args:
        bundle_dir: the segmentation bundle folder (``configs/inference.json``, weights in ``models/``).
        label_map: conditioning label -> segmenter label (an int or a list of ints, whose union is used);
            keys may be strings (JSON). ``None``: identity, for every non-zero label found in the conditioning
            maps. Labels left out (or mapped to ``None``) are not scored.
        model_file: weights of the bundle's ``network_def``; ``None``: the bundle's ``model_file`` key, else
            ``models/model.pt``.
        config_file: the bundle's inference config, relative to ``bundle_dir``.
        device: where the segmentation network runs.
        progress: show a progress bar.
        overrides: config ids and values set in the bundle's inference config (e.g. the network size and
            voxel spacing the weights were trained with).

    Raises:
        FileNotFoundError: the bundle folder, its inference config or its weights are missing (naming the path).
        ValueError: a label map entry is not an integer label.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        label_map: Mapping[Any, Any] | None = None,
        model_file: str | os.PathLike | None = None,
        config_file: str = "configs/inference.json",
        device: str | torch.device = "cpu",
        progress: bool = True,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        if not self.bundle_dir.is_dir():
            raise FileNotFoundError(f"segmentation_bundle {self.bundle_dir} is not a folder: pass the path of a "
                                    "MONAI segmentation bundle (with configs/inference.json and its weights).")
        self.config_file = self.bundle_dir / config_file
        if not self.config_file.is_file():
            raise FileNotFoundError(f"segmentation_bundle {self.bundle_dir}: no {config_file} (expected the "
                                    f"bundle's inference config at {self.config_file}).")
        self.device = torch.device(device)
        self.progress = progress
        self.label_map = None if label_map is None else self._parse_label_map(label_map)
        self.parser = ConfigParser()
        self.parser.read_config(str(self.config_file))
        self.parser.update(dict(overrides or {}))
        self.parser["bundle_root"] = str(self.bundle_dir)
        if "device" in self.parser:
            self.parser["device"] = str(self.device)  # a str: configs call torch.device(...) or `.to(@device)`
        if "save_predictions" in self.parser:
            self.parser["save_predictions"] = False
        if model_file is None:
            model_file = self.parser.get_parsed_content("model_file") if "model_file" in self.parser else None
            model_file = model_file if model_file is not None else self.bundle_dir / "models" / "model.pt"
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"segmentation_bundle {self.bundle_dir}: weights file {self.model_file} not "
                                    "found (download or train the bundle's weights, or pass "
                                    "segmentation_model_file).")
        label_names = self.parser.get("label_names")
        self.label_names = ({int(v): str(k) for k, v in label_names.items()}
                            if isinstance(label_names, Mapping) else {})
        self._network: torch.nn.Module | None = None
        self._load_label = LoadImage(image_only=True, ensure_channel_first=True)

    @staticmethod
    def _parse_label_map(label_map: Mapping[Any, Any]) -> dict[int, list[int]]:
        parsed: dict[int, list[int]] = {}
        for key, value in label_map.items():
            if value is None:
                continue
            targets = value if isinstance(value, (list, tuple)) else [value]
            try:
                parsed[int(key)] = [int(t) for t in targets]
            except (TypeError, ValueError):
                raise ValueError(f"segmentation_label_map entry {key!r}: {value!r} must map an integer conditioning "
                                 "label to an integer segmenter label (or a list of them).") from None
        if not parsed:
            raise ValueError(f"segmentation_label_map {dict(label_map)} maps no label.")
        return parsed

    # ------------------------------------------------------------------ the bundle
    def _build(self) -> None:
        if self._network is not None:
            return
        for key in ("network_def", "preprocessing", "inferer", "postprocessing"):
            if key not in self.parser:
                raise ValueError(f"segmentation_bundle {self.config_file}: no {key!r} (a MONAI segmentation bundle's "
                                 "inference config defines network_def, preprocessing, inferer and postprocessing).")
        network = self.parser.get_parsed_content("network_def")
        state = torch.load(self.model_file, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
            state = state["model"]  # a CheckpointSaver checkpoint
        try:
            network.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        except (RuntimeError, AttributeError) as e:
            raise ValueError(f"{self.model_file}: weights do not fit the segmentation bundle's network_def "
                             f"({e}).") from e
        self._network = network.to(self.device).eval()
        self._preprocessing = self.parser.get_parsed_content("preprocessing")
        self._inferer = self.parser.get_parsed_content("inferer")
        post = self.parser.get_parsed_content("postprocessing")
        transforms = post.transforms if isinstance(post, Compose) else [post]
        # the bundle's writers (if any) are dropped: the prediction stays in memory
        self._postprocessing = Compose([t for t in transforms if not isinstance(t, (SaveImage, SaveImaged))])

    @torch.no_grad()
    def segment(self, image_file: str | os.PathLike) -> torch.Tensor:
        """Segment one image file with the bundle, as its inference workflow does.

        Args:
            image_file: a NIfTI (or any format the bundle's ``LoadImaged`` reads).

        Returns:
            ``(1, H, W, D)`` label map on the grid the bundle's postprocessing returns (the image grid for a
            bundle that inverts its preprocessing, like the breast bundle).
        """
        self._build()
        data = self._preprocessing({"image": str(image_file)})
        image = data["image"]
        pred = self._inferer(torch.as_tensor(image)[None].to(self.device), self._network)
        data["pred"] = pred[0].detach().cpu() if isinstance(pred, torch.Tensor) else pred
        data["image"] = image.cpu() if isinstance(image, torch.Tensor) else image
        data = self._postprocessing(data)
        out = data["pred"]
        if out.ndim == 3:
            out = out[None]
        if out.shape[0] > 1:  # postprocessing left class scores: take the most likely class
            out = out.argmax(0, keepdim=True)
        return out

    # ------------------------------------------------------------------ scoring
    def evaluate(self, image_files: Sequence[str | os.PathLike],
                 label_files: Sequence[str | os.PathLike] | None = None) -> dict[str, Any]:
        """Segment every generated image and score it against its conditioning label map.

        Args:
            image_files: generated images.
            label_files: their conditioning label maps; ``None``: found by :func:`conditioning_label_file`.

        Returns:
            ``{"definition", "segmentation_bundle", "model_file", "label_map", "cases": [{"image", "label",
            "dice": {label: value}}], "per_label": {label: {"segmenter_labels", "name", "mean", "median", "sd",
            "min", "n", "num_undefined"}}, "mean_dice", "seconds"}`` (Dice undefined for a case: NaN).

        Raises:
            DataError: a label map is missing, unreadable, not on the image's grid, or not integer-valued.
        """
        tic = time.perf_counter()
        images = [Path(f) for f in image_files]
        labels = [Path(f) for f in label_files] if label_files is not None else self.label_files(images)
        conditions = []
        for image_file, label_file in zip(images, labels):
            conditions.append(self._read_label(label_file, image_file))
        label_map = self.label_map
        if label_map is None:
            found = sorted({int(v) for c in conditions for v in np.unique(c.numpy())} - {0})
            label_map = {v: [v] for v in found}
        unknown = sorted({t for targets in label_map.values() for t in targets} - set(self.label_names))
        if self.label_names and unknown:
            logger.warning("segmenter labels %s are not in %s's label_names %s: pass segmentation_label_map to map "
                           "the conditioning labels onto the segmenter's", unknown, self.config_file,
                           {v: k for k, v in self.label_names.items()})
        cases = []
        for image_file, label_file, cond in tqdm(list(zip(images, labels, conditions)), desc="conditioning fidelity",
                                                 disable=not self.progress, dynamic_ncols=True):
            seg = self.segment(image_file)
            if tuple(seg.shape[1:]) != tuple(cond.shape[1:]) or not self._same_grid(seg, cond):
                logger.info("%s: segmentation resampled onto the label map's grid (nearest neighbour)", image_file)
                seg = ResampleToMatch(mode="nearest")(seg.float(), cond)
            dice = dice_per_label(np.asarray(cond[0].numpy()).round().astype(np.int64),
                                  np.asarray(torch.as_tensor(seg[0]).numpy()).round().astype(np.int64), label_map)
            cases.append({"image": image_file.name, "label": label_file.name, "dice": dice})
            logger.info("%s: Dice %s", image_file.name, {k: round(v, 4) for k, v in dice.items()})
        per_label = {}
        for label, targets in label_map.items():
            values = [c["dice"][label] for c in cases]
            finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
            per_label[label] = {
                "segmenter_labels": targets,
                "name": ", ".join(self.label_names.get(t, str(t)) for t in targets),
                "mean": float(finite.mean()) if finite.size else None,
                "median": _median(values),
                "sd": float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if finite.size else None),
                "min": float(finite.min()) if finite.size else None,
                "n": int(finite.size),
                "num_undefined": len(values) - int(finite.size),
            }
        means = [s["mean"] for s in per_label.values() if s["mean"] is not None]
        return {
            "definition": FIDELITY_DEFINITION,
            "segmentation_bundle": str(self.bundle_dir),
            "config_file": str(self.config_file),
            "model_file": str(self.model_file),
            "label_map": {k: v for k, v in label_map.items()},
            "label_map_source": "identity over the conditioning labels" if self.label_map is None
            else "segmentation_label_map",
            "num_cases": len(cases),
            "cases": cases,
            "per_label": per_label,
            "mean_dice": float(np.mean(means)) if means else None,
            "seconds": round(time.perf_counter() - tic, 1),
        }

    def label_files(self, image_files: Sequence[str | os.PathLike]) -> list[Path]:
        """The conditioning label map beside each image (checked to exist).

        Raises:
            DataError: an image has no label map beside it (naming the file expected).
        """
        out = []
        for image_file in image_files:
            label = conditioning_label_file(image_file)
            if not label.is_file():
                raise DataError(label, f"conditioning label map of {Path(image_file).name} not found: conditioning "
                                       "fidelity needs the label map written beside each generated image "
                                       "(mask-conditioned sampling writes <case>_<k>_label.nii.gz)")
            out.append(label)
        return out

    def _read_label(self, label_file: Path, image_file: Path) -> torch.Tensor:
        try:
            label = self._load_label(str(label_file))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
            raise DataError(label_file, f"cannot be read as a label map ({e})") from e
        values = torch.as_tensor(label)
        if values.ndim != 4 or values.shape[0] != 1:
            raise DataError(label_file, f"expected one 3D label map, got array of shape {tuple(values.shape)}")
        if not torch.equal(values, values.round()):
            raise DataError(label_file, "label map has non-integer values")
        return label

    @staticmethod
    def _same_grid(a: torch.Tensor, b: torch.Tensor) -> bool:
        affine_a, affine_b = getattr(a, "affine", None), getattr(b, "affine", None)
        if affine_a is None or affine_b is None:
            return True
        return bool(np.allclose(np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64),
                                atol=1e-3))
