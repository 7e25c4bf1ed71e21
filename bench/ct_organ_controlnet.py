# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Mask-conditioned CT on real organ labels: do ControlNet samples follow the label map, measured without a segmenter?

Data: :func:`meddiff.data.demo.make_ct_organ_demo` (variants of a real abdominal CT, 122 x 101 x 30 voxels of
3 mm, with its organ label map :data:`meddiff.data.demo.CT_ORGAN_LABELS`): ``--num_train`` variants (seed 0) train
all three stages, ``--num_test`` held-out variants (seed 1) give the conditioning masks (their ``labelsTr``) and
the real reference images. Everything is trained through the CT bundle's CLI (``python -m monai.bundle run``, in a
copy of the bundle in ``--workdir``, via :func:`meddiff.cli.stages.run_stages`), with small widths like
``configs/demo_head_ct.json`` (VQ-GAN 4x, [16, 32], codebook 256, embedding 4, no GAN phase; pseudo-3D rflow
denoiser ``--unet_channels``), at 3 mm and ``spatial_size`` [128, 96, 32] (the source is padded to 128 and 32 and
cropped from 101 to 96 voxels in width), with the bundle's HU window ``intensity_range`` [-1024, 1024] (lung,
fat and bone are inside it; only cortical bone above 1024 HU would clip, and the source has none above 983 HU).
Then, for every test mask, ``--num_samples_per_mask`` images with the ControlNet (``conditioning_scale`` 1) and the
same seeds with ``conditioning_scale`` 0 (the unconditioned denoiser's images: the baseline). Each stage is cached in
``--workdir`` keyed on the settings it depends on, so a rerun skips the stages that are done.

Rows: ``real`` (the held-out variants themselves: the ceiling), ``VQ-GAN recon`` (the trained autoencoder's
reconstruction of them: what the latent space can hold at all), ``ControlNet`` (cs=1), ``uncond`` (cs=0). Each image
is scored against the label map it was conditioned on, on its own grid (a sample's ``<mask>_<k>_label.nii.gz``):

* **mean HU per label** inside the mask, and its absolute error against the real variant's mean for that label
  (the mask's own image), for ``body liver spleen kidney muscle bone lung``; ``HU MAE`` is the mean over them;
* **threshold Dice** of HU thresholds against the mask (thresholds chosen on the real data, where their Dice is
  highest among round values while soft tissue stays out): ``bone`` = HU > 100 vs label 7 (3 mm partial volume:
  the real bone median is 128 HU, its 25th percentile 96, soft tissues' 95th percentile below 70); ``lung`` =
  HU < -600 vs label 9 inside the mask's body without bowel (labels >= 1 but not 5: bowel gas is legitimately air);
  ``body`` = HU > -500 vs labels >= 1;
* **contrast order**: the share of (image, pair) checks in which the label means are ordered as in real CT
  (bone > liver, liver > muscle, liver > kidney, muscle > body, body > lung);
* seconds per sampled volume from ``samples.json``.

    OMP_NUM_THREADS=2 python bench/ct_organ_controlnet.py --workdir /tmp/ctorgan_work \\
        --out bench/results/ct_organ_controlnet.json --markdown bench/results/ct_organ_controlnet.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from class_conditioning import cached_file  # noqa: E402

from meddiff.cli.stages import REPO_ROOT, run_stages, trained_weights  # noqa: E402
from meddiff.data.demo import CT_ORGAN_LABELS, make_ct_organ_demo  # noqa: E402
from meddiff.utils import atomic_write_json, atomic_write_text, machine_info  # noqa: E402

__all__ = ["EVAL_LABELS", "THRESHOLDS", "CONTRAST_PAIRS", "label_means", "hu_abs_errors", "dice", "threshold_dice",
           "contrast_order", "score_image", "summarise", "format_table", "parse_args", "main"]

logger = logging.getLogger("bench.ct_organ_controlnet")

BUNDLE = REPO_ROOT / "bundles" / "ct_generative_diffusion"
LABEL = {name: int(v) for v, name in CT_ORGAN_LABELS.items()}
#: labels whose mean HU is compared
EVAL_LABELS = ("body", "liver", "spleen", "kidney", "muscle", "bone", "lung")
#: HU thresholds of the threshold Dice (see the module doc)
THRESHOLDS = {"bone": 100.0, "lung": -600.0, "body": -500.0}
#: (brighter, darker) label pairs as they are ordered in real CT
CONTRAST_PAIRS = (("bone", "liver"), ("liver", "muscle"), ("liver", "kidney"), ("muscle", "body"), ("body", "lung"))

DATA_SETTINGS = ("num_train", "noise_hu")
AUTOENCODER_SETTINGS = (*DATA_SETTINGS, "ae_steps", "ae_lr", "ae_batch_size")
DENOISER_SETTINGS = (*AUTOENCODER_SETTINGS, "dm_steps", "dm_lr", "dm_batch_size", "unet_channels",
                     "unet_attention_levels")
CONTROLNET_SETTINGS = (*DENOISER_SETTINGS, "cn_steps", "cn_lr", "cn_batch_size")
SAMPLE_SETTINGS = (*CONTROLNET_SETTINGS, "num_test", "num_samples_per_mask", "sampling_steps")


def label_means(image: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Mean HU of ``image`` inside each label of :data:`CT_ORGAN_LABELS` (``nan`` where the label is absent).

    Args:
        image: (H, W, D) HU.
        label: (H, W, D) integer label map on the same grid.

    Returns:
        ``{label name: mean HU}``.
    """
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} != label shape {label.shape}")
    return {name: float(image[label == v].mean()) if (label == v).any() else float("nan") for name, v in LABEL.items()}


def hu_abs_errors(means: Mapping[str, float], reference: Mapping[str, float],
                  labels: Sequence[str] = EVAL_LABELS) -> dict[str, float]:
    """``|means - reference|`` per label of ``labels`` (HU)."""
    return {name: abs(means[name] - reference[name]) for name in labels}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (``nan`` when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else float("nan")


def threshold_dice(image: np.ndarray, label: np.ndarray,
                   thresholds: Mapping[str, float] = THRESHOLDS) -> dict[str, float]:
    """Dice of HU thresholds of ``image`` against the label map (see the module doc).

    Args:
        image: (H, W, D) HU.
        label: (H, W, D) :data:`CT_ORGAN_LABELS` map on the same grid.
        thresholds: ``{"bone", "lung", "body"}`` HU thresholds.

    Returns:
        ``{"bone", "lung", "body"}`` Dice.
    """
    inside = (label >= 1) & (label != LABEL["bowel"])
    return {"bone": dice(image > thresholds["bone"], label == LABEL["bone"]),
            "lung": dice((image < thresholds["lung"]) & inside, label == LABEL["lung"]),
            "body": dice(image > thresholds["body"], label >= 1)}


def contrast_order(means: Mapping[str, float], pairs: Sequence[tuple[str, str]] = CONTRAST_PAIRS) -> dict[str, bool]:
    """``{"a>b": means[a] > means[b]}`` for each pair."""
    return {f"{a}>{b}": bool(means[a] > means[b]) for a, b in pairs}


def score_image(image: np.ndarray, label: np.ndarray, reference: Mapping[str, float]) -> dict[str, Any]:
    """All the measures of one image against its conditioning label map and the real variant's label means."""
    means = label_means(image, label)
    errors = hu_abs_errors(means, reference)
    return {"mean_hu": means, "hu_abs_error": errors, "hu_mae": float(np.nanmean(list(errors.values()))),
            "dice": threshold_dice(image, label), "contrast": contrast_order(means)}


def summarise(scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over the images of a row (``nan`` entries skipped)."""
    def avg(values: Sequence[float]) -> float:
        return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")

    return {"n": len(scores),
            "mean_hu": {k: avg([s["mean_hu"][k] for s in scores]) for k in EVAL_LABELS},
            "hu_abs_error": {k: avg([s["hu_abs_error"][k] for s in scores]) for k in EVAL_LABELS},
            "hu_mae": avg([s["hu_mae"] for s in scores]),
            "dice": {k: avg([s["dice"][k] for s in scores]) for k in THRESHOLDS},
            "contrast_ok": float(np.mean([v for s in scores for v in s["contrast"].values()])),
            "contrast_ok_per_pair": {k: float(np.mean([s["contrast"][k] for s in scores]))
                                     for k in scores[0]["contrast"]}}


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


#: network sizes of every stage (like ``configs/demo_head_ct.json``; the denoiser's channels are arguments)
WIDTHS: dict[str, Any] = {"autoencoder_channels": [16, 32], "autoencoder_res_layers": 1, "codebook_size": 256,
                          "embedding_dim": 4, "discriminator_channels": 8, "discriminator_layers": 2,
                          "unet_res_blocks": 1, "unet_head_channels": 16}


def _geometry_overrides(args: argparse.Namespace) -> dict[str, str]:
    """CLI overrides of every stage: geometry and the small widths."""
    return {"pixdim": "[3.0,3.0,3.0]", "spatial_size": args.spatial_size,
            **{k: json.dumps(v).replace(" ", "") for k, v in WIDTHS.items()}, "unet_channels": args.unet_channels,
            "unet_attention_levels": args.unet_attention_levels, "num_workers": "0", "progress": "false",
            "log_interval": "100"}


def _stage(run_dir: Path, done_file: str, bundle: Path, stages: dict[str, dict[str, str]], overrides: dict[str, str],
           overlays: Sequence[str] = ()) -> float:
    """Run a stage into ``run_dir`` unless ``run_dir/<done_file>`` and its timing marker exist; its wall seconds."""
    marker = run_dir / "bench_done.json"
    if (run_dir / done_file).is_file() and marker.is_file():
        seconds = float(json.loads(marker.read_text())["seconds"])
        logger.info("reusing %s (trained in %.0f s)", run_dir, seconds)
        return seconds
    run_dir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    run_stages(bundle, stages, {**overrides, "ckpt_dir": str(run_dir)}, overlays=overlays)
    seconds = time.perf_counter() - tic
    atomic_write_json(marker, {"seconds": seconds})
    logger.info("%s done in %.0f s", run_dir.name, seconds)
    return seconds


def _reconstruct(bundle: Path, spatial_size: Sequence[int], weights: Path, images: Sequence[Path],
                 labels: Sequence[Path], out_dir: Path, intensity_range: Sequence[float]) -> list[tuple[Path, Path]]:
    """The autoencoder's reconstructions of the real test volumes (HU) on the model grid, with their label maps."""
    from monai.bundle import ConfigParser
    from monai.transforms import ResizeWithPadOrCrop

    from meddiff.networks import load_pretrained

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in ("common.json", "train_autoencoder.json")])
    parser.update({"bundle_root": str(bundle), "spatial_size": list(spatial_size), **WIDTHS})
    autoencoder = load_pretrained(parser.get_parsed_content("autoencoder_def"), str(weights)).eval()
    size = list(spatial_size)
    lo, hi = intensity_range
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for image_path, label_path in zip(images, labels):
        nii = nib.load(str(image_path))
        hu = ResizeWithPadOrCrop(size, value=lo)(torch.as_tensor(_read(image_path))[None])
        label = ResizeWithPadOrCrop(size)(torch.as_tensor(_read(label_path))[None])
        x = (hu.clamp(lo, hi) - lo) / (hi - lo) * 2 - 1
        with torch.no_grad():
            recon = autoencoder.decode_stage_2_outputs(autoencoder.encode_stage_2_inputs(x[None].float()))[0]
        recon_hu = (recon.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo
        name = image_path.name.replace(".nii.gz", "")
        pair = (out_dir / f"{name}_recon_image.nii.gz", out_dir / f"{name}_recon_label.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(recon_hu[0], dtype=np.float32), nii.affine), str(pair[0]))
        nib.save(nib.Nifti1Image(np.asarray(label[0], dtype=np.uint8), nii.affine), str(pair[1]))
        pairs.append(pair)
    return pairs


def _sample_pairs(folder: Path) -> tuple[list[tuple[str, Path, Path]], list[float]]:
    """``(mask name, image, label)`` of every sample in ``folder`` (from ``samples.json``) and their seconds."""
    records = json.loads((folder / "samples.json").read_text())
    items = records["samples"] if isinstance(records, dict) and "samples" in records else records
    pairs, seconds = [], []
    for image in sorted(folder.glob("*_image.nii.gz")):
        stem = image.name[: -len("_image.nii.gz")]
        mask = stem.rsplit("_", 1)[0]
        pairs.append((mask, image, folder / f"{stem}_label.nii.gz"))
    for item in items if isinstance(items, list) else items.values():
        if isinstance(item, dict) and "seconds" in item:
            seconds.append(float(item["seconds"]))
    return pairs, seconds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's arguments (see the module doc).

    Raises:
        SystemExit: an unknown or malformed argument (argparse's message), or a step count below 1.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_train", type=int, default=16, help="training variants (seed 0)")
    parser.add_argument("--num_test", type=int, default=4, help="held-out variants (seed 1): masks and real reference")
    parser.add_argument("--noise_hu", type=float, default=10.0)
    parser.add_argument("--spatial_size", default="[128,96,32]")
    parser.add_argument("--ae_steps", type=int, default=2000)
    parser.add_argument("--ae_lr", type=float, default=1e-3)
    parser.add_argument("--ae_batch_size", type=int, default=2)
    parser.add_argument("--dm_steps", type=int, default=3000)
    parser.add_argument("--dm_lr", type=float, default=5e-4)
    parser.add_argument("--dm_batch_size", type=int, default=4)
    parser.add_argument("--unet_channels", default="[16,32,64]")
    parser.add_argument("--unet_attention_levels", default="[False,True,True]")
    parser.add_argument("--cn_steps", type=int, default=500)
    parser.add_argument("--cn_lr", type=float, default=5e-4)
    parser.add_argument("--cn_batch_size", type=int, default=4)
    parser.add_argument("--num_samples_per_mask", type=int, default=2)
    parser.add_argument("--sampling_steps", type=int, default=10, help="rectified-flow sampling steps")
    parser.add_argument("--workdir", default=None, help="keep data, weights and samples here (default: a temp dir)")
    parser.add_argument("--out", default="bench/results/ct_organ_controlnet.json")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    for key in ("ae_steps", "dm_steps", "cn_steps", "num_train", "num_test", "num_samples_per_mask"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (see the module doc): train, sample, score, write ``--out`` and ``--markdown``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        data = cached_file(work, "data", args, DATA_SETTINGS).with_suffix("")
        train, test = data / "train", data / "test"
        if not (test / "dataset.json").is_file():
            make_ct_organ_demo(train, args.num_train, seed=0, noise_hu=args.noise_hu)
            make_ct_organ_demo(test, args.num_test, seed=1, noise_hu=args.noise_hu)
        test_images = sorted((test / "imagesTr").glob("*.nii.gz"))[: args.num_test]
        test_labels = [test / "labelsTr" / p.name for p in test_images]
        masks = work / f"masks_{len(test_images)}"
        masks.mkdir(exist_ok=True)
        for label in test_labels:
            shutil.copyfile(label, masks / label.name)
        # the bundle's configs in the workdir: nothing is written into the repository's bundles/*/models
        bundle = work / "bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(BUNDLE / "configs", bundle / "configs")
        common = {"bundle_root": str(bundle), **_geometry_overrides(args)}
        ae_dir = cached_file(work, "autoencoder", args, AUTOENCODER_SETTINGS).with_suffix("")
        dm_dir = cached_file(work, "denoiser", args, DENOISER_SETTINGS).with_suffix("")
        cn_dir = cached_file(work, "controlnet", args, CONTROLNET_SETTINGS).with_suffix("")
        seconds = {}
        seconds["autoencoder"] = _stage(ae_dir, "autoencoder.pt", bundle, {"train_autoencoder": {
            "dataset_dir": str(train / "imagesTr"), "max_steps": str(args.ae_steps), "batch_size":
            str(args.ae_batch_size), "autoencoder_lr": str(args.ae_lr), "adversarial_start_step": "1000000",
            "val_fraction": "0.125", "val_interval": str(args.ae_steps), "ckpt_interval": str(args.ae_steps)}},
            common)
        weights = {**trained_weights(dm_dir), "autoencoder_weights": str(ae_dir / "autoencoder.pt")}
        seconds["denoiser"] = _stage(dm_dir, "diffusion_model.pt", bundle, {"train_diffusion": {
            "dataset_dir": str(train / "imagesTr"), "max_steps": str(args.dm_steps), "batch_size":
            str(args.dm_batch_size), "diffusion_lr": str(args.dm_lr), "warmup_steps": "200", "objective": "rflow",
            "val_fraction": "0.125", "val_interval": str(args.dm_steps), "ckpt_interval": str(args.dm_steps),
            **{k: v for k, v in weights.items() if k == "autoencoder_weights"}}}, common)
        cn = {"controlnet_weights": str(cn_dir / "controlnet.pt"), "controlnet_info_file": str(cn_dir / "controlnet.json")}
        seconds["controlnet"] = _stage(cn_dir, "controlnet.pt", bundle, {"train_diffusion": {
            "controlnet_datalist_file": str(train / "dataset.json"), "num_label_classes": str(len(CT_ORGAN_LABELS)),
            "max_steps": str(args.cn_steps), "batch_size": str(args.cn_batch_size), "controlnet_lr": str(args.cn_lr),
            "warmup_steps": "100", "val_fraction": "0.125", "val_interval": str(args.cn_steps),
            "ckpt_interval": str(args.cn_steps), **weights}}, common, overlays=["configs/train_controlnet.json"])
        sample_dirs = {}
        for name, scale in (("ControlNet", 1.0), ("uncond", 0.0)):
            out = cached_file(work, f"samples_cs{scale:g}", args, SAMPLE_SETTINGS).with_suffix("")
            sample_dirs[name] = out
            seconds[f"sample_{name}"] = _stage(out, "samples.json", bundle, {"inference": {
                "mask_dir": str(masks), "num_samples_per_mask": str(args.num_samples_per_mask),
                "conditioning_scale": str(scale), "num_inference_steps": str(args.sampling_steps),
                "output_dir": str(out), **weights, **cn}}, common, overlays=["configs/inference_controlnet.json"])

        intensity_range = json.loads((bundle / "configs" / "train_autoencoder.json").read_text())["intensity_range"]
        reference = {p.name.replace(".nii.gz", ""): label_means(_read(p), _read(q))
                     for p, q in zip(test_images, test_labels)}
        rows: dict[str, list[dict[str, Any]]] = {"real": [], "VQ-GAN recon": [], "ControlNet": [], "uncond": []}
        for p, q in zip(test_images, test_labels):
            rows["real"].append(score_image(_read(p), _read(q), reference[p.name.replace(".nii.gz", "")]))
        recon = _reconstruct(bundle, json.loads(args.spatial_size), ae_dir / "autoencoder.pt", test_images, test_labels,
                             work / "recon", intensity_range)
        for p, (image, label) in zip(test_images, recon):
            rows["VQ-GAN recon"].append(score_image(_read(image), _read(label), reference[p.name.replace(".nii.gz",
                                                                                                         "")]))
        sample_seconds = {}
        for name, folder in sample_dirs.items():
            pairs, secs = _sample_pairs(folder)
            sample_seconds[name] = float(np.mean(secs)) if secs else None
            for mask, image, label in pairs:
                rows[name].append(score_image(_read(image), _read(label), reference[mask]))
        # natural spread: each held-out variant's label means against the mean of the others'
        spread = [hu_abs_errors(reference[k], {n: float(np.mean([reference[o][n] for o in reference if o != k]))
                                               for n in EVAL_LABELS}) for k in reference]
    result = {"rows": {name: {**summarise(scores), "seconds_per_volume": sample_seconds.get(name),
                              "per_image": scores} for name, scores in rows.items()},
              "real_between_variant_hu_mae": float(np.mean([np.mean(list(s.values())) for s in spread])),
              "stage_seconds": seconds, "thresholds": THRESHOLDS, "intensity_range": intensity_range,
              "settings": vars(args), "machine": machine_info(), "wall_seconds": time.perf_counter() - tic,
              "command": "python bench/ct_organ_controlnet.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_json(Path(args.out), result)
    text = format_table(result)
    if args.markdown:
        atomic_write_text(Path(args.markdown), text + "\n")
    logger.info("results in %s\n%s", args.out, text)
    return result


def format_table(result: Mapping[str, Any]) -> str:
    """Markdown table of the rows."""
    lines = ["| row | n | " + " | ".join(f"{k} HU (err)" for k in EVAL_LABELS)
             + " | HU MAE | Dice bone | Dice lung | Dice body | contrast order | s/volume |",
             "|---|---|" + "---|" * len(EVAL_LABELS) + "---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        cells = " | ".join(f"{row['mean_hu'][k]:.0f} ({row['hu_abs_error'][k]:.0f})" for k in EVAL_LABELS)
        secs = row.get("seconds_per_volume")
        lines.append(f"| {name} | {row['n']} | {cells} | {row['hu_mae']:.1f} | {row['dice']['bone']:.3f} | "
                     f"{row['dice']['lung']:.3f} | {row['dice']['body']:.3f} | {row['contrast_ok']:.2f} | "
                     f"{'' if secs is None else f'{secs:.2f}'} |")
    s, t = result["stage_seconds"], result["thresholds"]
    lines.append(f"\nthresholds: bone > {t['bone']:g} HU, lung < {t['lung']:g} HU (body without bowel), body > "
                 f"{t['body']:g} HU; real between-variant HU MAE (each held-out variant vs the others' mean): "
                 f"{result['real_between_variant_hu_mae']:.1f}; HU window {result['intensity_range']}; stage seconds: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
