# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Tests for meddiff.data.writers (NIfTI, PNG mosaic, affines), also re-exported by meddiff.sampling."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage
from PIL import Image

from meddiff.data import write_dicom_series
from meddiff.data import writers as writers_mod
from meddiff.data.writers import (
    LABEL_COLOURS,
    affine_from_geometry,
    save_mosaic_png,
    save_nifti,
    save_overlay_mosaic_png,
)
from meddiff.reader_study.build import find_volumes
from meddiff.utils import atomic as atomic_mod
from meddiff.utils import atomic_torch_save, atomic_write_json, default_mode, is_temporary


def _load(path: Path) -> MetaTensor:
    return LoadImage(reader=NibabelReader(), image_only=True)(str(path))


@pytest.mark.parametrize("axcodes", ["RAS", "LPS"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_round_trip_float(tmp_path: Path, axcodes: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(1, 6, 7, 5)).astype(np.float32)
    affine = affine_from_geometry((0.75, 1.25, 2.0), axcodes, origin=(-10.5, 20.0, 3.25))
    path = save_nifti(torch.from_numpy(vol), affine, tmp_path / f"out{suffix}")
    loaded = _load(path)
    assert loaded.shape == (6, 7, 5)
    np.testing.assert_array_equal(loaded.numpy(), vol[0])
    np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-5)
    hdr = nib.load(path).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(hdr.get_qform(), affine, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]


def test_nifti_int16_rounds_and_clips(tmp_path: Path) -> None:
    vol = np.array([1.4, 1.6, -2.6, 40000.0, -40000.0, np.nan, 0.0, 7.0], dtype=np.float32).reshape(2, 2, 2)
    affine = affine_from_geometry((1.0, 1.0, 1.0), "LAS")
    path = save_nifti(vol, affine, tmp_path / "seg.nii.gz", dtype=np.int16)
    nii = nib.load(path)
    assert nii.get_data_dtype() == np.int16
    expected = np.array([1, 2, -3, 32767, -32768, 0, 0, 7], dtype=np.int16).reshape(2, 2, 2)
    np.testing.assert_array_equal(np.asarray(nii.dataobj), expected)
    loaded = _load(path)
    np.testing.assert_array_equal(loaded.numpy(), expected)
    np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-6)


def test_nifti_uses_metatensor_affine_and_rejects_bad_shapes(tmp_path: Path) -> None:
    affine = torch.as_tensor(affine_from_geometry((2.0, 2.0, 3.0), "LPS", spatial_size=(4, 4, 4)))
    mt = MetaTensor(torch.ones(1, 4, 4, 4), affine=affine)
    loaded = _load(save_nifti(mt, None, tmp_path / "mt.nii.gz"))
    np.testing.assert_allclose(loaded.affine.numpy(), affine.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="volume"):
        save_nifti(np.zeros((2, 4, 4, 4)), np.eye(4), tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="affine"):
        save_nifti(np.zeros((4, 4, 4)), np.eye(3), tmp_path / "bad.nii.gz")


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(img: nib.Nifti1Image, filename: Path) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writers_mod.nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.zeros((3, 3, 3)), np.eye(4), tmp_path / "out.nii.gz")

    def failing_png(self: Image.Image, fp: Path, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_png)
    with pytest.raises(OSError, match="disk full"):
        save_mosaic_png(np.zeros((3, 3, 3)), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_write_leaves_is_never_taken_for_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temporaries: list[Path] = []
    real_mkstemp = atomic_mod.tempfile.mkstemp

    def recording_mkstemp(**kwargs: object) -> tuple[int, str]:
        fd, name = real_mkstemp(**kwargs)
        temporaries.append(Path(name))
        return fd, name

    monkeypatch.setattr(atomic_mod.tempfile, "mkstemp", recording_mkstemp)
    atomic_torch_save({"step": 1}, tmp_path / "model_step00000001.pt")
    atomic_write_json(tmp_path / "samples.json", {})
    save_nifti(np.zeros((3, 3, 3)), np.eye(4), tmp_path / "sample_0000.nii.gz")
    assert len(temporaries) == 3 and all(is_temporary(t) for t in temporaries)
    for leftover in temporaries:  # as a SIGKILL between write and rename would leave them
        leftover.write_bytes(b"partial")
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["model_step00000001.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["samples.json"]
    assert find_volumes(tmp_path) == [tmp_path / "sample_0000.nii.gz"]  # NIfTI temporaries keep the extension
    assert not is_temporary(tmp_path / "sample_0000.nii.gz")


@pytest.mark.parametrize(
    "shape, num_slices, columns, size",
    [((20, 24, 30), 16, 4, (80, 96)), ((10, 12, 5), 16, 4, (40, 24)), ((10, 12, 3), 16, 4, (30, 12))],
)
def test_mosaic_size(tmp_path: Path, shape: tuple[int, ...], num_slices: int, columns: int, size: tuple) -> None:
    vol = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = save_mosaic_png(torch.from_numpy(vol)[None], tmp_path / "m" / "mosaic.png", num_slices, columns)
    with Image.open(path) as im:
        assert im.size == size and im.mode == "L"
        pixels = np.asarray(im)
    assert pixels.min() == 0 and pixels.max() == 255  # default percentile window spans the range
    assert [p.name for p in path.parent.iterdir()] == ["mosaic.png"]


def test_mosaic_orientation(tmp_path: Path) -> None:
    # RAS voxel order: mark the right-anterior corner of every axial slice
    vol = np.zeros((10, 8, 4), np.float32)
    vol[-1, -1, :] = 1.0
    path = save_mosaic_png(vol, tmp_path / "axial.png", num_slices=4, columns=2, window=(0.0, 1.0))
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (16, 20)
    assert pixels[0, 0] == 255 and pixels[0, 10] == 255 and pixels[8, 0] == 255  # top-left of each tile
    assert pixels.sum() == 4 * 255
    neuro = np.asarray(Image.open(save_mosaic_png(vol, tmp_path / "n.png", 1, 1, (0.0, 1.0), radiological=False)))
    assert neuro[0, -1] == 255
    # the same anatomy stored in LPS voxel order shows the same once the affine is given
    lps = vol[::-1, ::-1].copy()
    aff = affine_from_geometry((1.0, 1.0, 1.0), "LPS")
    again = save_mosaic_png(lps, tmp_path / "lps.png", 4, 2, (0.0, 1.0), affine=aff)
    np.testing.assert_array_equal(np.asarray(Image.open(again)), pixels)
    # sagittal: superior up, anterior left
    vol = np.zeros((4, 8, 6), np.float32)
    vol[:, -1, -1] = 1.0
    sag = np.asarray(Image.open(save_mosaic_png(vol, tmp_path / "sag.png", 1, 1, (0.0, 1.0), axis=0)))
    assert sag.shape == (6, 8) and sag[0, 0] == 255


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LAS", "SAR", "PIL"])
def test_affine_from_geometry_axcodes(axcodes: str) -> None:
    spacing = (0.5, 1.5, 3.0)
    affine = affine_from_geometry(spacing, axcodes)
    assert nib.aff2axcodes(affine) == tuple(axcodes)
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), spacing)
    np.testing.assert_array_equal(affine[:3, 3], 0.0)
    np.testing.assert_array_equal(affine[3], [0, 0, 0, 1])


