# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Data loading and checking: NIfTI / DICOM series / ``.npy`` volumes, CT series selection, file writers, datalists."""

from __future__ import annotations

from .ct_series import CTSeriesSummary, find_ct_volumes, select_ct_series, summarize_dicom_folder
from .datalist import VolumeFinder, find_volumes, load_or_make_datalist, make_datalist
from .dicom_writer import write_dicom_series
from .errors import DataError, find_data_error
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
    "CTSeriesSummary",
    "DataError",
    "DicomSeriesInfo",
    "DicomSlice",
    "LoadVolume",
    "LoadVolumed",
    "NpyStackReader",
    "VolumeFinder",
    "affine_from_geometry",
    "dicom_pixels",
    "dicom_series_info",
    "find_ct_volumes",
    "find_data_error",
    "find_volumes",
    "inspect_dicom_series",
    "load_or_make_datalist",
    "make_datalist",
    "read_dicom_series",
    "save_mosaic_png",
    "save_nifti",
    "select_ct_series",
    "summarize_dicom_folder",
    "verify_datalist",
    "write_dicom_series",
]
