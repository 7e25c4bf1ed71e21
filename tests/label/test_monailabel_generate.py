# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""End to end: the MRI generation bundle as a "generate" infer task of a real MONAI Label server.

``common/label_app`` (our app) hosts the exported ``mri_generative_diffusion`` bundle through
``BundleGenerateTask``, with the shipped demo weights and their overlay ``demo_brain.json``. Where those
weights are absent, a tiny overlay with freshly initialised weights stands in. Checks the returned volume's
grid, values and seed reproducibility.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from meddiff.cli.export import export_bundle
from meddiff.data.phantoms import write_breast_phantoms
from tests.label.label_server import LabelServer, multipart, require_label_venv

REPO = Path(__file__).resolve().parents[2]
GENERATOR = "mri_generative_diffusion"
SAMPLING = ["common.json", "train_autoencoder.json", "inference.json"]
DEMO_OVERLAY = REPO / "bundles" / GENERATOR / "configs" / "demo_brain.json"
SHIPPED_DEMO = (REPO / "bundles" / GENERATOR / "models" / "model.pt").is_file()
# A small geometry and narrow networks, as an overlay in the bundle's configs/ (like demo_brain.json).
TINY = {"pixdim": [2.0, 2.5, 3.0], "spatial_size": [16, 16, 16], "autoencoder_channels": [8, 16],
        "autoencoder_res_layers": 1, "codebook_size": 32, "embedding_dim": 4, "unet_channels": [8, 16],
        "unet_attention_levels": [False, True], "unet_res_blocks": 1, "unet_head_channels": 8,
        "num_inference_steps": 3, "sampling_dtype": "float32"}

pytestmark = pytest.mark.slow


def _write_weights(bundle: Path) -> None:
    """State dicts of the overlay's networks and the latent record, where the sampler reads them."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in [*SAMPLING, "tiny.json"]])
    parser["bundle_root"] = str(bundle)
    torch.manual_seed(0)
    autoencoder = parser.get_parsed_content("autoencoder_def")
    unet = parser.get_parsed_content("network_def")
    latent = autoencoder.encode_stage_2_inputs(torch.zeros(1, 1, *TINY["spatial_size"]))
    for key, net in (("autoencoder_weights", autoencoder), ("diffusion_weights", unet)):
        path = Path(parser.get_parsed_content(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    Path(parser.get_parsed_content("latent_info_file")).write_text(json.dumps({
        "scale_factor": 1.0, "latent_shape": list(latent.shape[1:]), "objective": "ddpm",
        "prediction_type": parser["prediction_type"], "num_train_timesteps": parser["num_train_timesteps"]}))


@pytest.fixture(scope="module")
def generate_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_label_venv()
    root = tmp_path_factory.mktemp("monailabel_generate")
    app = root / "app"
    shutil.copytree(REPO / "common" / "label_app", app, ignore=shutil.ignore_patterns("__pycache__"))
    bundle = Path(export_bundle(str(REPO / "bundles" / GENERATOR), str(app / "model" / GENERATOR),
                                with_weights=SHIPPED_DEMO))
    if SHIPPED_DEMO:
        overlay, geometry = DEMO_OVERLAY.name, json.loads(DEMO_OVERLAY.read_text())
    else:
        (bundle / "configs" / "tiny.json").write_text(json.dumps(TINY))
        _write_weights(bundle)
        overlay, geometry = "tiny.json", TINY
    studies = root / "studies"  # /infer needs an image id; the generate task does not read it
    write_breast_phantoms(studies, num_cases=1, labels=False, shape=(16, 16, 16), fov_mm=(160.0, 160.0, 160.0))
    image_id = next(studies.rglob("*.nii.gz")).name.removesuffix(".nii.gz")
    conf = {"generators": GENERATOR, "generate_overlays": overlay, "zoo_source": "local"}
    server = LabelServer(app, studies, root / "server.log", conf)
    try:
        info = server.wait_ready()
        yield {"server": server, "info": info, "image_id": image_id, "geometry": geometry}
    finally:
        server.stop()


def _generate(env: dict[str, Any], seed: int, out: Path) -> nib.Nifti1Image:
    server: LabelServer = env["server"]
    params = {"seed": seed, "device": "cpu", "num_inference_steps": 2}
    body, ctype = multipart({"params": json.dumps(params)}, {})
    status, data = server.request("POST", f"/infer/{GENERATOR}?image={env['image_id']}&output=image", data=body,
                                  headers={"Content-Type": ctype})
    assert status == 200, f"{status}: {data[:2000]!r}\n{server.log_tail()}"
    out.write_bytes(data)
    return nib.load(out)


def test_info_lists_generate_task(generate_env: dict[str, Any]) -> None:
    model = generate_env["info"]["models"].get(GENERATOR)
    assert model is not None, f"{generate_env['info']['models']}\n{generate_env['server'].log_tail()}"
    assert model["type"] == "others" and model["description"].startswith("generate:")


def test_generate_returns_seeded_synthetic_volume(generate_env: dict[str, Any], tmp_path: Path) -> None:
    first = _generate(generate_env, 3, tmp_path / "a.nii.gz")
    again = _generate(generate_env, 3, tmp_path / "b.nii.gz")
    other = _generate(generate_env, 4, tmp_path / "c.nii.gz")
    geometry = generate_env["geometry"]
    assert first.shape == tuple(geometry["spatial_size"])
    np.testing.assert_allclose(np.abs(np.diag(first.affine)[:3]), geometry["pixdim"], rtol=1e-5)
    volume = np.asarray(first.dataobj, dtype=np.float32)
    low, high = json.loads((REPO / "bundles" / GENERATOR / "configs" / "train_autoencoder.json").read_text())[
        "intensity_range"]
    assert np.isfinite(volume).all() and volume.std() > 0
    assert low - 1e-3 <= volume.min() and volume.max() <= high + 1e-3
    np.testing.assert_array_equal(volume, np.asarray(again.dataobj, dtype=np.float32))
    assert not np.array_equal(volume, np.asarray(other.dataobj, dtype=np.float32))
    # the returned file says it is synthetic, how it was sampled and its seed, away from samples.json
    for image, seed in ((first, 3), (other, 4)):
        assert re.fullmatch(rf"SYNTHETIC meddiff [a-z_0-9]+ seed={seed}", image.header["descrip"].item().decode())
