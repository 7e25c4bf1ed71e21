# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
from .atomic import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text, default_mode, is_temporary
from .config import as_bool
from .machine import CLOCKS, machine_info, timed

__all__ = ["CLOCKS", "as_bool", "atomic_path", "atomic_torch_save", "atomic_write_json", "atomic_write_text", "default_mode",
           "is_temporary", "machine_info", "timed"]
