# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Ready for the model zoo as it is: committed weights listed in ``weights.sha256``, never as url-less downloads;
``meddiff export --zoo --weights_url BASE`` writes a submission whose ``large_files.yml`` MONAI downloads back.

The downloads go through ``monai.apps.download_url`` (what the zoo's CI and ``monai.bundle download_large_files``
call per entry) from a ``file://`` folder: it fetches with ``urllib.request.urlretrieve``, which reads ``file://``
URLs, so no server is needed. The zoo CI's own rules for ``large_files`` (path, url, a supported hash type, a path
inside the bundle, ``models/model.pt`` present or declared) are asserted here; ``../shared/zoo/verify_bundle.py``,
where that checkout exists, runs as well.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
from monai.apps import download_url
from monai.apps.utils import HashCheckError

import meddiff
from meddiff.cli.export import (
    WEIGHTS_MANIFEST,
    export_bundle,
    meddiff_requirements,
    read_weights_manifest,
    write_weights_manifest,
)
from meddiff.cli.main import main
from meddiff.data.errors import DataError

REPO = Path(__file__).resolve().parents[2]
ALL_BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))
VERIFY = REPO.parent / "shared" / "zoo" / "verify_bundle.py"
HASH_TYPES = {"md5", "sha1", "sha256", "sha512"}  # what monai.apps.utils.check_hash accepts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_large_files(path: Path) -> list[dict[str, str]]:
    """``large_files.yml`` as written by the export: ``- path:`` opens an entry, values are JSON-quoted strings
    (valid YAML double-quoted scalars). PyYAML is not a dependency, so anything else in the file fails here."""
    entries: list[dict[str, str]] = []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "large_files:", lines[0]
    for line in lines[1:]:
        match = re.fullmatch(r"  (- |  )(\w+): (\".*\")", line)
        assert match, f"unexpected line {line!r}"
        if match.group(1) == "- ":
            entries.append({})
        entries[-1][match.group(2)] = json.loads(match.group(3))
    return entries


def _zoo_large_files_problems(bundle: Path, entries: list[dict[str, str]]) -> list[str]:
    """The zoo CI's rules for large_files entries (ci/verify_bundle.py; download_url's hash types)."""
    problems = []
    for i, e in enumerate(entries):
        if "path" not in e or "url" not in e:
            problems.append(f"entry {i} lacks path/url")
            continue
        if e.get("hash_type", "md5").lower() not in HASH_TYPES or not e.get("hash_val"):
            problems.append(f"{e['path']}: no supported hash")
        if e["path"].startswith("/") or ".." in PurePosixPath(e["path"]).parts:
            problems.append(f"{e['path']}: not inside the bundle")
    if not (bundle / "models" / "model.pt").is_file() and "models/model.pt" not in {e.get("path") for e in entries}:
        problems.append("models/model.pt neither present nor declared")
    return problems


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=lambda p: p.name)
def test_repository_bundles_list_their_committed_weights_with_hashes_not_as_downloads(bundle):
    assert not list(bundle.glob("large_files.*")), "a url-less large_files entry fails the zoo's CI download"
    entries = read_weights_manifest(bundle, check=True)  # every listed file present with its hash
    assert "models/model.pt" in entries  # the zoo CI's preferred file, present in the repository
    listed = {bundle / p for p in entries}
    shipped = {p for p in (bundle / "models").iterdir() if p.suffix in (".pt", ".json")}
    assert shipped <= listed, f"shipped but not in {WEIGHTS_MANIFEST}: {sorted(shipped - listed)}"
    assert sum(p.stat().st_size for p in listed) < 20 * 2**20, "shipped weights over 20 MB"
    text = (bundle / WEIGHTS_MANIFEST).read_text()  # `sha256sum -c` format: "<hex>  <path>" lines
    assert text == "".join(f"{h}  {p}\n" for p, h in entries.items())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    # the zoo's CI rejects a changed bundle without a version bump and a changelog entry (0.2.0 was the last one)
    assert meta["version"] in meta["changelog"] and tuple(map(int, meta["version"].split("."))) > (0, 2, 0)


