# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
from .pretrained import load_pretrained, load_weights
from .pseudo3d_unet import Pseudo3DUNet
from .slice_discriminator import SliceDiscriminator

__all__ = ["Pseudo3DUNet", "SliceDiscriminator", "load_pretrained", "load_weights"]
