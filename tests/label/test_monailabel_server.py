# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""End to end: a real MONAI Label server (monaibundle app) serving the exported breast bundle.

The server runs in its own venv (``make label-venv``, README "MONAI Label server"); this test starts it on a
free loopback port over a temporary studies folder of breast phantoms, posts a NIfTI to ``/infer/<model>``,
trains one epoch through ``/train/<model>`` and stops it. Without the venv the test is skipped, unless
``MEDDIFF_REQUIRE_LABEL=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
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
from tests.label.label_server import LABEL_VENV, LabelServer, multipart, require_label_venv

REPO = Path(__file__).resolve().parents[2]
MODEL = "breast_mri_segmentation"
TRAIN_GUARD_S = 1200  # guards against a hung training task; not a speed check
# The monaibundle sample app, serving exported bundles from its model/ folder with no zoo download.
SERVER_CONF = {"models": MODEL, "zoo_source": "local", "sam2": "false", "preload": "false"}

pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_initial_weights(bundle: Path) -> None:
    """Give the exported bundle weights if the repository ships none: the bundle's own network_def, seeded."""
    weights = bundle / "models" / "model.pt"
    if weights.is_file():
        return
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def", instantiate=True)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), weights)


@pytest.fixture(scope="module")
def label_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A monaibundle app with the exported breast bundle, a studies folder, and the running server."""
    require_label_venv()
    root = tmp_path_factory.mktemp("monailabel")
    app = root / "app"
    shutil.copytree(LABEL_VENV / "monailabel" / "sample-apps" / "monaibundle", app)
    bundle = Path(export_bundle(str(REPO / "bundles" / MODEL), str(app / "model" / MODEL)))
    _write_initial_weights(bundle)

    # Studies as MONAI Label's local datastore lays them out: images, and final labels under labels/final.
    phantoms = root / "phantoms"
    write_breast_phantoms(phantoms, num_cases=4, num_test=1, seed=3, oblique_degrees=10.0)
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for image in sorted((phantoms / "imagesTr").glob("*.nii.gz")):
        shutil.copy(image, studies / image.name)
        shutil.copy(phantoms / "labelsTr" / image.name, studies / "labels" / "final" / image.name)
    query = next(iter(sorted((phantoms / "imagesTs").glob("*.nii.gz"))))

    server = LabelServer(app, studies, root / "server.log", SERVER_CONF)
    try:
        info = server.wait_ready()
        yield {"server": server, "info": info, "bundle": bundle, "query": query}
    finally:
        server.stop()


def test_info_lists_bundle_model_and_trainer(label_env: dict[str, Any]) -> None:
    info = label_env["info"]
    assert MODEL in info["models"], f"models served: {sorted(info['models'])}\n{label_env['server'].log_tail()}"
    assert info["models"][MODEL]["labels"] == {"breast": 1}
    assert MODEL in info["trainers"]


def test_infer_returns_mask_on_input_grid(label_env: dict[str, Any], tmp_path: Path) -> None:
    server: LabelServer = label_env["server"]
    query: Path = label_env["query"]
    body, ctype = multipart({"params": json.dumps({"device": "cpu"})}, {"file": query})
    status, data = server.request("POST", f"/infer/{MODEL}?output=image", data=body, headers={"Content-Type": ctype})
    assert status == 200, f"{status}: {data[:2000]!r}\n{server.log_tail()}"
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(data)
    mask, image = nib.load(out), nib.load(query)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-3)
    values = set(np.unique(np.asarray(mask.dataobj)).tolist())
    assert values <= {0, 1}, f"labels {values}"

    # the server returns what the bundle's own inference workflow (python -m monai.bundle run) computes
    bundle: Path = label_env["bundle"]
    (tmp_path / "in").mkdir()
    shutil.copy(query, tmp_path / "in" / query.name)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--bundle_root", str(bundle), "--dataset_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
           "--num_workers", "0", "--device", "$torch.device('cpu')"]
    run = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    direct = nib.load(next((tmp_path / "out").glob("*.nii.gz")))
    np.testing.assert_allclose(direct.affine, image.affine, atol=1e-3)
    disagree = np.mean((np.asarray(direct.dataobj) > 0) != (np.asarray(mask.dataobj) > 0))
    assert disagree < 1e-3, f"{disagree:.2%} of voxels differ from the bundle's own inference"


def test_train_one_epoch_writes_new_checkpoint(label_env: dict[str, Any]) -> None:
    server: LabelServer = label_env["server"]
    models = label_env["bundle"] / "models"
    before = {p.relative_to(models): _sha(p) for p in models.rglob("*.pt")}
    params = {"device": "cpu", "max_epochs": 1, "val_split": 0.0, "multi_gpu": False, "pretrained": True}
    status, data = server.request("POST", f"/train/{MODEL}", data=json.dumps(params).encode(),
                                  headers={"Content-Type": "application/json"})
    assert status == 200, f"{status}: {data[:2000]!r}\n{server.log_tail()}"

    deadline = time.monotonic() + TRAIN_GUARD_S
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, data = server.request("GET", "/train/")
        task = json.loads(data) if status == 200 else {}
        if task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2.0)
    assert task.get("status") == "DONE", f"train task: {json.dumps(task)[-4000:]}\n{server.log_tail()}"

    after = {p.relative_to(models): _sha(p) for p in models.rglob("*.pt")}
    changed = sorted(str(p) for p, digest in after.items() if before.get(p) != digest)
    assert "model.pt" in changed, f"model.pt unchanged under {models}; changed: {changed}"
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    parser = ConfigParser()
    parser.read_config(str(label_env["bundle"] / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def", instantiate=True)
    net.load_state_dict(state)  # the new weights fit the bundle's network
