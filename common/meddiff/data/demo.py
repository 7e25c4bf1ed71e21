# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Small real-image demo sets, made offline.

* MRI: NIfTI variants of the ICBM 2009a T1 template shipped in nilearn's wheel (:func:`make_brain_demo`).
* CT: DICOM trees (patient / study / series, with decoy non-CT series) of variants of a real head CT atlas
  shipped in this package, derived from TotalSegmentator's ``ct_brain_atlas_1mm.nii.gz`` (Apache-2.0;
  :func:`make_ct_demo`, :func:`derive_ct_demo_source`).
* Labelled CT: variants of a real abdominal CT with its organ label map, both from TotalSegmentator's
  test files (Apache-2.0), as NIfTI pairs or DICOM series with a DICOM SEG (:func:`make_ct_organ_demo`).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Affine, Spacing
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)

from meddiff.data.dicom_writer import write_dicom_series
from meddiff.data.writers import save_nifti
from meddiff.utils.atomic import atomic_path, atomic_write_json, atomic_write_text

__all__ = [
    "CT_ABDOMEN_FILE",
    "CT_HEAD_FILE",
    "CT_ORGAN_LABELS",
    "ICBM_T1_FILE",
    "ct_head_path",
    "derive_ct_demo_source",
    "icbm_t1_path",
    "make_brain_demo",
    "make_brain_label_demo",
    "make_ct_demo",
    "make_ct_organ_demo",
    "make_lesion_demo",
    "write_decoy_series",
]

logger = logging.getLogger(__name__)

ICBM_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
#: real head CT in HU (int16, 2 mm), shipped in meddiff/data/resources (see the README there for its licence)
CT_HEAD_FILE = "ct_head_atlas_2mm.nii.gz"
#: real abdominal CT in HU (int16, 3 mm) and its TotalSegmentator label map, in meddiff/data/resources (README there)
CT_ABDOMEN_FILE = "ct_abdomen_3mm.nii.gz"
CT_ABDOMEN_LABELS_FILE = "ct_abdomen_3mm_totalseg.nii.gz"
#: Hounsfield units of air
AIR_HU = -1000
#: TotalSegmentator ("total" task) class names of the values in CT_ABDOMEN_LABELS_FILE
TOTALSEG_CLASSES = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
    13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 18: "small_bowel", 19: "duodenum", 20: "colon",
    30: "vertebrae_L2", 31: "vertebrae_L1", 32: "vertebrae_T12", 33: "vertebrae_T11", 52: "aorta",
    63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 79: "spinal_cord", 86: "autochthon_left",
    87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right", 98: "rib_left_7", 99: "rib_left_8",
    100: "rib_left_9", 101: "rib_left_10", 102: "rib_left_11", 103: "rib_left_12", 110: "rib_right_7",
    111: "rib_right_8", 112: "rib_right_9", 113: "rib_right_10", 114: "rib_right_11", 115: "rib_right_12",
    117: "costal_cartilages",
}
#: label values of :func:`make_ct_organ_demo`
CT_ORGAN_LABELS = {"0": "background", "1": "body", "2": "liver", "3": "spleen", "4": "kidney", "5": "bowel",
                   "6": "vessel", "7": "bone", "8": "muscle", "9": "lung"}
#: TotalSegmentator class-name prefixes merged into each label of CT_ORGAN_LABELS (other classes become "body")
CT_ORGAN_GROUPS = {
    "liver": ("liver",), "spleen": ("spleen",), "kidney": ("kidney_",),
    "bowel": ("stomach", "duodenum", "small_bowel", "colon"),
    "vessel": ("aorta", "inferior_vena_cava", "portal_vein"), "bone": ("vertebrae_", "rib_", "costal_cartilages"),
    "muscle": ("autochthon_", "iliopsoas_"), "lung": ("lung_",),
}
#: tissue threshold of the body outline, HU
BODY_HU = -500


def _rigid_transform(rng: np.random.Generator) -> Affine:
    """A small random rotation (±6°), scaling (±5 %) and shift (±1.5 voxels), zero-padded."""
    return Affine(
        rotate_params=[math.radians(float(a)) for a in rng.uniform(-6, 6, 3)],
        scale_params=[float(v) for v in rng.uniform(0.95, 1.05, 3)],
        translate_params=[float(v) for v in rng.uniform(-1.5, 1.5, 3)],
        padding_mode="zeros",
        image_only=True,
    )


