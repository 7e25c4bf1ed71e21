# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Mask-conditioned sampling: for every label map in a folder, seeded images on the same grid, with provenance."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing
from torch import nn

from meddiff.data.errors import DataError
from meddiff.data.masks import find_masks as find_mask_sources
from meddiff.data.masks import load_mask_volume, mask_case_name
from meddiff.data.writers import save_nifti
from meddiff.sampling.latent_sampler import (
    LatentDiffusionSampler,
    _autoencoder_compression,
    file_sha256,
)
from meddiff.transforms.intensity import scale_from_unit_range
from meddiff.transforms.label_maps import MaskAugmentation, one_hot_labels
from meddiff.utils import atomic_write_json

__all__ = ["ControlNetSampler", "find_masks", "read_controlnet_info"]

logger = logging.getLogger(__name__)


def find_masks(mask_dir: str | Path) -> list[Path]:
    """The mask sources in ``mask_dir`` (:func:`meddiff.data.masks.find_masks`): NIfTI label maps directly in it,
    DICOM SEG / RTSTRUCT files and image series folders holding one below it, sorted.

    Args:
        mask_dir: the folder of masks.

    Returns:
        The sources (files and folders).

    Raises:
        FileNotFoundError: ``mask_dir`` is not a folder.
        ValueError: it holds no mask source.
    """
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"mask_dir {folder} is not a folder: give --mask_dir <folder of label maps: NIfTI, "
                                "DICOM SEG, or image series folders with their RTSTRUCT/SEG>.")
    try:
        return find_mask_sources(folder)
    except DataError as e:
        raise ValueError(f"mask_dir {folder} holds no NIfTI label map (.nii or .nii.gz), DICOM SEG or RTSTRUCT "
                         f"({e.problem}).") from e


