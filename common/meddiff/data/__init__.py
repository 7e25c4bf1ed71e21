# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Data loading and checking: NIfTI / DICOM series / ``.npy`` volumes, CT series selection, DICOM writing, datalists."""

from __future__ import annotations

from .ct_series import CTSeriesSummary, find_ct_volumes, select_ct_series, summarize_dicom_folder
from .datalist import VolumeFinder, find_volumes, load_or_make_datalist, make_datalist
from .dicom_writer import write_dicom_series
from .errors import DataError
from .readers import (
    DicomSeriesInfo,
    LoadVolume,
    LoadVolumed,
    NpyStackReader,
    dicom_series_info,
    inspect_dicom_series,
    verify_datalist,
)

__all__ = [
    "CTSeriesSummary",
    "DataError",
    "DicomSeriesInfo",
    "LoadVolume",
    "LoadVolumed",
    "NpyStackReader",
    "VolumeFinder",
    "dicom_series_info",
    "find_ct_volumes",
    "find_volumes",
    "inspect_dicom_series",
    "load_or_make_datalist",
    "make_datalist",
    "select_ct_series",
    "summarize_dicom_folder",
    "verify_datalist",
    "write_dicom_series",
]
