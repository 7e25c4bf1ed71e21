# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Make the README's reader-study images: a screenshot of the viewer in headless Chromium and the analysis figure.

``python -m tests.reader_study.readme_images OUT_DIR`` (needs chromium, chromium-driver, selenium, nilearn).
The study is an illustration, not a result: "real" cases are variants of the ICBM 2009a template (the MRI
demo's data), "synthetic" ones are other variants blurred through the slices as a stand-in for model samples,
and the ratings come from two simulated readers.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from meddiff.data.demo import make_brain_demo
from meddiff.reader_study import RatingsDB, analyse_study, build_study, load_key, load_public_study
from tests.reader_study.browser import ScriptedReader, start_chromium, start_server, stop_server

logger = logging.getLogger(__name__)


def main(out_dir: str) -> None:
    """Write ``reader_study_viewer.png`` and ``reader_study_analysis.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reader_study_images."))
    make_brain_demo(work / "real", num_volumes=6, spacing=2.0, seed=0)
    for i, path in enumerate(make_brain_demo(work / "raw", num_volumes=6, spacing=2.0, seed=1)):
        img = nib.load(str(path))
        blurred = gaussian_filter(np.asarray(img.dataobj, dtype=np.float32), sigma=(0.6, 0.6, 1.5))
        (work / "synthetic").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(blurred, img.affine), str(work / "synthetic" / f"sample_{i}.nii.gz"))
    study = build_study(work / "real", work / "synthetic", work / "study", seed=0, title="Brain MRI reader study")

    server, url = start_server(study, work / "server.log")
    driver = start_chromium(work / "profile")
    try:
        reader = ScriptedReader(driver, url)
        reader.login("reader-1")
        for _ in range(8):
            reader.driver.find_element("css selector", "body").send_keys("\ue013")
        for q, s in {"realism": 4, "anatomy": 4}.items():
            driver.find_element("css selector", f'input[name="q-{q}"][value="{s}"]').click()
        driver.set_window_size(1300, 860)
        driver.save_screenshot(str(out / "reader_study_viewer.png"))
    finally:
        driver.quit()
        stop_server(server)

    key, public = load_key(study), load_public_study(study)
    db = RatingsDB(study / "ratings.sqlite", public["cases"], [q["id"] for q in public["questions"]], key["seed"])
    rng = np.random.default_rng(0)
    for reader_id, skill in (("reader-1", 0.9), ("reader-2", 0.7)):
        db.login(reader_id)
        for case, info in key["cases"].items():
            real = info["truth"] == "real"
            base = 4.2 if real else 3.0
            scores = {q["id"]: int(np.clip(np.rint(base + rng.normal(0, 0.8)), 1, 5)) for q in public["questions"]}
            correct = rng.random() < skill
            answer = info["truth"] if correct else ("synthetic" if real else "real")
            db.record(reader_id, case, scores, answer, seconds=float(rng.uniform(20, 90)))
    result = analyse_study(study)
    (out / "reader_study_analysis.png").write_bytes((result["out_dir"] / "summary.png").read_bytes())
    logger.info("wrote %s", out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(sys.argv[1])
