# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Serve a reader study to browsers on the local machine (standard-library ``http.server``).

Only three things can be fetched: the viewer's own files (package data ``meddiff/reader_study/static``),
``STUDY/viewer/study.json`` and the converted cases ``STUDY/viewer/cases/<case_id>/{meta.json,volume.u16.gz}``
(case ids and file names are checked against the study, so no path leads elsewhere). The key
(``STUDY/key.json``) is read for the seed of each reader's case order and never sent.

JSON API: ``POST /api/login {"reader"}`` -> order and progress; ``POST /api/rate {"reader", "case",
"scores": {question: 1-5}, "answer": "real"|"synthetic", "seconds"}`` -> committed to SQLite before the
reply. ``STUDY/server.lock`` (PID and URL) keeps a second server off the same study.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..data.errors import DataError
from .build import VIEWER_DIR, load_key, load_public_study
from .db import DB_FILE, RatingsDB

__all__ = ["LOCK_FILE", "make_server", "serve_study", "study_lock"]

logger = logging.getLogger(__name__)

LOCK_FILE = "server.lock"
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
_CASE_FILES = {"meta.json": "application/json", "volume.u16.gz": "application/octet-stream"}
_MAX_BODY = 64 * 1024


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def study_lock(study: str | os.PathLike) -> Iterator[Path]:
    """Hold ``STUDY/server.lock`` (created exclusively, with this PID) while the block runs.

    A lock left by a process that no longer exists (a killed server) is taken over with a warning.

    Args:
        study: the study folder.

    Yields:
        The lock file; write the server's URL into it with :func:`_write_lock`.

    Raises:
        DataError: another live process serves the study.
    """
    path = Path(study) / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                info = {}
            pid = int(info.get("pid", -1))
            if pid > 0 and _pid_alive(pid):
                raise DataError(
                    path,
                    f"another server (PID {pid}, {info.get('url', 'starting')}) is serving this study; "
                    "stop it first (two servers would hand out the same cases twice)",
                ) from None
            logger.warning("%s: removing a stale lock of PID %s, which is no longer running", path, pid)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid()}, f)
        break
    else:  # pragma: no cover - another server won the race twice
        raise DataError(path, "could not take the lock")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def _write_lock(path: Path, url: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "url": url}))
    os.replace(tmp, path)


class _Handler(BaseHTTPRequestHandler):
    server: _StudyServer
    server_version = "meddiff-reader-study"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _not_found(self) -> None:
        self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        srv = self.server
        if not parts or parts == ["index.html"]:
            parts = ["static", "index.html"]
        if parts == ["api", "study"]:
            return self._json(HTTPStatus.OK, srv.public)
        if len(parts) == 2 and parts[0] == "static" and parts[1] in srv.static_files:
            name = parts[1]
            body = srv.static_files[name]
            return self._send(HTTPStatus.OK, body, _STATIC_TYPES.get(Path(name).suffix, "application/octet-stream"))
        if len(parts) == 3 and parts[0] == "cases" and parts[1] in srv.case_set and parts[2] in _CASE_FILES:
            body = (srv.viewer_dir / "cases" / parts[1] / parts[2]).read_bytes()
            extra = {"Content-Encoding": "gzip"} if parts[2].endswith(".gz") else None
            return self._send(HTTPStatus.OK, body, _CASE_FILES[parts[2]], extra)
        return self._not_found()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        path = urlparse(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request too large"})
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(payload, dict):
                raise ValueError("expected a JSON object")
            if path == "/api/login":
                return self._json(HTTPStatus.OK, self.server.db.login(str(payload.get("reader", ""))))
            if path == "/api/rate":
                n = self.server.db.record(
                    str(payload.get("reader", "")),
                    str(payload.get("case", "")),
                    payload.get("scores") or {},
                    str(payload.get("answer", "")),
                    payload.get("seconds", -1),
                )
                return self._json(HTTPStatus.OK, {"ok": True, "rated": n})
        except (ValueError, TypeError) as e:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        return self._not_found()


class _StudyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], study: Path) -> None:
        self.study = study
        self.viewer_dir = study / VIEWER_DIR
        self.public = load_public_study(study)
        key = load_key(study)
        self.case_set = set(self.public["cases"])
        self.db = RatingsDB(study / DB_FILE, self.public["cases"], [q["id"] for q in self.public["questions"]],
                            key["seed"])
        static = resources.files("meddiff.reader_study") / "static"
        self.static_files = {f.name: f.read_bytes() for f in static.iterdir() if f.is_file()}
        super().__init__(address, _Handler)


def make_server(study: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """Create (bind, not start) the study's HTTP server; takes no lock — :func:`serve_study` does.

    Args:
        study: the study folder.
        host: address to listen on.
        port: port (0: any free port).

    Returns:
        The server; ``server.server_address`` has the port.

    Raises:
        DataError: not a built study, or the port is taken.
    """
    study_path = Path(study)
    load_public_study(study_path)
    try:
        return _StudyServer((host, int(port)), study_path)
    except OSError as e:
        raise DataError(study_path, f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from e


def serve_study(study: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the study until interrupted (Ctrl-C or SIGTERM), holding ``STUDY/server.lock``.

    Args:
        study: the study folder.
        host: address to listen on (the default keeps it to this machine).
        port: port (0: any free port; the URL is logged and written into the lock file).

    Raises:
        DataError: not a built study, another server holds the study, or the port is taken.
    """
    study_path = Path(study)
    load_public_study(study_path)
    with study_lock(study_path) as lock:
        server = make_server(study_path, host, port)
        url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
        _write_lock(lock, url)
        def _terminate(signum: int, frame: Any) -> None:
            threading.Thread(target=server.shutdown, daemon=True).start()

        previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
            else None
        logger.info("reader study %s at %s (Ctrl-C stops; ratings are saved as they come)", study_path, url)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            logger.info("stopped")
        finally:
            server.server_close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
