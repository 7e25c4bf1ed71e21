# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by selenium, and a scripted reader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["ScriptedReader", "browser_missing", "start_chromium", "start_server", "stop_server"]

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1360,900")


def _first(paths: tuple[str, ...], name: str) -> str | None:
    return next((p for p in paths if os.access(p, os.X_OK)), None) or shutil.which(name)


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or ``None`` when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if _first(CHROMIUM_CANDIDATES, "chromium") is None:
        return "no chromium browser (apt-get install -y chromium chromium-driver; .ci/run does this)"
    if _first(CHROMEDRIVER_CANDIDATES, "chromedriver") is None:
        return "no chromedriver (apt-get install -y chromium-driver)"
    return None


def start_chromium(profile_dir: Path) -> Any:
    """Start headless Chromium with a fresh profile; the driver path is explicit, so nothing is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never try the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = _first(CHROMIUM_CANDIDATES, "chromium")
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile_dir}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # JavaScript errors, for the tests to check
    service = Service(executable_path=_first(CHROMEDRIVER_CANDIDATES, "chromedriver"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(60)
    return driver


def start_server(study: Path, log: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Run ``meddiff reader-study serve STUDY --port 0`` in a subprocess; returns it and its URL (from the lock)."""
    lock = study / "server.lock"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "meddiff.cli.main", "reader-study", "serve", str(study),
                                 "--port", "0"], stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            info = json.loads(lock.read_text())
            if info.get("pid") == proc.pid and info.get("url"):
                return proc, info["url"]
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout} s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen, kill: bool = False) -> int:
    """SIGTERM (clean stop) or SIGKILL (a crash) the server and reap it; returns its exit code."""
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
    return proc.wait(timeout=30)


class ScriptedReader:
    """Drives the viewer page like a reader: log in, look at the case, rate it, answer, submit."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url

    def wait(self, predicate: str, timeout: float = 30.0) -> Any:
        """Wait until the JavaScript expression ``predicate`` is truthy; return its value."""
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda d: d.execute_script(f"return {predicate};"))

    def state(self) -> str:
        return self.driver.execute_script("return document.body.dataset.state;")

    def login(self, reader_id: str) -> str:
        """Open the page, log in; returns the page state afterwards ('rating' or 'done')."""
        from selenium.webdriver.common.by import By

        self.driver.get(self.url)
        self.wait("window.readerStudy && window.readerStudy.study !== null")
        box = self.driver.find_element(By.ID, "reader-id")
        box.clear()
        box.send_keys(reader_id)
        self.driver.find_element(By.ID, "start").click()
        return self.wait("['rating', 'done'].includes(document.body.dataset.state) && document.body.dataset.state")

    def console_errors(self) -> list[str]:
        """Messages of level SEVERE in the page's console since the last call (uncaught errors, failed loads)."""
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def progress(self) -> str:
        return self.driver.execute_script("return document.getElementById('progress').textContent;")

    def case_id(self) -> str:
        return self.driver.execute_script("return window.readerStudy.caseId;")

    def canvas_stats(self, viewer: int = 0) -> tuple[float, float]:
        """Mean and standard deviation of the grey values drawn on a plane's canvas."""
        return tuple(self.driver.execute_script(
            """const c = document.querySelector(`#viewer-${arguments[0]} canvas`);
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let s = 0, s2 = 0, n = d.length / 4;
            for (let i = 0; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; }
            return [s / n, Math.sqrt(Math.max(s2 / n - (s / n) ** 2, 0))];""", viewer))

    def slice_index(self, viewer: int = 0) -> int:
        return int(self.driver.execute_script(
            f"return document.querySelector('#viewer-{viewer} canvas').dataset.slice;"))

    def rate(self, scores: dict[str, int], answer: str) -> None:
        """Click the Likert scores and the answer, submit, and wait until the next case (or the end) shows."""
        from selenium.webdriver.common.by import By

        before = self.case_id()
        for q, s in scores.items():
            self.driver.find_element(By.CSS_SELECTOR, f'input[name="q-{q}"][value="{s}"]').click()
        self.driver.find_element(By.CSS_SELECTOR, f'input[name="answer"][value="{answer}"]').click()
        button = self.driver.find_element(By.ID, "submit")
        assert button.is_enabled(), "submit stays disabled although every question is answered"
        button.click()
        self.wait(f"document.body.dataset.state === 'done' || (document.body.dataset.state === 'rating' "
                  f"&& window.readerStudy.caseId !== {json.dumps(before)})")
