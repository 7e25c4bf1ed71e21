# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Write the label map of each generated volume as a DICOM SEG inside its synthetic DICOM series folder.

An ``extra_output_writers`` entry placed AFTER :class:`~meddiff.sampling.DicomSeriesOutput`: the sampler calls it
as ``writer(volume, affine, stem)``; it finds the series ``<stem>_dicom/`` that writer has just written and the
label map (``labels=`` when the caller passes it, else the NIfTI ``<case>_label.nii.gz`` that mask-conditioned
sampling writes beside ``<case>_image``) and writes ``<stem>_dicom/seg.dcm`` with
:func:`~meddiff.data.dicom_seg_writer.write_dicom_seg`. The folder then holds the image series and its SEG, as a
clinical export does, and :func:`~meddiff.data.masks.read_mask` reads it as a mask source. A sample without a label
map (unconditional sampling: ``sample_000``) gets no SEG unless ``require_labels`` is set, so the writer may sit in
a bundle's ``extra_output_writers`` for every sampler.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.data.dicom_seg_writer import write_dicom_seg
from meddiff.data.errors import DataError
from meddiff.data.masks import read_mask
from meddiff.utils import as_bool

__all__ = ["DicomSegOutput"]

logger = logging.getLogger(__name__)


class DicomSegOutput:
    """Callable sampler output: the label map of ``<stem>`` as a DICOM SEG in the series folder ``<stem>_dicom/``.

    Example config (after the series writer): ``"extra_output_writers": [{"_target_":
    "meddiff.sampling.DicomSeriesOutput", "modality": "CT"}, {"_target_": "meddiff.sampling.DicomSegOutput",
    "num_label_classes": "@num_label_classes"}]``.

    Args:
        label_names: ``{segment label: label value}``.
        num_label_classes: without ``label_names``: segments ``class_1 .. class_<n-1>`` (the names of the
            ControlNet's ``dataset.json``), the same for every sample; neither: ``label_1 .. label_<max>`` of each map.
        series_suffix: the series folder is ``<stem><series_suffix>`` (as :class:`DicomSeriesOutput`'s ``suffix``).
        seg_name: file name of the SEG inside the series folder.
        image_suffix: the stem's ending that names the image (``<case>_image``) ...
        label_suffix: ... replaced by this to find the label map when ``labels`` is not passed.
        require_labels: a sample without a label map is an error (default: it gets no SEG, logged).
        enabled: write nothing when false (a config switch such as ``write_dicom``).

    Raises:
        ValueError: ``num_label_classes`` below 2.
    """

    def __init__(
        self,
        label_names: Mapping[str, Any] | None = None,
        num_label_classes: int | None = None,
        series_suffix: str = "_dicom",
        seg_name: str = "seg.dcm",
        image_suffix: str = "_image",
        label_suffix: str = "_label.nii.gz",
        require_labels: bool | str = False,
        enabled: bool | str = True,
    ) -> None:
        if not label_names and num_label_classes is not None:
            if int(num_label_classes) < 2:
                raise ValueError(f"num_label_classes must be >= 2 (background and one label), got {num_label_classes}")
            label_names = {f"class_{i}": i for i in range(1, int(num_label_classes))}
        self.label_names = dict(label_names) if label_names else None
        self.series_suffix = series_suffix
        self.seg_name = seg_name
        self.image_suffix = image_suffix
        self.label_suffix = label_suffix
        self.require_labels = as_bool(require_labels, "require_labels")
        self.enabled = as_bool(enabled, "enabled")

    def label_file(self, stem: str | os.PathLike) -> Path:
        """The label map written beside the image ``stem`` (``<case>_image`` -> ``<case>_label.nii.gz``).

        Raises:
            DataError: the stem does not end with ``image_suffix``.
        """
        stem = Path(stem)
        if not stem.name.endswith(self.image_suffix):
            raise DataError(stem, f"cannot find the label map of this sample: its stem does not end with "
                                  f"{self.image_suffix!r}; pass labels= to the SEG writer")
        return stem.with_name(stem.name[: len(stem.name) - len(self.image_suffix)] + self.label_suffix)

    def __call__(
        self,
        volume: torch.Tensor | np.ndarray,
        affine: np.ndarray,
        stem: str | os.PathLike,
        labels: torch.Tensor | np.ndarray | None = None,
    ) -> list[Path]:
        """Write the SEG of one sample.

        Args:
            volume: the generated volume (unused: the SEG references the series written from it).
            affine: 4x4 RAS affine of ``volume`` and ``labels``.
            stem: output path stem, e.g. ``outputs/case1_000_image``.
            labels: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` label map on the volume's grid; ``None``: read from
                :meth:`label_file`.

        Returns:
            ``[<stem><series_suffix>/<seg_name>]``; nothing when disabled or (``require_labels`` off) the sample has
            no label map.

        Raises:
            DataError: no series folder (put :class:`DicomSeriesOutput` before this writer), no label map with
                ``require_labels``, or see :func:`~meddiff.data.dicom_seg_writer.write_dicom_seg`.
        """
        if not self.enabled:
            return []
        stem = Path(stem)
        if labels is None and not self.require_labels and not (
            stem.name.endswith(self.image_suffix) and self.label_file(stem).is_file()
        ):
            logger.debug("%s: no label map, no DICOM SEG", stem)
            return []
        folder = stem.with_name(stem.name + self.series_suffix)
        if not folder.is_dir():
            raise DataError(folder, "no DICOM series to attach the SEG to: list meddiff.sampling.DicomSeriesOutput "
                                    f"(suffix {self.series_suffix!r}) before DicomSegOutput in extra_output_writers")
        label_affine = np.asarray(affine, dtype=np.float64)
        if labels is None:
            label_file = self.label_file(stem)
            if not label_file.is_file():
                raise DataError(label_file, "no label map beside the generated image to write its DICOM SEG from")
            array, label_affine, _ = read_mask(label_file)
        else:
            array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        return [write_dicom_seg(folder, array, self.label_names, folder / self.seg_name, affine=label_affine)]