def read_controlnet_info(controlnet_info: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The ``controlnet.json`` the ControlNet trainer writes beside its weights (path or dict).

    Raises:
        FileNotFoundError: the file does not exist (train_controlnet has not run).
        ValueError: it has no ``num_label_classes``.
    """
    if isinstance(controlnet_info, Mapping):
        info = dict(controlnet_info)
    else:
        path = Path(controlnet_info)
        if not path.is_file():
            raise FileNotFoundError(f"controlnet info {path} not found: run train_controlnet first (it writes it "
                                    "beside the weights).")
        info = json.loads(path.read_text())
    if "num_label_classes" not in info:
        raise ValueError(f"controlnet info {controlnet_info} has no num_label_classes: was it written by "
                         "train_controlnet?")
    return info


class ControlNetSampler(LatentDiffusionSampler):
    """Sample images conditioned on label maps with a ControlNet on the trained latent diffusion model.

    Every mask source in ``mask_dir`` (a NIfTI label map, a DICOM SEG, an RTSTRUCT, or an image series folder
    holding one, see :mod:`meddiff.data.masks`; DICOM labels are read onto their image series' grid; values
    ``0..num_label_classes-1``) is brought onto the model's
    grid (``axcodes``, ``spacing`` with nearest-neighbour resampling, padded or cropped to the sampled image
    size), optionally deformed by ``mask_augmentation`` (seeded by the sample's seed, nearest neighbour), one-hot
    encoded and given to the ControlNet. Mask ``j`` (sorted by name) gets ``num_samples_per_mask`` volumes with
    seeds ``seed + j * num_samples_per_mask + k``. At every step the ControlNet's residuals, times
    ``conditioning_scale``, go into the denoiser (the sampler passes them, as MONAI's
    ``ControlNetDiffusionInferer`` does); the conditioning encoder of a ``Pseudo3DControlNet`` runs once per batch.
    Any sampling method of :class:`LatentDiffusionSampler` works.

    Class + mask conditioning: with a class-conditioned denoiser (``num_classes`` in ``latent_info``; the ControlNet
    trained on it with the same classes, see ``controlnet_info``) every volume gets its class from ``class_label``
    (a name, or a list cycled over the volumes in seed order, as :class:`LatentDiffusionSampler`), the class labels
    go to both the ControlNet and the denoiser, and classifier-free guidance (``guidance_scale``,
    ``guidance_interval``, ``guidance_rescale``) runs as in the unconditioned sampler, both halves of the guided
    batch steered by the same label map. :meth:`class_record` / :meth:`class_description` give a volume's class
    for ``samples.json`` and the NIfTI description.

    :meth:`run` writes, in ``output_dir``, for sample ``k`` of mask ``<case>`` (the source's path below ``mask_dir``,
    :func:`~meddiff.data.masks.mask_case_name`): ``<case>_<k>_image.nii.gz`` and,
    beside it, ``<case>_<k>_label.nii.gz`` (the label map as used) with the identical affine, a PNG mosaic,
    ``samples.json`` (per volume: mask file and SHA-256, seed, augmentation, file hashes; the run's weight hashes
    and ``conditioning_scale``) and ``dataset.json`` listing the pairs in MONAI's convention (``image`` +
    ``label``; ``labels`` named by ``mask_label_names`` where given), ready to train a segmentation model on. With
    ``distributed`` (torchrun), the batches are shared out over the ranks (see :meth:`run`). ``extra_writers`` run
    after the label map is written, so :class:`~meddiff.sampling.DicomSegOutput` finds it (a DICOM SEG beside the
    synthetic DICOM series).

    Args:
        controlnet: trained ControlNet (``meddiff.networks.Pseudo3DControlNet`` or MONAI ``ControlNet``).
        mask_dir: folder of mask sources (NIfTI, DICOM SEG, RTSTRUCT, image series folders with one).
        controlnet_info: the ``controlnet.json`` the ControlNet trainer writes (path or dict), with
            ``num_label_classes`` and the ``scale_factor`` of the denoiser it was trained on.
        num_samples_per_mask: volumes per label map.
        conditioning_scale: multiplies the ControlNet's residuals (0: the unconditioned model).
        mask_augmentation: ``"off"``, ``"affine"``, ``"elastic"`` or a :class:`MaskAugmentation`.
        mask_label_names: ``{ROI or segment name: label value}``, required for RTSTRUCT sources (see
            :func:`~meddiff.data.masks.read_mask`); ``None``: SEG segments keep their numbers, NIfTI its values.
        kwargs: :class:`LatentDiffusionSampler`'s arguments (``num_samples`` and ``seeds`` are set here;
            ``seed`` is the base seed).

    Raises:
        ValueError: a ControlNet trained on other classes than ``latent_info``'s, bad counts, or a ControlNet trained on
            another denoiser (its ``scale_factor`` differs from ``latent_info``'s).
        FileNotFoundError: ``mask_dir`` or ``controlnet_info`` missing.
    """

    def __init__(
        self,
        controlnet: nn.Module,
        mask_dir: str | Path,
        controlnet_info: str | Path | Mapping[str, Any],
        num_samples_per_mask: int = 1,
        conditioning_scale: float = 1.0,
        mask_augmentation: str | MaskAugmentation = "off",
        mask_label_names: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if int(num_samples_per_mask) < 1:
            raise ValueError(f"num_samples_per_mask must be >= 1, got {num_samples_per_mask}.")
        info = read_controlnet_info(controlnet_info)
        self.masks = find_masks(mask_dir)
        self.mask_dir = Path(mask_dir)
        self.mask_label_names = dict(mask_label_names) if mask_label_names else None
        self.num_samples_per_mask = int(num_samples_per_mask)
        base = int(kwargs.pop("seed", 0))
        kwargs.pop("num_samples", None)
        kwargs.pop("seeds", None)
        total = len(self.masks) * self.num_samples_per_mask
        super().__init__(num_samples=total, seeds=list(range(base, base + total)), seed=base, **kwargs)
        self._check_classes(controlnet, info)
        if self.condition_on_spacing:
            raise ValueError("mask-conditioned sampling supports denoisers without spacing conditioning only "
                             "(condition_on_spacing=false).")
        trained_scale = info.get("scale_factor")
        if trained_scale is not None and abs(float(trained_scale) - self.scale_factor) > 1e-6 * abs(self.scale_factor):
            raise ValueError(f"the ControlNet was trained on a denoiser with scale_factor {float(trained_scale):.6f} "
                             f"(controlnet_info) but latent_info_file has {self.scale_factor:.6f}: use the "
                             "denoiser it was trained on.")
        self.num_label_classes = int(info["num_label_classes"])
        self.controlnet = controlnet.to(self.device).eval()
        self.conditioning_scale = float(conditioning_scale)
        self.augment = mask_augmentation if isinstance(mask_augmentation, MaskAugmentation) else \
            MaskAugmentation(str(mask_augmentation))
        compression = kwargs.get("compression") or _autoencoder_compression(self.autoencoder)
        self.image_size = [int(s) * int(compression) for s in self.latent_shape[1:]]
        self.prefix = "controlnet"
        self._cond: torch.Tensor | None = None
        self._cond_embedding: torch.Tensor | None = None

    # -- conditioning --------------------------------------------------------------------------
    def load_mask(self, path: str | Path) -> torch.Tensor:
        """A label map on the model's grid: ``(1, H, W, D)`` MetaTensor (affine = its world geometry).

        Args:
            path: a mask source (see :func:`~meddiff.data.masks.read_mask`).

        Returns:
            The label map.

        Raises:
            ValueError: values outside ``0..num_label_classes-1`` (naming the file), or the reader's errors.
        """
        return self.load_mask_source(path)[0]

    def load_mask_source(self, path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`load_mask` and the reader's provenance (``sha256`` of the label file, ``kind``, ``image``).

        Args:
            path: a mask source.

        Returns:
            ``(label, meta)``.
        """
        label, meta = load_mask_volume(Path(path), self.mask_label_names)
        label = Orientation(axcodes=self.axcodes)(label)
        label = Spacing(pixdim=self.spacing, mode="nearest")(label)
        label = ResizeWithPadOrCrop(spatial_size=self.image_size, value=0)(label)
        label = label.round()
        one_hot_labels(label, self.num_label_classes, meta["label_file"])
        return label, meta

    def _check_classes(self, controlnet: nn.Module, info: Mapping[str, Any]) -> None:
        """The ControlNet must have been trained on this denoiser's classes and embed them.

        Raises:
            ValueError: ``num_classes``/``class_names`` of ``controlnet_info`` differ from ``latent_info``'s, or the
                ControlNet's class embedding does not fit ``num_classes``.
        """
        trained = info.get("num_classes")
        if trained is not None and (int(trained) != self.num_classes or
                                    [str(c) for c in info.get("class_names", [])] != self.class_names):
            raise ValueError(f"the ControlNet was trained on a denoiser with num_classes={int(trained)} "
                             f"{list(info.get('class_names', []))} (controlnet_info) but latent_info_file has "
                             f"num_classes={self.num_classes} {self.class_names}: use the denoiser it was trained on.")
        embeds = self.num_classes + 1 if self.num_classes else None
        if (getattr(controlnet, "num_class_embeds", None) or None) != embeds:
            raise ValueError(f"num_classes={self.num_classes} (latent_info_file) needs a controlnet_def with "
                             f"num_class_embeds={embeds}, got {getattr(controlnet, 'num_class_embeds', None)}.")

    def _predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guided: bool) -> torch.Tensor:
        """:meth:`LatentDiffusionSampler._predict` (class labels, classifier-free guidance) with the denoiser of
        :meth:`_denoiser`: the ControlNet's residuals of the current label maps go into every pass."""
        if self._cond is None:
            raise ValueError("no condition set: sample through run() or generate_for_masks().")
        if self._cond_embedding is None and hasattr(self.controlnet, "embed_condition"):
            self._cond_embedding = self.controlnet.embed_condition(self._cond)
        return super()._predict(x, t, labels, guided)

    def _denoiser(self) -> Callable[..., torch.Tensor]:
        """The denoiser steered by the ControlNet (residuals times ``conditioning_scale``), called as the
        unconditioned sampler calls its network; the class labels go to both networks. Under classifier-free
        guidance the batch is doubled (conditional, then unconditional half): both halves get the residuals of the
        same label maps (the condition, or its embedding, is repeated)."""
        cond, embedding = self._cond, self._cond_embedding

        def steered(x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor:
            repeats = x.shape[0] // cond.shape[0]
            if repeats * cond.shape[0] != x.shape[0]:
                raise ValueError(f"a batch of {x.shape[0]} latents for {cond.shape[0]} label maps.")
            classes = {} if class_labels is None else {"class_labels": class_labels}
            if embedding is not None:
                down, mid = self.controlnet(x, timesteps=timesteps,
                                            condition_embedding=torch.cat([embedding] * repeats), **classes)
            else:
                down, mid = self.controlnet(x=x, timesteps=timesteps, controlnet_cond=torch.cat([cond] * repeats),
                                            **classes)
            scale = self.conditioning_scale
            if scale != 1.0:
                down, mid = [r * scale for r in down], mid * scale
            return self.network(x, timesteps=timesteps, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid, **classes, **kwargs)

        return steered

    @torch.no_grad()
    def generate_for_masks(self, labels: list[torch.Tensor], seeds: list[int],
                           class_labels: Sequence[str | None] | None = None) -> torch.Tensor:
        """Sample and decode one volume per (label map, seed), ``sample_batch_size`` at a time.

        Args:
            labels: label maps ``(1, H, W, D)`` on the model's grid (after augmentation).
            seeds: one seed per map.
            class_labels: with class-conditioned weights, one class name (``None``: the null class) per map;
                default: the ``class_label`` of the volume with that seed (:meth:`classes_of`).

        Returns:
            Images ``(N, 1, H, W, D)`` in [-1, 1], float32, on CPU.
        """
        classes = self.classes_of(seeds) if class_labels is None else list(class_labels)
        if len(classes) != len(seeds):
            raise ValueError(f"class_labels must have one entry per seed: {len(classes)} != {len(seeds)}.")
        out = []
        size = self.sample_batch_size
        for i in range(0, len(seeds), size):
            cond = torch.stack([one_hot_labels(torch.as_tensor(lab), self.num_label_classes)
                                for lab in labels[i:i + size]]).to(self.device)
            self._cond, self._cond_embedding = cond, None
            try:
                latents = self._sample_chunk(seeds[i:i + size], classes[i:i + size])
            finally:
                self._cond, self._cond_embedding = None, None
            out.append(self.decode(latents).cpu())
        return torch.cat(out)

    def class_record(self, seed: int) -> dict[str, Any]:
        """``samples.json`` items of the volume with ``seed``: ``{"class_label": <name or None>}`` with
        class-conditioned weights, else none."""
        return {"class_label": self.classes_of([seed])[0]} if self.num_classes else {}

    def class_description(self, seed: int) -> dict[str, Any]:
        """NIfTI description items of the volume with ``seed``'s class (``class=<name> g=<guidance_scale>``, see
        :meth:`LatentDiffusionSampler._class_fields`); none for unconditional weights."""
        return self._class_fields(self.seeds.index(int(seed))) if self.num_classes else {}

    # -- files ---------------------------------------------------------------------------------
    def nifti_description(self, seed: int, **extra: Any) -> str:
        """As :meth:`LatentDiffusionSampler.nifti_description`, plus ``cs=<conditioning_scale>``."""
        return super().nifti_description(seed, cs=f"{self.conditioning_scale:g}", **extra)

    def _provenance(self) -> dict[str, Any]:
        return {**super()._provenance(), "conditioning_scale": self.conditioning_scale,
                "num_samples_per_mask": self.num_samples_per_mask, "num_label_classes": self.num_label_classes,
                "mask_augmentation": self.augment.describe(), "controlnet": type(self.controlnet).__name__,
                "image_size": self.image_size}

    def _earlier(self, provenance: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Records of earlier runs with the same settings (``samples.json`` and ranks' part files), by image file."""
        if not self.resume:
            return {}
        return {r["file"]: r for manifest in self._matching_manifests(provenance, self._manifests())
                for r in manifest.get("samples", []) if isinstance(r, dict) and "file" in r}

    def _dataset_labels(self) -> dict[str, str]:
        """``dataset.json``'s ``labels``: ``mask_label_names`` where given, else ``class_<value>``."""
        names = {int(v): str(k) for k, v in (self.mask_label_names or {}).items() if str(v).lstrip("-").isdigit()}
        return {str(i): names.get(i, "background" if i == 0 else f"class_{i}") for i in range(self.num_label_classes)}

    def run(self) -> list[Path]:
        """Sample ``num_samples_per_mask`` volumes per label map and write them with their maps; see the class.

        Each mask's volumes are sampled in batches of ``sample_batch_size``. With ``distributed``, rank ``r`` of
        ``W`` takes batches ``r, r + W, ...`` (over all masks) and writes only their files, recording their
        hashes in a part file ``samples.part-rank<r>-*.json`` after each batch; rank 0 then writes ``samples.json``
        and ``dataset.json`` for all ranks and removes the part files. A batch is the same whichever rank samples
        it, so the files are byte-identical to a one-process run's. With ``resume``, volumes an earlier run with
        the same settings recorded, whose files still match their hashes, are kept.

        Returns:
            The image NIfTI paths of this rank's volumes (all of them in a one-process run).
        """
        provenance = self._start_run()
        earlier = self._earlier(provenance)
        n = self.num_samples_per_mask
        loaded: tuple[int, torch.Tensor, dict[str, Any]] | None = None

        def sample(chunk: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[dict[str, Any], bool]]:
            nonlocal loaded
            j = chunk[0][0]
            mask_path = self.masks[j]
            if loaded is None or loaded[0] != j:
                loaded = (j, *self.load_mask_source(mask_path))
            _, mask, mask_meta = loaded
            mask_hash = mask_meta["sha256"]  # of the label file (the SEG or RTSTRUCT of a folder source)
            affine = np.asarray(torch.as_tensor(mask.affine).double().cpu())  # the grid of image and label
            case = mask_case_name(mask_path, self.mask_dir)
            seeds = {key: self.seeds[j * n + key[1]] for key in chunk}
            stems = {key: f"{case}_{key[1]:03d}" for key in chunk}
            kept = {key: earlier.get(f"{stems[key]}_image.nii.gz") for key in chunk}
            if all(r is not None and r.get("seed") == seeds[key] and self._verified(r) for key, r in kept.items()):
                return {key: (r, False) for key, r in kept.items()}
            labels = [self.augment(mask, seeds[key]) for key in chunk]  # the whole batch: same bytes as before
            tic = time.perf_counter()
            volumes = self.generate_for_masks(labels, [seeds[key] for key in chunk])
            seconds = (time.perf_counter() - tic) / len(chunk)
            done = {}
            for key, label, volume in zip(chunk, labels, volumes):
                files = self._write_pair(stems[key], volume, label, affine, seeds[key], mask_hash)
                done[key] = ({"file": files[0].name, "label_file": files[1].name, "seed": seeds[key],
                              "mask": str(mask_path), "mask_sha256": mask_hash, "mask_kind": mask_meta["kind"],
                              "mask_label_file": mask_meta["label_file"],
                              "mask_augmentation": self.augment.describe(), "seconds": round(seconds, 2),
                              "sha256": {self._relative(f): file_sha256(f) for f in files},
                              **self.class_record(seeds[key])}, True)
            return done

        chunks = [[(j, k) for k in range(start, min(start + self.sample_batch_size, n))]
                  for j in range(len(self.masks)) for start in range(0, n, self.sample_batch_size)]
        return self._run_chunks(chunks, sample, provenance, "mask-conditioned samples")

    def _write_manifests(self, provenance: Mapping[str, Any], records: list[dict[str, Any]]) -> None:
        """``samples.json`` and ``dataset.json`` (the image + label pairs in MONAI's convention)."""
        super()._write_manifests(provenance, records)
        atomic_write_json(self.output_dir / "dataset.json", {
            "name": "synthetic image + label pairs (meddiff ControlNet)",
            "description": "Synthetic images generated by a diffusion model from label maps; not for diagnosis.",
            "labels": self._dataset_labels(),
            "numTraining": len(records),
            "training": [{"image": r["file"], "label": r["label_file"],
                          **({"class_label": r["class_label"]} if "class_label" in r else {})} for r in records],
        })
        logger.info("%d mask-conditioned samples for %d label maps in %s", len(records), len(self.masks),
                    self.output_dir)

    def _write_pair(self, stem: str, volume: torch.Tensor, label: torch.Tensor, affine: np.ndarray, seed: int,
                    mask_hash: str) -> list[Path]:
        """Write image and label with the label map's affine; returns the files, image and label first."""
        if self.intensity_range is not None:
            volume = scale_from_unit_range(volume, *self.intensity_range)
        base = self.output_dir / stem
        extra = {**self.class_description(seed), "mask": mask_hash[:8]}  # class first: descrip holds 80 chars
        if self.augment.mode != "off":
            extra["aug"] = self.augment.mode
        image = save_nifti(volume, affine, base.with_name(f"{stem}_image.nii.gz"), dtype=self.output_dtype,
                           description=self.nifti_description(seed, **extra))
        label_file = save_nifti(torch.as_tensor(label).as_subclass(torch.Tensor), affine,
                                base.with_name(f"{stem}_label.nii.gz"), dtype=np.uint8)
        # after the label file: DicomSegOutput reads it
        files = [image, label_file, *self._write_mosaics_and_extras(volume, affine, base.with_name(f"{stem}_image"))]
        logger.info("wrote %s", image)
        return files