def test_affine_from_geometry_origin() -> None:
    lps = affine_from_geometry((1.0, 2.0, 3.0), "LPS")
    np.testing.assert_array_equal(np.diag(lps), [-1.0, -2.0, 3.0, 1.0])
    size = (10, 20, 5)
    centred = affine_from_geometry((1.0, 2.0, 3.0), "LPS", spatial_size=size)
    centre = np.append((np.array(size) - 1) / 2, 1.0)
    np.testing.assert_allclose(centred @ centre, [0, 0, 0, 1], atol=1e-12)
    origin = affine_from_geometry((1.0, 1.0, 1.0), "RAS", origin=(1.0, -2.0, 3.0), spatial_size=size)
    np.testing.assert_array_equal(origin[:3, 3], [1.0, -2.0, 3.0])
    for bad in ("RAX", "RRS", "RA"):
        with pytest.raises(ValueError, match="axcodes"):
            affine_from_geometry((1.0, 1.0, 1.0), bad)
    with pytest.raises(ValueError, match="spacing"):
        affine_from_geometry((1.0, 0.0, 1.0))


def test_overlay_mosaic_colours_the_labels_on_the_image_layout(tmp_path: Path) -> None:
    volume = np.tile(np.linspace(0, 100, 8, dtype=np.float32)[:, None, None], (1, 8, 4))
    label = np.zeros((8, 8, 4), dtype=np.uint8)
    label[:, :4, 1] = 1
    label[:, 4:, 2] = 2
    out = save_overlay_mosaic_png(volume, label, tmp_path / "o.png", num_slices=4, alpha=0.5)
    rgb = np.asarray(Image.open(out))
    grey = np.asarray(Image.open(save_mosaic_png(volume, tmp_path / "g.png", num_slices=4)))
    assert rgb.shape == (*grey.shape, 3) and sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "o.png"]
    np.testing.assert_array_equal(rgb[:, :8, 0], grey[:, :8])  # tile 0: no label, the image unchanged
    tile1, tile2 = rgb[:, 8:16].astype(float), rgb[:, 16:24].astype(float)
    painted = 0.5 * grey[:, 8:16, None] + 0.5 * np.asarray(LABEL_COLOURS[0], dtype=float)
    np.testing.assert_allclose(tile1[4:], np.rint(painted[4:]), atol=1)  # label 1: the lower rows (b < 4)
    np.testing.assert_array_equal(tile1[:4, :, 0], grey[:4, 8:16])
    assert (tile2[:4, :, 1] > tile2[:4, :, 0]).all()  # label 2 (green) in the upper rows of tile 2
    with pytest.raises(ValueError, match="shapes differ"):
        save_overlay_mosaic_png(volume, label[:4], tmp_path / "x.png")
    with pytest.raises(ValueError, match="alpha"):
        save_overlay_mosaic_png(volume, label, tmp_path / "x.png", alpha=2.0)


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    """Atomic writes rename owner-only temporaries: the outputs must still be readable as a plain write's are."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = plain.stat().st_mode & 0o777  # 0o666 less this process's umask
    assert expected == default_mode()
    files = [atomic_write_json(tmp_path / "samples.json", {}), atomic_torch_save({"step": 1}, tmp_path / "model.pt"),
             save_nifti(np.zeros((3, 3, 3)), np.eye(4), tmp_path / "sample.nii.gz"),
             save_mosaic_png(np.zeros((3, 3, 3)), tmp_path / "sample.png")]
    series = write_dicom_series(np.zeros((4, 4, 2), np.float32), np.eye(4), tmp_path / "series", modality="CT")
    for path in files + series:
        assert path.stat().st_mode & 0o777 == expected, path
    assert (tmp_path / "series").stat().st_mode & 0o777 == default_mode(directory=True)
    (tmp_path / "samples.json").chmod(0o640)  # a file that is replaced keeps its permissions
    atomic_write_json(tmp_path / "samples.json", {"samples": []})
    assert (tmp_path / "samples.json").stat().st_mode & 0o777 == 0o640
