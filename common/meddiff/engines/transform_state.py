# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""Save and restore the random state of a data pipeline's random transforms, for exact resume.

With ``num_workers=0`` MONAI's ``DataLoader`` seeds the transforms once, when it is built; after that
each random transform draws from its own ``numpy`` ``RandomState``. A resumed run rebuilds the loader
with the same seeds, so restoring those states continues the augmentation stream where the killed
run stopped. (With worker processes, transforms are re-seeded from torch's RNG every epoch, which the
:class:`~meddiff.engines.Trainer` checkpoint already restores.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from torch.utils.data import DataLoader

__all__ = ["random_transforms", "set_transform_rng_state", "transform_rng_state"]


def random_transforms(obj: Any) -> Iterator[Randomizable]:
    """Every ``Randomizable`` reachable from ``obj`` through transforms, lists, tuples and dicts (depth first)."""
    seen: set[int] = set()

    def walk(o: Any) -> Iterator[Randomizable]:
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, (list, tuple)):
            for item in o:
                yield from walk(item)
        elif isinstance(o, dict):
            for item in o.values():
                yield from walk(item)
        elif isinstance(o, (Transform, Randomizable)):
            if isinstance(o, Randomizable):
                yield o
            for key, value in vars(o).items():
                if key != "R":
                    yield from walk(value)

    yield from walk(obj)


def _pipeline(loader: DataLoader | None) -> Any:
    if loader is None or loader.num_workers > 0:
        return None
    return getattr(loader.dataset, "transform", None)


def transform_rng_state(loader: DataLoader | None) -> list[list[Any]]:
    """States of the loader's random transforms as ``weights_only``-loadable lists (empty with workers)."""
    states = []
    for t in random_transforms(_pipeline(loader)):
        kind, keys, pos, has_gauss, cached = t.R.get_state()
        states.append([kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)])
    return states


def set_transform_rng_state(loader: DataLoader | None, states: list[list[Any]]) -> None:
    """Restore :func:`transform_rng_state` output onto the same pipeline.

    Raises:
        ValueError: the pipeline has a different number of random transforms than when saved.
    """
    transforms = list(random_transforms(_pipeline(loader)))
    if not states:
        return
    if len(transforms) != len(states):
        raise ValueError(f"checkpoint holds {len(states)} transform random states but the pipeline has "
                         f"{len(transforms)} random transforms: was the augmentation changed?")
    for t, (kind, keys, pos, has_gauss, cached) in zip(transforms, states):
        t.R.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
