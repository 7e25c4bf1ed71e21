# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Start, query and stop a real ``monailabel start_server`` from the MONAI Label venv (``make label-venv``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

__all__ = ["LABEL_VENV", "LabelServer", "multipart", "require_label_venv"]

REPO = Path(__file__).resolve().parents[2]
LABEL_VENV = Path(os.environ.get("MEDDIFF_LABEL_VENV", REPO / ".venv-label"))
START_GUARD_S = 600  # guards against a hung server; not a speed check


def require_label_venv() -> None:
    """Skip without the venv, or fail when ``MEDDIFF_REQUIRE_LABEL=1`` (``.ci/run`` sets it)."""
    if (LABEL_VENV / ".installed").is_file():
        return
    reason = f"no MONAI Label venv at {LABEL_VENV} (build it with `make label-venv`)"
    if os.environ.get("MEDDIFF_REQUIRE_LABEL") == "1":
        pytest.fail(f"MEDDIFF_REQUIRE_LABEL=1 but {reason}")
    pytest.skip(reason)


def multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class LabelServer:
    """``monailabel start_server`` on a free loopback port, in its own process group, logging to ``log``.

    Args:
        app: the app folder (``main.py``, ``model/<bundle>``).
        studies: the local datastore folder.
        log: the server's log file.
        conf: ``--conf`` pairs.
    """

    def __init__(self, app: Path, studies: Path, log: Path, conf: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
                    "MONAI_LABEL_SESSION_PATH": str(log.parent / "sessions")})
        cmd = [str(LABEL_VENV / "bin" / "python"), "-m", "monailabel.main", "start_server", "--app", str(app),
               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in conf.items():
            cmd += ["--conf", key, value]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=app,
                                         start_new_session=True)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def request(self, method: str, path: str, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One HTTP call; returns (status, body)."""
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=900) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self) -> dict[str, Any]:
        """Poll ``/info/`` until it answers; fail with the log if the server exits first."""
        deadline = time.monotonic() + START_GUARD_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"monailabel exited with {self.proc.returncode} before serving:\n{self.log_tail()}")
            try:
                status, body = self.request("GET", "/info/")
                if status == 200:
                    return json.loads(body)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        pytest.fail(f"monailabel did not answer /info/ within {START_GUARD_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGINT (uvicorn's clean shutdown), then SIGKILL the whole group (a training subprocess is in it)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
