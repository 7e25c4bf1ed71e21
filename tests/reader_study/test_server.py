# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The study server over real HTTP (no browser): what can be fetched, ratings, resume, the lock."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meddiff.data.errors import DataError
from meddiff.reader_study import build_study, load_key, load_public_study, make_server, reader_order
from meddiff.reader_study.server import study_lock
from tests.reader_study.helpers import make_folders

SCORES = {"realism": 4, "anatomy": 3, "consistency": 5}


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    real, syn = make_folders(tmp_path / "data", n_real=2, n_syn=2)
    return build_study(real, syn, tmp_path / "study", seed=2)


@pytest.fixture()
def url(study: Path) -> Iterator[str]:
    server = make_server(study, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, bytes, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def _post(url: str, obj: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url, json.dumps(obj).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_only_the_viewer_is_served(study: Path, url: str) -> None:
    key_text = (study / "key.json").read_bytes()
    public = load_public_study(study)
    case = public["cases"][0]
    status, body, _ = _get(url + "/")
    assert status == 200 and b"viewer.js" in body
    for path in ("/static/viewer.js", "/static/style.css", "/api/study", f"/cases/{case}/meta.json"):
        assert _get(url + path)[0] == 200, path
    status, body, headers = _get(url + f"/cases/{case}/volume.u16.gz")
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert len(gzip.decompress(body)) == 2 * int(np.prod(public["shape"]))
    assert json.loads(_get(url + "/api/study")[1]) == public
    for path in ("/key.json", "/../key.json", "/%2e%2e/key.json", "/cases/../key.json", f"/cases/{case}/../../key.json",
                 "/static/../../key.json", "/viewer/study.json", "/ratings.sqlite", "/cases/case-0/meta.json",
                 f"/cases/{case}/secret.json", "/static/nothing.js"):
        status, body, _ = _get(url + path)
        assert status == 404 and b"synthetic" not in body and key_text not in body, path


def test_ratings_and_resume(study: Path, url: str) -> None:
    cases = load_public_study(study)["cases"]
    seed = load_key(study)["seed"]
    status, info = _post(url + "/api/login", {"reader": "dr.a"})
    assert status == 200 and info["order"] == reader_order(cases, seed, "dr.a") and info["done"] == []
    assert reader_order(cases, seed, "dr.b") != info["order"]  # each reader has their own order
    first = info["order"][0]
    bad = [
        ({"reader": "dr.a", "case": first, "scores": {**SCORES, "realism": 6}, "answer": "real", "seconds": 1}, "1-5"),
        ({"reader": "dr.a", "case": first, "scores": {"realism": 4}, "answer": "real", "seconds": 1}, "no score"),
        ({"reader": "dr.a", "case": first, "scores": SCORES, "answer": "maybe", "seconds": 1}, "real' or 'synthetic"),
        ({"reader": "dr.a", "case": "case-0", "scores": SCORES, "answer": "real", "seconds": 1}, "unknown case"),
        ({"reader": "nobody", "case": first, "scores": SCORES, "answer": "real", "seconds": 1}, "unknown reader"),
    ]
    for payload, message in bad:
        status, reply = _post(url + "/api/rate", payload)
        assert status == 400 and message in reply["error"], reply
    assert _post(url + "/api/login", {"reader": "a b/../c"})[0] == 400
    status, reply = _post(url + "/api/rate", {"reader": "dr.a", "case": first, "scores": SCORES, "answer": "synthetic",
                                              "seconds": 12.5})
    assert status == 200 and reply == {"ok": True, "rated": 1}
    status, info = _post(url + "/api/login", {"reader": "dr.a"})
    assert info["done"] == [first]


def test_ratings_survive_a_new_server(study: Path) -> None:
    server = make_server(study, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    info = _post(url + "/api/login", {"reader": "r"})[1]
    _post(url + "/api/rate", {"reader": "r", "case": info["order"][1], "scores": SCORES, "answer": "real",
                              "seconds": 3})
    server.shutdown()
    server.server_close()
    again = make_server(study, port=0)
    threading.Thread(target=again.serve_forever, daemon=True).start()
    info2 = _post(f"http://127.0.0.1:{again.server_address[1]}/api/login", {"reader": "r"})[1]
    again.shutdown()
    again.server_close()
    assert info2["order"] == info["order"] and info2["done"] == [info["order"][1]]


def test_lock(study: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = study / "server.lock"
    with study_lock(study):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(DataError, match=f"another server \\(PID {os.getpid()}"):
            with study_lock(study):
                pass
    assert not lock.exists()
    # a lock left by a process that has ended (a crashed server) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "url": "http://127.0.0.1:1/"}))
    with study_lock(study):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not lock.exists()


def test_not_a_study_and_busy_port(tmp_path: Path, study: Path) -> None:
    with pytest.raises(DataError, match="is not a reader study"):
        make_server(tmp_path, port=0)
    first = make_server(study, port=0)
    try:
        with pytest.raises(DataError, match="cannot listen on 127.0.0.1"):
            make_server(study, port=first.server_address[1])
    finally:
        first.server_close()
