# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Run a generation bundle's workflows through ``python -m monai.bundle run``, as its docs describe.

Shared by the MRI and CT demos (:mod:`meddiff.cli.demo`, :mod:`meddiff.cli.demo_ct`), which import it and not
each other.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "TRAIN_OVERRIDES",
    "bundle_command",
    "check_shipped_weights",
    "demo_train_stages",
    "run_stages",
    "ship_controlnet",
    "ship_weights",
    "trained_weights",
]

logger = logging.getLogger(__name__)

#: the repository root (``bundles/`` lives there)
REPO_ROOT = Path(__file__).resolve().parents[3]
#: overrides of every demo training stage (network sizes come from the bundle's demo overlay)
TRAIN_OVERRIDES: dict[str, str] = {"num_workers": "0", "log_interval": "50", "progress": "false"}


def demo_train_stages(diffusion_steps: int, sample_stage: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """The schedules the shipped demo weights were trained with (each bundle's docs, *Shipped weights*).

    VQ-GAN: 500 steps at lr 1e-3 without the GAN phase (in a run this short it trades L1 for checkerboard
    artefacts; the tests exercise it). Denoiser: ``diffusion_steps`` at batch 4, lr 8e-4 after 100 warm-up
    steps, EMA every step from step 500. Then ``sample_stage``.
    """
    return {
        "train_autoencoder": {"max_steps": "500", "adversarial_start_step": "1000000", "autoencoder_lr": "0.001",
                              "val_interval": "250", "ckpt_interval": "250"},
        "train_diffusion": {"max_steps": str(diffusion_steps), "batch_size": "4", "ema_start_step": "500",
                            "ema_update_every": "1", "val_interval": "500", "ckpt_interval": "250",
                            "warmup_steps": "100", "diffusion_lr": "0.0008"},
        **{k: dict(v) for k, v in sample_stage.items()},
    }


def bundle_command(configs: Sequence[str], overrides: Mapping[str, str]) -> list[str]:
    """The ``python -m monai.bundle run`` command for ``configs`` (merged in order) and ``--key value`` overrides."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(list(configs)).replace(" ", "")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_stages(bundle_dir: str | Path, stages: Mapping[str, Mapping[str, str]], overrides: Mapping[str, str],
               overlays: Sequence[str] = ()) -> None:
    """Run the generation bundle's workflows in order through ``python -m monai.bundle run``.

    Each stage is merged over ``train_autoencoder.json`` as the bundle docs describe, then the ``overlays``
    (e.g. ``configs/demo_brain.json``, geometry and network sizes); every command is logged so it can be rerun
    by hand.

    Args:
        bundle_dir: the bundle folder (the workflows run there).
        stages: workflow name (``train_autoencoder``, ``train_diffusion``, ``inference``) -> its overrides.
        overrides: overrides of every stage (a stage's own win).
        overlays: config files, relative to the bundle, appended after the workflow's.

    Raises:
        subprocess.CalledProcessError: a workflow failed (its output is above the error).
    """
    for stage, stage_overrides in stages.items():
        configs = ["configs/common.json", "configs/train_autoencoder.json"]
        if stage != "train_autoencoder":
            configs.append(f"configs/{stage}.json")
        cmd = bundle_command([*configs, *overlays], {**overrides, **stage_overrides})
        logger.info("running %s:\n  (cd %s && %s)", stage, bundle_dir, shlex.join(cmd))
        # one thread: on a busy 2-core machine OpenMP threads mostly wait
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run(cmd, cwd=bundle_dir, check=True, env=env)


def trained_weights(ckpt_dir: str | Path) -> dict[str, str]:
    """Overrides pointing the weight keys at what the trainers write into ``ckpt_dir`` (not the shipped names)."""
    ckpt = Path(ckpt_dir)
    return {"autoencoder_weights": str(ckpt / "autoencoder.pt"), "diffusion_weights": str(ckpt / "diffusion_model.pt"),
            "latent_info_file": str(ckpt / "diffusion_model.json")}


def check_shipped_weights(bundle_dir: str | Path, names: Sequence[str]) -> None:
    """Raise unless the bundle's ``models/`` holds every shipped file in ``names``.

    Raises:
        FileNotFoundError: naming the missing files and how to get weights anyway.
    """
    models = Path(bundle_dir) / "models"
    missing = [str(models / n) for n in names if not (models / n).is_file()]
    if missing:
        raise FileNotFoundError(f"shipped demo weights missing: {', '.join(missing)} (a checkout without them, or "
                                "`make clean` removed them: `git checkout -- bundles/*/models`, or train new ones "
                                "with `make demo-train`).")


def ship_weights(ckpt_dir: str | Path, bundle_dir: str | Path, denoisers: Mapping[str, str | Path] | None = None,
                 extra: Mapping[str, str] | None = None, denoiser_dtype: str = "float16",
                 controlnets: Mapping[str, str | Path] | None = None) -> Path:
    """Copy a trained demo model into ``bundle_dir/models`` under the zoo's names and write ``weights.sha256``.

    ``autoencoder.pt`` -> ``model_autoencoder.pt`` (as trained); each denoiser run's ``diffusion_model.pt`` /
    ``diffusion_model.json`` -> ``<stem>.pt`` / ``<stem>.json`` (the state dict stored as ``denoiser_dtype`` to
    halve the size; ``load_state_dict`` casts it back to the network's float32); each ControlNet run's
    ``controlnet.pt`` / ``controlnet.json`` likewise -> ``<stem>.pt`` / ``<stem>.json``; and the ``extra`` files as they
    are, renamed (e.g. ``{"nyul_landmarks.json": "model_nyul_landmarks.json"}``: never under a name a training run
    writes, or training in the bundle folder would silently reuse the shipped file).

    Args:
        ckpt_dir: the training runs' ``ckpt_dir`` (the autoencoder's, and the extra files').
        bundle_dir: the bundle folder.
        denoisers: shipped stem -> ``ckpt_dir`` of a denoiser run, e.g. ``{"model": rflow_run, "model_ddpm":
            ddpm_run}`` (default: ``{"model": ckpt_dir}``).
        extra: further files of ``ckpt_dir`` to ship unchanged: source name -> shipped name.
        denoiser_dtype: storage dtype of the denoisers' (and ControlNets') floating-point tensors.
        controlnets: shipped stem -> ``ckpt_dir`` of a ControlNet run (``train_controlnet.json``), e.g.
            ``{"model_controlnet": controlnet_run}``.

    Returns:
        The written ``weights.sha256``.
    """
    import json
    import shutil

    import torch

    from meddiff.cli.export import write_weights_manifest
    from meddiff.utils.atomic import atomic_torch_save, atomic_write_json

    def _copy(source: Path, target: Path) -> None:
        """JSON rewritten as the zoo's formatter writes it (``make lint`` checks it), anything else copied."""
        if source.suffix == ".json":
            atomic_write_json(target, json.loads(source.read_text()))
        else:
            shutil.copyfile(source, target)

    src, models = Path(ckpt_dir), Path(bundle_dir) / "models"
    models.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, denoiser_dtype)

    def denoiser(run: Path, stem: str, source: str = "diffusion_model") -> list[str]:
        state = torch.load(run / f"{source}.pt", map_location="cpu", weights_only=True)
        atomic_torch_save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                          models / f"{stem}.pt")
        _copy(run / f"{source}.json", models / f"{stem}.json")
        return [f"{stem}.pt", f"{stem}.json"]

    shutil.copyfile(src / "autoencoder.pt", models / "model_autoencoder.pt")
    names = ["model_autoencoder.pt"]
    for stem, run in (denoisers or {"model": src}).items():
        names += denoiser(Path(run), stem)
    for stem, run in (controlnets or {}).items():
        names += denoiser(Path(run), stem, "controlnet")
    for name, shipped in (extra or {}).items():
        _copy(src / name, models / shipped)
        names.append(shipped)
    # committed in the repository (nothing to download): listed with their SHA-256 for `sha256sum -c`;
    # `meddiff export --zoo --weights_url URL` turns the list into the zoo's large_files.yml
    out = write_weights_manifest(bundle_dir, [f"models/{name}" for name in names])
    logger.info("shipped %s into %s", ", ".join(names), models)
    return out


