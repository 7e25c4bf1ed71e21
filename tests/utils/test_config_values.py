# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
import numpy as np
import pytest

from meddiff.engines import TrainerSettings
from meddiff.sampling import DicomSeriesOutput
from meddiff.utils import as_bool


@pytest.mark.parametrize("text, expected", [("false", False), ("False", False), ("0", False), ("no", False),
                                            ("true", True), ("TRUE", True), ("1", True), (True, True), (0, False)])
def test_switches_from_the_command_line(text, expected):
    assert as_bool(text) is expected


def test_unknown_switch_names_the_key():
    with pytest.raises(ValueError, match="resume"):
        TrainerSettings(resume="maybe")


def test_settings_and_outputs_read_string_switches(tmp_path):
    settings = TrainerSettings(resume="false", progress="false", amp="False", distributed="false")
    assert (settings.resume, settings.progress, settings.amp, settings.distributed) == (False, False, False, False)
    writer = DicomSeriesOutput(enabled="false")
    assert writer(np.zeros((4, 4, 3)), np.eye(4), tmp_path / "sample_000") == []
    assert not list(tmp_path.iterdir())