def _random_rigid(image: MetaTensor, rng: np.random.Generator) -> MetaTensor:
    """A copy of ``image`` under :func:`_rigid_transform`."""
    return _rigid_transform(rng)(image.clone())


def icbm_t1_path() -> Path:
    """Path of the ICBM152 2009a T1 template inside the installed nilearn package (no download)."""
    try:
        path = Path(str(resources.files("nilearn.datasets.data") / ICBM_T1_FILE))
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the brain demo needs nilearn (pip install nilearn): it carries the template") from e
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from this nilearn installation")
    return path


def make_brain_demo(output_dir: str | Path, num_volumes: int = 8, spacing: float = 5.5, seed: int = 0) -> list[Path]:
    """Write ``num_volumes`` NIfTI variants of the template: resampled to ``spacing`` mm, each with a small
    random rigid motion and scaling, a smooth bias field, a gamma change and Rician-like noise, so the
    generative models see a (tiny) population rather than one image.

    Args:
        output_dir: folder to write ``brain_XX.nii.gz`` into.
        num_volumes: number of variants.
        spacing: isotropic voxel size in mm.
        seed: random seed of the variations.

    Returns:
        The written files.
    """
    src = nib.load(icbm_t1_path())
    image = MetaTensor(np.asarray(src.dataobj, dtype=np.float32)[None], affine=torch.as_tensor(src.affine))
    resampled = Spacing(pixdim=(spacing,) * 3, mode="bilinear")(image)
    affine = resampled.affine.numpy()
    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    written = []
    shape = resampled.shape[1:]
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    for i in range(num_volumes):
        moved = _random_rigid(resampled, rng)
        volume = np.clip(np.asarray(moved[0]), 0, None)
        volume = volume / max(volume.max(), 1e-6)
        bias = np.exp(sum(c * g for c, g in zip(rng.uniform(-0.25, 0.25, 3), grids)))
        volume = volume ** rng.uniform(0.85, 1.15) * bias
        sigma = 0.02
        volume = np.hypot(volume + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
        written.append(save_nifti((volume * 1000).astype(np.float32), affine, out / f"brain_{i:02d}.nii.gz"))
    logger.info("wrote %d demo volumes (%s voxels, %.1f mm) to %s", num_volumes, tuple(shape), spacing, out)
    return written


#: label values of :func:`make_brain_label_demo`
BRAIN_LABELS = {"0": "background", "1": "brain", "2": "bright tissue"}


def make_brain_label_demo(output_dir: str | Path, num_volumes: int = 8, spacing: float = 3.0, seed: int = 0,
                          head_threshold: float = 0.15, bright_quantile: float = 0.65) -> Path:
    """Mask-conditioning demo: :func:`make_brain_demo` volumes with a label map each and a MONAI ``dataset.json``.

    Labels (deterministic, from each volume's own intensities): 0 background, 1 brain (intensity above
    ``head_threshold`` of the volume's 99.5th percentile: the template is skull-stripped), 2 bright tissue (brain
    voxels above the ``bright_quantile`` quantile of the brain's intensities: mostly white matter).

    Layout: ``imagesTr/brain_XX.nii.gz``, ``labelsTr/brain_XX.nii.gz`` (uint8, same affine) and ``dataset.json``
    (``labels``, ``numTraining``, ``training`` items ``{"image", "label"}`` relative to ``output_dir``).

    Args:
        output_dir: the data set folder.
        num_volumes: number of volumes.
        spacing: isotropic voxel size in mm.
        seed: random seed of the variations (:func:`make_brain_demo`).
        head_threshold: head mask threshold, a fraction of the 99.5th intensity percentile.
        bright_quantile: quantile of the head's intensities above which a voxel is label 2.

    Returns:
        The written ``dataset.json``.
    """
    out = Path(output_dir)
    images = make_brain_demo(out / "imagesTr", num_volumes=num_volumes, spacing=spacing, seed=seed)
    items = []
    for path in images:
        img = nib.load(path)
        volume = np.asarray(img.dataobj, dtype=np.float32)
        head = volume > head_threshold * np.percentile(volume, 99.5)
        label = head.astype(np.uint8)
        label[head & (volume > np.quantile(volume[head], bright_quantile))] = 2
        save_nifti(label, img.affine, out / "labelsTr" / path.name, dtype=np.uint8)
        items.append({"image": f"imagesTr/{path.name}", "label": f"labelsTr/{path.name}"})
    dataset = {"name": "meddiff brain label demo", "labels": BRAIN_LABELS, "numTraining": len(items),
               "training": items}
    target = out / "dataset.json"
    atomic_write_json(target, dataset)
    logger.info("wrote %d demo volumes with label maps and %s", len(items), target)
    return target


#: class names of :func:`make_lesion_demo`
LESION_CLASSES = ("healthy", "lesion")


def make_lesion_demo(
    output_dir: str | Path,
    num_volumes: int = 12,
    spacing: float = 3.0,
    seed: int = 0,
    lesion_radius_mm: float = 30.0,
    lesion_contrast: float = 0.8,
    labels_file: str | Path | None = None,
) -> list[Path]:
    """Two-class demo for class-conditioned generation: :func:`make_brain_demo` volumes, every odd-numbered
    one with a simulated lesion (a bright Gaussian blob in the left hemisphere, at a fixed place in world
    coordinates), and a labels CSV ``file,class`` (``healthy`` / ``lesion``) for ``labels_file``.

    Args:
        output_dir: folder to write ``brain_XX.nii.gz`` into.
        num_volumes: number of volumes (half of them, rounded down, with a lesion).
        spacing: isotropic voxel size in mm.
        seed: random seed of the variations.
        lesion_radius_mm: the blob's radius (2 standard deviations of the Gaussian), in mm. The default (10
            voxels at 3 mm) survives the demo VQ-GAN once fine-tuned on these volumes; a 12 mm blob (2 voxels
            sigma) does not (bench/README.md, "Class conditioning").
        lesion_contrast: the blob's peak, as a fraction of the volume's maximum, added to the image.
        labels_file: the CSV to write (default ``<output_dir>/../labels.csv``, outside the data folder).

    Returns:
        The written volumes.
    """
    written = make_brain_demo(output_dir, num_volumes=num_volumes, spacing=spacing, seed=seed)
    rows = ["file,class"]
    for i, path in enumerate(written):
        name = LESION_CLASSES[i % 2]
        rows.append(f"{path.name},{name}")
        if name == "healthy":
            continue
        img = nib.load(path)
        volume = np.asarray(img.dataobj, dtype=np.float32)
        world = np.stack(np.meshgrid(*[np.arange(s) for s in volume.shape], indexing="ij"), -1) @ img.affine[:3, :3].T
        world = world + img.affine[:3, 3]
        centre = np.array([-30.0, -10.0, 15.0])  # mm, RAS: left hemisphere, white matter of the template
        sigma = lesion_radius_mm / 2.0
        blob = np.exp(-((world - centre) ** 2).sum(-1) / (2 * sigma**2))
        volume = volume + lesion_contrast * volume.max() * blob.astype(np.float32)
        save_nifti(volume.astype(np.float32), img.affine, path)
    labels = Path(labels_file) if labels_file is not None else Path(output_dir).parent / "labels.csv"
    atomic_write_text(labels, "\n".join(rows) + "\n")
    logger.info("wrote %d demo volumes (%d with a lesion) and %s", len(written), len(written) // 2, labels)
    return written


# ---------------------------------------------------------------------------------------------- CT


def _resource(name: str) -> Path:
    """Path of a file in ``meddiff/data/resources``."""
    path = Path(str(resources.files("meddiff.data") / "resources" / name))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from this meddiff installation (package data)")
    return path


def ct_head_path() -> Path:
    """Path of the shipped real head CT (``meddiff/data/resources/ct_head_atlas_2mm.nii.gz``)."""
    return _resource(CT_HEAD_FILE)


def ct_abdomen_paths() -> tuple[Path, Path]:
    """Paths of the shipped real abdominal CT and its TotalSegmentator label map (same grid)."""
    return _resource(CT_ABDOMEN_FILE), _resource(CT_ABDOMEN_LABELS_FILE)


def ct_organ_labels(totalseg: np.ndarray, ct: np.ndarray) -> np.ndarray:
    """The :data:`CT_ORGAN_LABELS` map of a CT: TotalSegmentator classes merged by :data:`CT_ORGAN_GROUPS`, on a
    body outline (label 1: voxels above :data:`BODY_HU` in the largest connected component, holes filled slice
    by slice, plus every labelled voxel).

    Args:
        totalseg: ``(X, Y, Z)`` TotalSegmentator "total" label map (values of :data:`TOTALSEG_CLASSES`).
        ct: the CT in HU on the same grid (axial slices along the last axis).

    Returns:
        uint8 ``(X, Y, Z)``.
    """
    from scipy import ndimage

    components, count = ndimage.label(ct > BODY_HU)
    body = components == (1 + int(np.argmax(ndimage.sum_labels(np.ones_like(ct), components, range(1, count + 1)))))
    body = np.stack([ndimage.binary_fill_holes(body[..., k]) for k in range(body.shape[-1])], axis=-1)
    labels = (body | (totalseg > 0)).astype(np.uint8)
    values = {name: int(v) for v, name in CT_ORGAN_LABELS.items()}
    for group, prefixes in CT_ORGAN_GROUPS.items():
        members = [v for v, name in TOTALSEG_CLASSES.items() if name.startswith(prefixes)]
        labels[np.isin(totalseg, members)] = values[group]
    return labels


def _outside(zero: torch.Tensor) -> torch.Tensor:
    """Voxels of the boolean volume ``zero`` connected to the volume border through ``zero`` (6-neighbours)."""
    grow = torch.zeros_like(zero)
    for axis in range(3):
        index = [slice(None)] * 3
        for end in (0, -1):
            index[axis] = end
            grow[tuple(index)] = zero[tuple(index)]
    kernel = torch.zeros(1, 1, 3, 3, 3)
    kernel[0, 0, 1, 1, :] = kernel[0, 0, 1, :, 1] = kernel[0, 0, :, 1, 1] = 1.0
    while True:
        grown = (F.conv3d(grow[None, None].float(), kernel, padding=1)[0, 0] > 0) & zero
        if torch.equal(grown, grow):
            return grow
        grow = grown


def derive_ct_demo_source(
    atlas: str | os.PathLike, output: str | os.PathLike, spacing: float = 2.0, margin_mm: float = 10.0
) -> Path:
    """Make the shipped demo CT from TotalSegmentator's ``resources/ct_brain_atlas_1mm.nii.gz`` (run once).

    The atlas is a skull-stripped 1 mm head CT in HU whose background is stored as exactly 0. The
    background (zeros connected to the volume border) is set to air (-1000 HU), the volume is resampled
    to ``spacing`` mm (trilinear), cropped to the head plus ``margin_mm`` of air, rounded to int16.

    Args:
        atlas: the atlas file, e.g. unzipped from ``pip download TotalSegmentator --no-deps``.
        output: the ``.nii.gz`` to write.
        spacing: isotropic voxel size in mm.
        margin_mm: air kept around the head.

    Returns:
        The written file.
    """
    src = nib.load(os.fspath(atlas))
    data = torch.as_tensor(np.asarray(src.dataobj, dtype=np.float32))
    data[_outside(data == 0)] = AIR_HU
    image = MetaTensor(data[None], affine=torch.as_tensor(src.affine, dtype=torch.float64))
    image = Spacing(pixdim=(spacing,) * 3, mode="bilinear", padding_mode="border")(image)
    head = np.argwhere(np.asarray(image[0]) > AIR_HU / 2)
    margin = int(math.ceil(margin_mm / spacing))
    lo = np.maximum(head.min(0) - margin, 0)
    hi = np.minimum(head.max(0) + margin + 1, image.shape[1:])
    cropped = np.asarray(image[0])[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    affine = image.affine.numpy().astype(np.float64)
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    out = save_nifti(np.rint(cropped), affine, output, dtype=np.int16)
    logger.info("wrote %s: %s voxels of %.1f mm from %s", out, cropped.shape, spacing, atlas)
    return out


def _decoy_dataset(path: Path, sop_class: str, modality: str, patient_id: str, study_uid: str,
                   description: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = f"DEMO^{patient_id}", patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1000, 1
    ds.SeriesDescription = description
    return ds


def write_decoy_series(folder: str | os.PathLike, kind: str, patient_id: str, study_uid: str) -> Path:
    """Write a one-file non-CT series of the kind found beside CT scans in LIDC-IDRI studies.

    Args:
        folder: the series folder to create (must not exist).
        kind: ``"CR"`` (a chest radiograph: 2D image), ``"SR"`` (a text structured report, no pixels) or
            ``"SEG"`` (a segmentation: multi-frame binary frames).
        patient_id: PatientID shared with the patient's CT series.
        study_uid: StudyInstanceUID shared with the patient's CT series.

    Returns:
        The written file.

    Raises:
        ValueError: unknown ``kind``.
    """
    folder = Path(folder)
    path = folder / "000001.dcm"
    if kind == "CR":
        ds = _decoy_dataset(path, ComputedRadiographyImageStorage, "CR", patient_id, study_uid, "CHEST PA")
        pixels = (np.add.outer(np.arange(32), np.arange(24)) * 40).astype(np.uint16)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelSpacing = ["1.0", "1.0"]
        ds.PixelData = pixels.astype("<u2").tobytes()
    elif kind == "SR":
        ds = _decoy_dataset(path, BasicTextSRStorage, "SR", patient_id, study_uid, "Radiologist report")
        ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        ds.ContinuityOfContent = "SEPARATE"
    elif kind == "SEG":
        ds = _decoy_dataset(path, SegmentationStorage, "SEG", patient_id, study_uid, "Nodule segmentation")
        frames = np.zeros((4, 16, 16), dtype=np.uint8)
        frames[:, 6:10, 6:10] = 1
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.NumberOfFrames, ds.Rows, ds.Columns = frames.shape
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit, ds.PixelRepresentation, ds.SegmentationType = 0, 0, "BINARY"
        ds.PixelData = np.packbits(frames.reshape(-1), bitorder="little").tobytes()
    else:
        raise ValueError(f"kind must be 'CR', 'SR' or 'SEG', got {kind!r}")
    folder.mkdir(parents=True, exist_ok=False)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def make_ct_demo(
    output_dir: str | os.PathLike,
    num_volumes: int = 8,
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    decoys: Sequence[str] = ("CR", "SR"),
    seed: int = 0,
) -> list[Path]:
    """Write ``num_volumes`` variants of the shipped head CT as LIDC-IDRI-style DICOM trees.

    Each variant gets a small random rigid motion and scaling and CT-like noise (Gaussian, 10 HU), is
    resampled to ``spacing`` and written as ``CTDEMO-XX/study-1/ct-axial/`` (int16, RescaleIntercept
    -1024, axial slices), next to one-file decoy series (``decoys``: chest radiograph, report,
    segmentation) that the CT series selection must skip.

    Args:
        output_dir: folder for the patient folders (created).
        num_volumes: number of patients.
        spacing: voxel size of the written CT series (column, row, slice), mm.
        decoys: kinds of decoy series per study (see :func:`write_decoy_series`).
        seed: random seed of the variations.

    Returns:
        The CT series folders.
    """
    src = nib.load(ct_head_path())
    image = MetaTensor(np.asarray(src.dataobj, dtype=np.float32)[None], affine=torch.as_tensor(src.affine))
    image = Spacing(pixdim=tuple(float(s) for s in spacing), mode="bilinear", padding_mode="border")(image)
    affine = image.affine.numpy()
    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    written = []
    for i in range(num_volumes):
        moved = _random_rigid(image - AIR_HU, rng) + AIR_HU  # pad with air
        volume = np.asarray(moved[0]) + rng.normal(0.0, 10.0, moved.shape[1:])
        patient_id = f"CTDEMO-{i:02d}"
        study = out / patient_id / "study-1"
        study_uid = generate_uid()
        written.append(write_dicom_series(
            np.clip(volume, -1024, 3071), affine, study / "ct-axial", modality="CT",
            series_description="HEAD CT (demo, derived from TotalSegmentator atlas)", patient_name=f"DEMO^{i:02d}",
            patient_id=patient_id, rescale_intercept=-1024.0, dtype=np.uint16,
            extra={"StudyInstanceUID": study_uid, "KVP": "120"},
        )[0].parent)
        for kind in decoys:
            write_decoy_series(study / f"{kind.lower()}-decoy", kind, patient_id, study_uid)
    logger.info("wrote %d demo CT patients (%s voxels, %s mm) to %s", num_volumes, tuple(image.shape[1:]),
                tuple(spacing), out)
    return written


def make_ct_organ_demo(
    output_dir: str | os.PathLike,
    num_volumes: int = 8,
    seed: int = 0,
    layout: str = "nifti",
    noise_hu: float = 10.0,
) -> Path:
    """Write ``num_volumes`` variants of the shipped abdominal CT with their organ label maps, and a ``dataset.json``.

    Each variant moves the CT (trilinear) and its :func:`ct_organ_labels` map (nearest neighbour) by the same
    small random rigid motion and scaling, pads with air and adds Gaussian noise of ``noise_hu``. The grid is the
    source's: 122 x 101 x 30 voxels of 3 mm, RAS, about 9 cm of upper abdomen (liver, spleen, kidneys, bowel,
    aorta and vena cava, vertebrae and ribs, back muscles, lung bases).

    Layouts (items of ``dataset.json``, relative to ``output_dir``, in MONAI's ``{"image", "label"}`` form):

    * ``"nifti"``: ``imagesTr/abdomen_XX.nii.gz`` (HU, int16) and ``labelsTr/abdomen_XX.nii.gz`` (uint8), same affine.
    * ``"dicom"``: ``CTORGAN-XX/ct/`` a CT series (int16 stored as uint16, RescaleIntercept -1024) holding
      ``seg.dcm``, a DICOM SEG of the label map named by :data:`CT_ORGAN_LABELS` (one segment per organ).

    Args:
        output_dir: the data set folder.
        num_volumes: number of variants.
        seed: random seed of the variations.
        layout: ``"nifti"`` or ``"dicom"``.
        noise_hu: standard deviation of the added noise, HU.

    Returns:
        The written ``dataset.json``.
    """
    from meddiff.data.dicom_seg_writer import write_dicom_seg

    if layout not in ("nifti", "dicom"):
        raise ValueError(f"layout must be 'nifti' or 'dicom', got {layout!r}")
    ct_path, labels_path = ct_abdomen_paths()
    src = nib.load(ct_path)
    ct = np.asarray(src.dataobj, dtype=np.float32)
    organs = ct_organ_labels(np.asarray(nib.load(labels_path).dataobj), ct)
    affine = torch.as_tensor(src.affine, dtype=torch.float64)
    image = MetaTensor(torch.as_tensor(ct - AIR_HU)[None], affine=affine)
    labels = MetaTensor(torch.as_tensor(organs, dtype=torch.float32)[None], affine=affine)
    names = {name: int(v) for v, name in CT_ORGAN_LABELS.items() if int(v)}
    rng = np.random.default_rng(seed)
    out = Path(output_dir)
    items = []
    for i in range(num_volumes):
        move = _rigid_transform(rng)
        moved = np.asarray(move(image.clone())[0]) + AIR_HU
        label = np.rint(np.asarray(move(labels.clone(), mode="nearest")[0])).astype(np.uint8)  # the same motion
        volume = np.clip(np.rint(moved + rng.normal(0.0, noise_hu, moved.shape)), -1024, 3071)
        if layout == "nifti":
            name = f"abdomen_{i:02d}.nii.gz"
            save_nifti(volume, src.affine, out / "imagesTr" / name, dtype=np.int16)
            save_nifti(label, src.affine, out / "labelsTr" / name, dtype=np.uint8)
            items.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
        else:
            patient_id = f"CTORGAN-{i:02d}"
            series = write_dicom_series(
                volume, src.affine, out / patient_id / "ct", modality="CT", patient_id=patient_id,
                patient_name=f"DEMO^ORGAN{i:02d}", series_description="ABDOMEN CT (demo, TotalSegmentator example)",
                rescale_intercept=-1024.0, dtype=np.uint16, extra={"KVP": "120"})[0].parent
            write_dicom_seg(series, label, names, series / "seg.dcm", affine=src.affine,
                            series_description="DEMO organ labels of a SYNTHETIC variant of a real CT")
            items.append({"image": f"{patient_id}/ct", "label": f"{patient_id}/ct/seg.dcm"})
    dataset = {"name": "meddiff abdominal CT organ demo", "labels": CT_ORGAN_LABELS, "numTraining": len(items),
               "training": items}
    target = out / "dataset.json"
    atomic_write_json(target, dataset)
    logger.info("wrote %d abdominal CT variants with organ label maps (%s layout) and %s", len(items), layout, target)
    return target