def ship_controlnet(run: str | Path, bundle_dir: str | Path, stem: str = "model_controlnet",
                    dtype: str = "float16") -> Path:
    """Ship one ControlNet run beside the bundle's already shipped weights (which stay as they are).

    ``run/controlnet.pt`` / ``run/controlnet.json`` -> ``models/<stem>.pt`` (floating-point tensors stored as
    ``dtype``) / ``models/<stem>.json``; ``weights.sha256`` keeps its other entries and lists the two files.
    :func:`ship_weights` with ``controlnets=`` does the same when shipping every model at once.

    Args:
        run: the ControlNet run's ``ckpt_dir``.
        bundle_dir: the bundle folder.
        stem: shipped name without suffix.
        dtype: storage dtype of the floating-point tensors.

    Returns:
        The written ``weights.sha256``.
    """
    import json

    import torch

    from meddiff.cli.export import WEIGHTS_MANIFEST, read_weights_manifest, write_weights_manifest
    from meddiff.utils.atomic import atomic_torch_save, atomic_write_json

    src, models = Path(run), Path(bundle_dir) / "models"
    models.mkdir(parents=True, exist_ok=True)
    state = torch.load(src / "controlnet.pt", map_location="cpu", weights_only=True)
    cast = getattr(torch, dtype)
    atomic_torch_save({k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()},
                      models / f"{stem}.pt")
    atomic_write_json(models / f"{stem}.json", json.loads((src / "controlnet.json").read_text()))
    new = [f"models/{stem}.pt", f"models/{stem}.json"]
    listed = list(read_weights_manifest(bundle_dir)) if (Path(bundle_dir) / WEIGHTS_MANIFEST).is_file() else []
    out = write_weights_manifest(bundle_dir, [p for p in listed if p not in new] + new)
    logger.info("shipped %s into %s", ", ".join(new), models)
    return out
