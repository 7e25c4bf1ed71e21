# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Data loading and checking: NIfTI / DICOM series / ``.npy`` volumes, DICOM writing, datalists."""

from __future__ import annotations

from .datalist import find_volumes, load_or_make_datalist, make_datalist
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
    "DataError",
    "DicomSeriesInfo",
    "LoadVolume",
    "LoadVolumed",
    "NpyStackReader",
    "dicom_series_info",
    "find_volumes",
    "inspect_dicom_series",
    "load_or_make_datalist",
    "make_datalist",
    "verify_datalist",
    "write_dicom_series",
]
