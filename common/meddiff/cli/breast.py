# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""``meddiff`` commands of the breast segmentation bundle: phantoms, the label-budget experiment, the demo.

Heavy imports happen inside the functions, so ``meddiff --help`` stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["breast_demo", "breast_experiment", "breast_phantoms"]

logger = logging.getLogger("meddiff.cli")


def breast_phantoms(
    output_dir: str,
    num_cases: int = 20,
    num_test: int = 0,
    shape: Sequence[int] = (96, 64, 40),
    fov_mm: Sequence[float] = (360.0, 220.0, 180.0),
    seed: int = 0,
    labels: bool = True,
    oblique_degrees: float = 0.0,
) -> str:
    """Write procedural breast-MRI PHANTOMS (not patient data) as NIfTI, with whole-breast masks.

    With labels: imagesTr/, labelsTr/, imagesTs/, labelsTs/ and a Decathlon-style dataset.json (the
    labelled layout the breast bundle reads). With ``--nolabels``: images only, for pre-training.

    Args:
        output_dir: destination folder.
        num_cases: number of phantoms (test cases included).
        num_test: how many form the test split.
        shape: voxels X,Y,Z (left-right, posterior-anterior, inferior-superior), e.g. ``--shape 96,64,40``.
        fov_mm: field of view in mm; spacing is fov_mm / shape (anisotropic by default).
        seed: seed of the set.
        labels: write masks and dataset.json (``--nolabels`` for images only).
        oblique_degrees: maximum random rotation of each affine.

    Returns:
        The output folder.
    """
    from meddiff.data.phantoms import write_breast_phantoms

    write_breast_phantoms(output_dir, num_cases=num_cases, num_test=num_test, shape=shape, fov_mm=fov_mm, seed=seed,
                          labels=labels, oblique_degrees=oblique_degrees)
    return output_dir


def breast_experiment(
    labelled_datalist: str,
    output_dir: str,
    unlabelled_dir: str | None = None,
    budgets: Sequence[float] = (5, 10, 20, 50),
    seeds: Sequence[int] = (0, 1, 2),
    num_val: int = 2,
    split_seed: int = 0,
    pretrained_weights: str | None = None,
    bundle: str | None = None,
    overrides: Any = None,
    pretrain_overrides: Any = None,
    train_overrides: Any = None,
    evaluate_overrides: Any = None,
    launcher: str = "subprocess",
    arms: Sequence[str] = ("scratch", "pretrained"),
    generator_bundle: str | None = None,
    generator_overrides: Any = None,
    num_generated: int = 40,
    num_pairs: int = 40,
    mask_augmentation: str = "affine",
) -> str:
    """Label-budget experiment: train from scratch vs from pre-training per budget and seed.

    Arms: ``scratch``; ``pretrained`` (restoration pre-training on the unlabelled volumes); ``generated_ssl``
    (restoration pre-training on samples of the MRI generation bundle trained on the unlabelled volumes);
    ``controlnet_pairs`` (supervised pre-training on image + mask pairs of a ControlNet trained on the budget's
    labels only). Resumable: rerun the same command to continue, or with more arms; finished runs are not
    redone. Writes results.csv, per_case.csv, summary.csv (95% t intervals, paired Wilcoxon and t-tests of each
    arm against scratch) and dice_vs_budget.png.

    Args:
        labelled_datalist: dataset.json with 'training' (labelled pool) and 'test' image/label pairs.
        output_dir: experiment folder.
        unlabelled_dir: folder of synthetic (unlabelled) volumes to pre-train on.
        budgets: numbers of labelled cases or pool fractions, e.g. ``--budgets 5,10,20,50``.
        seeds: seeds, e.g. ``--seeds 0,1,2``.
        num_val: fixed validation cases taken from the pool.
        split_seed: seed of the validation draw and of the budget subsets.
        pretrained_weights: reuse these pre-trained weights instead of pre-training.
        bundle: the breast bundle folder (default: the repository's).
        overrides: config overrides for every stage: a dict (``--overrides "{'max_steps': 5000}"``) or a JSON file.
        pretrain_overrides: extra overrides of pre-training (dict or JSON file).
        train_overrides: extra overrides of the training runs (dict or JSON file).
        evaluate_overrides: extra overrides of the evaluations (dict or JSON file).
        launcher: ``subprocess`` (one ``python -m monai.bundle run`` per stage) or ``inprocess``.
        arms: e.g. ``--arms scratch,pretrained,generated_ssl,controlnet_pairs``.
        generator_bundle: the MRI generation bundle folder (default: the repository's).
        generator_overrides: overrides of the generation bundle's stages (dict or JSON file); a key named after a
            stage (``train_autoencoder``, ``train_diffusion``, ``train_controlnet``, ``sample``,
            ``sample_controlnet``) holds that stage's own overrides.
        num_generated: generated volumes for ``generated_ssl``.
        num_pairs: ControlNet image + mask pairs per budget and seed for ``controlnet_pairs``.
        mask_augmentation: ``off``, ``affine`` or ``elastic`` (how the budget's masks are varied).

    Returns:
        The summary CSV path.
    """
    from meddiff.experiments.label_budget import ExperimentError, run_label_budget_experiment

    try:
        result = run_label_budget_experiment(
            labelled_datalist, output_dir, unlabelled_dir=unlabelled_dir, budgets=budgets, seeds=seeds,
            num_val=num_val, split_seed=split_seed, pretrained_weights=pretrained_weights, bundle=bundle,
            overrides=overrides, pretrain_overrides=pretrain_overrides, train_overrides=train_overrides,
            evaluate_overrides=evaluate_overrides, launcher=launcher, arms=arms, generator_bundle=generator_bundle,
            generator_overrides=generator_overrides, num_generated=int(num_generated), num_pairs=int(num_pairs),
            mask_augmentation=mask_augmentation)
    except (ExperimentError, ValueError, FileNotFoundError) as e:  # bad arguments or a failed stage: one line
        logger.error("breast-experiment: %s", e)
        raise SystemExit(1) from None
    logger.info("summary: %s, plot: %s", result["summary_csv"], result["plot"])
    return result["summary_csv"]


def breast_demo(output_dir: str = "demo_output/breast", train: bool = False) -> str:
    """Segment held-out breast PHANTOMS with the shipped weights (seconds); ``--train`` retrains first (minutes).

    With ``--train``: retrain the shipped weights exactly as documented in the bundle, run a tiny
    label-budget experiment (``experiment/summary.csv``, ``dice_vs_budget.png``), then segment with the
    retrained weights.

    Args:
        output_dir: demo folder (``phantoms/``, ``masks/``, ``eval/``; ``model/`` and ``experiment/`` with ``--train``).
        train: retrain the weights and run the label-budget experiment first.

    Returns:
        The demo folder.
    """
    from meddiff.cli.demo_breast import run_breast_demo
    from meddiff.utils import as_bool

    return run_breast_demo(output_dir, train=as_bool(train, "train"))
