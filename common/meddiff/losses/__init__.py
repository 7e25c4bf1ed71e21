# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
from .adversarial import feature_matching_loss, hinge_d_loss, hinge_g_loss
from .perceptual import LocalPerceptualLoss

__all__ = ["LocalPerceptualLoss", "feature_matching_loss", "hinge_d_loss", "hinge_g_loss"]
