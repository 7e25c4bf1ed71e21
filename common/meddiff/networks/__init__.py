# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
from .controlnet3d import Pseudo3DControlNet, controlnet_from_denoiser
from .pretrained import load_pretrained, load_weights
from .pseudo3d_unet import Pseudo3DUNet
from .slice_discriminator import SliceDiscriminator

__all__ = ["Pseudo3DControlNet", "Pseudo3DUNet", "SliceDiscriminator", "controlnet_from_denoiser", "load_pretrained",
           "load_weights"]
