# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
from .controlnet_trainer import ControlNetTrainer
from .diffusion_trainer import DiffusionTrainer
from .ema import EMA
from .prepare_batch import RFlowPrepareBatch, X0PredictionPrepareBatch, diffusion_prepare_batch
from .sampler import ResumableSampler
from .shape_chain import check_sampling_size, check_shape_chain, nearest_multiples
from .trainer import Trainer, TrainerSettings
from .vqgan_trainer import VQGANTrainer

__all__ = [
    "EMA",
    "ControlNetTrainer",
    "DiffusionTrainer",
    "RFlowPrepareBatch",
    "ResumableSampler",
    "Trainer",
    "TrainerSettings",
    "VQGANTrainer",
    "X0PredictionPrepareBatch",
    "check_sampling_size",
    "check_shape_chain",
    "diffusion_prepare_batch",
    "nearest_multiples",
]
