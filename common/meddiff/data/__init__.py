# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Data loading and checking: NIfTI / DICOM series / ``.npy`` volumes, CT series selection, file writers, datalists."""

from __future__ import annotations

from .class_labels import CLASS_KEY, class_names_of, read_labels_file, volume_id, with_class_labels
from .ct_series import CTSeriesSummary, find_ct_volumes, select_ct_series, summarize_dicom_folder
from .datalist import VolumeFinder, find_volumes, load_or_make_datalist, make_datalist
from .dicom_labels import dicom_label_to_nifti, find_label_objects, read_dicom_seg, read_rtstruct
from .dicom_seg_writer import write_dicom_seg
from .dicom_writer import write_dicom_series
from .errors import DataError, find_data_error, find_user_error
from .masks import load_mask_volume, read_mask
from .readers import (
    DicomSeriesInfo,
    DicomSlice,
    LoadVolume,
    LoadVolumed,
    NpyStackReader,
    dicom_pixels,
    dicom_series_info,
    inspect_dicom_series,
    read_dicom_series,
    verify_datalist,
)
from .writers import affine_from_geometry, save_mosaic_png, save_nifti

__all__ = [
    "CLASS_KEY",
    "CTSeriesSummary",
    "DataError",
    "DicomSeriesInfo",
    "DicomSlice",
    "LoadVolume",
    "LoadVolumed",
    "NpyStackReader",
    "VolumeFinder",
    "affine_from_geometry",
    "class_names_of",
    "dicom_label_to_nifti",
    "dicom_pixels",
    "dicom_series_info",
    "find_ct_volumes",
    "find_data_error",
    "find_user_error",
    "find_label_objects",
    "find_volumes",
    "inspect_dicom_series",
    "load_mask_volume",
    "load_or_make_datalist",
    "make_datalist",
    "read_dicom_seg",
    "read_dicom_series",
    "read_labels_file",
    "read_mask",
    "read_rtstruct",
    "save_mosaic_png",
    "save_nifti",
    "select_ct_series",
    "summarize_dicom_folder",
    "verify_datalist",
    "volume_id",
    "with_class_labels",
    "write_dicom_seg",
    "write_dicom_series",
]
