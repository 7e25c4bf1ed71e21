# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors run faster on one thread, and the 2-core CI machine is shared with subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
