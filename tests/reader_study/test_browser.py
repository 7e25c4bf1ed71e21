# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""The reader study in a real headless Chromium: two scripted readers, a server crash in the middle, analysis."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from meddiff.cli.main import main
from meddiff.reader_study import analyse_study, build_study, load_key, load_public_study, reader_order
from tests.reader_study.browser import ScriptedReader, browser_missing, start_chromium, start_server, stop_server
from tests.reader_study.helpers import make_folders

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=f"browser test skipped: {browser_missing()}")

QUESTIONS = ("realism", "anatomy", "consistency")


def _plan(truth: str) -> tuple[dict[str, int], str]:
    """A reader who likes real cases (5, 4, 4) more than synthetic ones (2, 1, 2) and always spots them."""
    scores = (5, 4, 4) if truth == "real" else (2, 1, 2)
    return dict(zip(QUESTIONS, scores)), truth


def test_two_readers_and_a_server_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    real, syn = make_folders(tmp_path / "data", n_real=2, n_syn=2, ct=True)
    study = build_study(real, syn, tmp_path / "study", seed=3, title="Browser test")
    truth = {c: v["truth"] for c, v in load_key(study)["cases"].items()}
    cases = load_public_study(study)["cases"]
    log = tmp_path / "server.log"
    server, url = start_server(study, log)
    driver = start_chromium(tmp_path / "profile")
    try:
        # a second server on the same study is refused with one clear error
        with pytest.raises(SystemExit) as exc:
            main(["reader-study", "serve", str(study), "--port", "0"])
        assert exc.value.code == 1
        assert f"another server (PID {server.pid}" in caplog.text

        reader = ScriptedReader(driver, url)
        assert reader.login("r1") == "rating"
        assert reader.progress() == "Case 1 of 4"
        assert reader.case_id() == reader_order(cases, 3, "r1")[0]
        # the CT volume is drawn in both planes, scrolls, and the lung window changes the picture
        mean, std = reader.canvas_stats(0)
        assert std > 10 and reader.canvas_stats(1)[1] > 10
        first = reader.slice_index(0)
        driver.find_element("css selector", "body").send_keys("\ue013")  # arrow up: next acquisition slice
        reader.wait(f"document.querySelector('#viewer-0 canvas').dataset.slice === '{first + 1}'")
        driver.find_element("css selector", 'button[data-preset="Lung"]').click()
        assert reader.canvas_stats(0)[0] != pytest.approx(mean, abs=1.0)
        for _ in cases:
            reader.rate(*_plan(truth[reader.case_id()]))
        assert reader.state() == "done"

        # reader 2 rates half, the server dies (SIGKILL), a new server takes over the stale lock
        assert reader.login("r2") == "rating"
        for _ in range(2):
            reader.rate(*_plan(truth[reader.case_id()]))
        assert stop_server(server, kill=True) != 0
        server, url = start_server(study, log)
        reader.url = url
        assert reader.login("r2") == "rating"
        assert reader.progress() == "Case 3 of 4"  # resumes at the first case not rated
        assert reader.case_id() == reader_order(cases, 3, "r2")[2]
        for _ in range(2):
            reader.rate(*_plan(truth[reader.case_id()]))
        assert reader.state() == "done"
        assert reader.console_errors() == []
    finally:
        driver.quit()
        code = stop_server(server)
    assert code == 0 and not (study / "server.lock").exists()

    con = sqlite3.connect(study / "ratings.sqlite")
    rows = con.execute("SELECT reader_id, case_id, answer, seconds FROM responses").fetchall()
    orders = dict(con.execute("SELECT reader_id, case_order FROM readers").fetchall())
    scores = con.execute("SELECT reader_id, case_id, question, score FROM scores").fetchall()
    con.close()
    assert sorted((r, c) for r, c, _, _ in rows) == sorted((r, c) for r in ("r1", "r2") for c in cases)
    assert all(a == truth[c] and s > 0 for _, c, a, s in rows)
    assert {r: json.loads(o) for r, o in orders.items()} == {r: reader_order(cases, 3, r) for r in ("r1", "r2")}
    assert all(s == _plan(truth[c])[0][q] for _, c, q, s in scores) and len(scores) == 8 * len(QUESTIONS)

    result = analyse_study(study)
    acc = {a["reader"]: a for a in result["accuracy"]}
    assert acc["r1"]["accuracy"] == acc["r2"]["accuracy"] == 1.0
    kappas = [a["value"] for a in result["agreement"] if a["statistic"] == "weighted kappa (quadratic)"]
    assert kappas == [1.0, 1.0, 1.0]