def test_weights_manifest_is_what_sha256sum_writes_and_checks(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundles" / "mri_generative_diffusion" / "models", bundle / "models")
    listed = list(read_weights_manifest(REPO / "bundles" / "mri_generative_diffusion"))
    manifest = write_weights_manifest(bundle, listed)  # what ship_weights writes after training
    assert manifest.read_text() == (REPO / "bundles" / "mri_generative_diffusion" / WEIGHTS_MANIFEST).read_text()
    sha256sum = shutil.which("sha256sum")
    if sha256sum:  # coreutils, as the bundles' docs tell users to check a copy
        subprocess.run([sha256sum, "--check", "--strict", "--quiet", WEIGHTS_MANIFEST], cwd=bundle, check=True)
    with pytest.raises(DataError, match="listed for weights.sha256 but missing"):
        write_weights_manifest(bundle, ["models/absent.pt"])


def test_ship_controlnet_keeps_the_listed_weights(tmp_path):
    import torch

    from meddiff.cli.stages import ship_controlnet

    repo_bundle = REPO / "bundles" / "mri_generative_diffusion"
    bundle, run = tmp_path / "bundle", tmp_path / "run"
    shutil.copytree(repo_bundle / "models", bundle / "models")
    shutil.copyfile(repo_bundle / WEIGHTS_MANIFEST, bundle / WEIGHTS_MANIFEST)
    run.mkdir()
    state = {k: v.float() for k, v in torch.load(repo_bundle / "models" / "model_controlnet.pt").items()}
    torch.save(state, run / "controlnet.pt")
    shutil.copyfile(repo_bundle / "models" / "model_controlnet.json", run / "controlnet.json")
    ship_controlnet(run, bundle, stem="model_controlnet_b")
    entries = read_weights_manifest(bundle, check=True)
    assert list(entries) == [*read_weights_manifest(repo_bundle), "models/model_controlnet_b.pt",
                             "models/model_controlnet_b.json"]
    shipped = torch.load(bundle / "models" / "model_controlnet_b.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in shipped.values() if v.is_floating_point())
    for key, value in state.items():
        torch.testing.assert_close(shipped[key].float(), value, rtol=0, atol=0, msg=key)
    ship_controlnet(run, bundle, stem="model_controlnet_b")  # again: listed once
    assert list(read_weights_manifest(bundle)) == list(entries)


def _serve(bundle: Path, folder: Path) -> str:
    """Put the bundle's listed files in one flat folder, as a release page would hold them; its file:// URL."""
    folder.mkdir()
    for rel in read_weights_manifest(bundle):
        shutil.copyfile(bundle / rel, folder / PurePosixPath(rel).name)
    return folder.as_uri()


@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=lambda p: p.name)
def test_zoo_export_downloads_back_with_monai(bundle, tmp_path):
    base = _serve(bundle, tmp_path / "release")
    out = tmp_path / "submission"
    main(["export", str(bundle), str(out), "--zoo", "--weights_url", base + "/"])
    manifest = read_weights_manifest(bundle)
    # no weight files, no models/ folder and no weights.sha256: large_files.yml carries url + sha256 for each
    assert not (out / "models").exists() and not (out / WEIGHTS_MANIFEST).exists()
    assert (out / "meddiff" / "__init__.py").is_file() and (out / "configs" / "inference.json").is_file()
    entries = _read_large_files(out / "large_files.yml")
    assert [e["path"] for e in entries] == list(manifest)
    for e in entries:
        assert e == {"path": e["path"], "url": f"{base}/{PurePosixPath(e['path']).name}",
                     "hash_val": manifest[e["path"]], "hash_type": "sha256"}
    assert _zoo_large_files_problems(out, entries) == []
    # the copy carries meddiff, so the metadata requires meddiff's own dependencies instead of meddiff
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    required, optional = meta["required_packages_version"], meta.get("optional_packages_version", {})
    assert "meddiff" not in required and "meddiff" not in optional and meta["meddiff_version"] == meddiff.__version__
    assert set(meddiff_requirements()) <= set(required)
    # what download_large_files does per entry: download_url(url, filepath=bundle/path, hash_val, hash_type)
    for e in entries:
        download_url(e["url"], filepath=out / e["path"], hash_val=e["hash_val"], hash_type=e["hash_type"],
                     progress=False)
        assert (out / e["path"]).read_bytes() == (bundle / e["path"]).read_bytes()
    download_url(entries[0]["url"], filepath=out / entries[0]["path"], hash_val=entries[0]["hash_val"],
                 progress=False)  # present and intact: kept, not fetched again
    # a file changed on the server is refused and not written
    (out / entries[0]["path"]).unlink()
    served = tmp_path / "release" / PurePosixPath(entries[0]["path"]).name
    served.write_bytes(served.read_bytes() + b"\0")
    with pytest.raises(HashCheckError, match="hash check of downloaded file failed"):
        download_url(entries[0]["url"], filepath=out / entries[0]["path"], hash_val=entries[0]["hash_val"],
                     hash_type="sha256", progress=False)
    assert not (out / entries[0]["path"]).exists()


def test_meddiff_declares_every_package_it_imports():
    """What an exported bundle requires in meddiff's place (``meddiff_requirements``) covers every third-party
    import in the package, torch, MONAI and NumPy aside (the zoo metadata pins them under keys of their own)."""
    imported = set()
    for source in Path(meddiff.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    distributions = importlib.metadata.packages_distributions()
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "meddiff"}
    needed = {distributions[name][0].lower() for name in third_party}
    assert {"pillow", "pytorch-ignite", "scipy"} <= needed  # the scan sees imports under other names
    assert needed - {"torch", "monai", "numpy"} <= set(meddiff_requirements())


def test_monai_download_large_files_reads_the_submission(tmp_path):
    """The whole MONAI entry point (``python -m monai.bundle download_large_files``) where PyYAML is installed."""
    pytest.importorskip("yaml", reason="monai.bundle.download_large_files reads large_files.yml with PyYAML")
    bundle = REPO / "bundles" / "ct_generative_diffusion"
    out = Path(export_bundle(str(bundle), str(tmp_path / "submission"), zoo=True,
                             weights_url=_serve(bundle, tmp_path / "release")))
    subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(out)],
                   check=True, capture_output=True, timeout=300)
    for rel, digest in read_weights_manifest(bundle).items():
        assert _sha256(out / rel) == digest


