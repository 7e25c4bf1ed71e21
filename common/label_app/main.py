# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""A MONAI Label app for meddiff's bundles: segmentation bundles as usual, generation bundles as "generate" tasks.

MONAI Label's ``monaibundle`` sample app hosts only bundles whose ``inference.json`` alone maps an input image to
a prediction. A generation bundle maps a seed to a new volume and its sampling workflow is layered
(``common.json`` + ``train_autoencoder.json`` + ``inference.json``), so this app adds :class:`BundleGenerateTask`:
``POST /infer/<generator>?image=<any study id>&output=image`` with ``params={"seed": 3}`` runs the bundle's own
``sampler`` (``LatentDiffusionSampler.run``) for one volume and returns its NIfTI. The image MONAI Label requires
with every ``/infer`` call is not used. Start it with::

    monailabel start_server --app apps/monailabel --studies <folder> --conf models breast_mri_segmentation \
        --conf generators mri_generative_diffusion --conf zoo_source local

``models``/``generators`` name bundle folders under ``<app>/model/`` (``meddiff export`` copies a bundle there with
meddiff inside). ``--conf generate_overlays demo_brain.json`` appends overlays (from the bundle's ``configs/``)
after the sampling configs, e.g. the demo weights' geometry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from monai.bundle import ConfigParser
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import get_bundle_models, name_to_device

__all__ = ["BundleGenerateTask", "MeddiffLabelApp"]

logger = logging.getLogger(__name__)

SAMPLING_CONFIGS = ("common.json", "train_autoencoder.json", "inference.json")


class BundleGenerateTask(InferTask):
    """One synthetic volume per request from a generation bundle's own sampling workflow.

    Args:
        path: the (exported) bundle folder.
        overlays: config files of the bundle appended after :data:`SAMPLING_CONFIGS`.
    """

    def __init__(self, path: str, overlays: list[str] | None = None) -> None:
        self.path = path
        self.files = [os.path.join(path, "configs", c) for c in (*SAMPLING_CONFIGS, *(overlays or []))]
        missing = [f for f in self.files if not os.path.isfile(f)]
        self.valid = not missing
        if missing:
            logger.warning("Ignore %s as its sampling configs are missing: %s", path, missing)
        meta_file = os.path.join(path, "configs", "metadata.json")
        meta: dict[str, Any] = {}
        if os.path.isfile(meta_file):
            with open(meta_file) as f:
                meta = json.load(f)
        self.version = meta.get("version")
        super().__init__(type=InferType.OTHERS, labels=None, dimension=3,
                         description=f"generate: {meta.get('description', os.path.basename(path))}",
                         config={"seed": 0})

    def is_valid(self) -> bool:
        return self.valid

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["version"] = self.version
        return i

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Sample one volume; ``request["seed"]`` picks it, ``request["device"]`` where it runs.

        ``request["num_inference_steps"]``, when given, replaces the bundle's number of sampling steps.

        Returns:
            The NIfTI (a temporary file MONAI Label sends and removes) and the sampling record.
        """
        seed = int(request.get("seed", 0))
        device = name_to_device(request.get("device"))
        out_dir = tempfile.mkdtemp(prefix="meddiff_generate_")
        parser = ConfigParser()
        parser.read_config(self.files)
        parser.update({"bundle_root": self.path, "output_dir": out_dir, "num_samples": 1, "sample_seed": seed,
                       "device": f"$torch.device('{device}')", "progress": False})
        if request.get("num_inference_steps"):
            parser["num_inference_steps"] = int(request["num_inference_steps"])
        sys.path.insert(0, self.path)  # the exported bundle's meddiff
        try:
            written = parser.get_parsed_content("sampler").run()
            with open(os.path.join(out_dir, "samples.json")) as f:
                record = json.load(f)
            fd, result = tempfile.mkstemp(suffix=".nii.gz")
            os.close(fd)
            shutil.move(str(written[0]), result)
        finally:
            sys.path.remove(self.path)
            shutil.rmtree(out_dir, ignore_errors=True)
        logger.info("generated seed %d with %s", seed, os.path.basename(self.path))
        keep = ("sampling_method", "num_inference_steps", "spacing", "axcodes")
        return result, {"seed": seed, "synthetic": True, **{k: record[k] for k in keep if k in record}}


class MeddiffLabelApp(MONAILabelApp):
    """Segmentation bundles (``--conf models``) with MONAI Label's bundle tasks; generators (``--conf generators``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.models = get_bundle_models(app_dir, conf) if conf.get("models") else {}
        self.generators = get_bundle_models(app_dir, conf, conf_key="generators") if conf.get("generators") else {}
        self.overlays = [c.strip() for c in conf.get("generate_overlays", "").split(",") if c.strip()]
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="meddiff bundles",
                         description="meddiff segmentation and generation bundles", version="0.1.0")

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.models.items():
            infers[name] = BundleInferTask(path, self.conf)
        for name, path in self.generators.items():
            infers[name] = BundleGenerateTask(path, self.overlays)
        return {n: t for n, t in infers.items() if t.is_valid()}

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers = {name: BundleTrainTask(path, self.conf) for name, path in self.models.items()}
        return {n: t for n, t in trainers.items() if t.is_valid()}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
