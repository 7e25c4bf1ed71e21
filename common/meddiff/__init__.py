# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Shared code for the synthetic 3D medical image diffusion bundles: only what MONAI core lacks."""

__version__ = "0.4.1"