def test_zoo_export_refuses_changed_weights_and_missing_url(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundles" / "breast_mri_segmentation", bundle,
                    ignore=shutil.ignore_patterns("outputs", "eval", "__pycache__"))
    with pytest.raises(ValueError, match="--zoo needs --weights_url"):
        export_bundle(str(bundle), str(tmp_path / "a"), zoo=True)
    with pytest.raises(ValueError, match="--zoo needs --weights_url"):
        export_bundle(str(bundle), str(tmp_path / "a"), zoo=True, weights_url="releases/v1")  # no scheme
    with pytest.raises(ValueError, match="only used with --zoo"):
        export_bundle(str(bundle), str(tmp_path / "a"), weights_url="https://example.org/v1")
    weights = bundle / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-1])  # retrained or damaged after the manifest was written
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(bundle), str(tmp_path / "a"), "--zoo", "--weights_url", "https://example.org/v1"])
    assert exit_info.value.code == 1
    with pytest.raises(DataError, match=r"model\.pt: has SHA-256 [0-9a-f]{64}, but weights\.sha256 says"):
        export_bundle(str(bundle), str(tmp_path / "a"), zoo=True, weights_url="https://example.org/v1")
    weights.unlink()
    with pytest.raises(DataError, match="listed in weights.sha256 but missing"):
        export_bundle(str(bundle), str(tmp_path / "a"), zoo=True, weights_url="https://example.org/v1")
    (bundle / WEIGHTS_MANIFEST).write_text("c4b1  models/model.pt\n")
    with pytest.raises(DataError, match="line 1 is not '<sha256>  <path>'"):
        export_bundle(str(bundle), str(tmp_path / "a"), zoo=True, weights_url="https://example.org/v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # nothing half-written


def _verify(bundle: Path) -> list[str]:
    """The [CI] and [UT] lines of the offline zoo checker that are not PASS/SKIP (networks skipped: they carry
    only [CI-full]/[EXTRA] tags, and the test schemas are the ones the metadata names)."""
    res = subprocess.run([sys.executable, str(VERIFY), str(bundle), "--schema-dir", str(REPO / "tests" / "schemas"),
                          "--tags", "CI,UT", "--skip-network"], capture_output=True, text=True, timeout=600)
    lines = res.stdout.splitlines()
    assert re.fullmatch(r"\d+ passed, \d+ failed", lines[-1]), res.stdout[-2000:] + res.stderr[-2000:]
    return [ln for ln in lines if ln.startswith("FAIL")] + ([] if res.returncode == 0 else [lines[-1]])


@pytest.mark.slow
@pytest.mark.skipif(not VERIFY.is_file(), reason=f"{VERIFY} (the offline zoo checker) is not in this checkout")
@pytest.mark.parametrize("bundle", ALL_BUNDLES, ids=lambda p: p.name)
def test_offline_zoo_checker_passes_ci_and_ut_on_bundle_and_export(bundle, tmp_path):
    assert _verify(bundle) == []
    out = Path(export_bundle(str(bundle), str(tmp_path / bundle.name), zoo=True,
                             weights_url=_serve(bundle, tmp_path / "release")))
    assert _verify(out) == []
