# Copyright (c) meddiff contributors. Licensed under the Apache License, Version 2.0.
"""A shuffling sampler whose position can be saved and restored, so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across DDP ranks, that can restart mid-epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)``; ``state_dict`` records the epoch and
    how many indices this rank has already consumed, so ``load_state_dict`` continues exactly where a
    killed run stopped. With ``torch.distributed`` initialised, each rank takes every ``world_size``-th
    index of the (padded) permutation, as ``DistributedSampler`` does.

    Args:
        data_source: the dataset (only its length is used).
        shuffle: permute each epoch; otherwise keep dataset order.
        seed: base seed of the permutations.
        num_replicas: number of ranks; defaults to the process group's world size (1 without DDP).
        rank: this rank; defaults to the process group's rank.
    """

    def __init__(
        self,
        data_source: Sized,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, num_replicas={self.num_replicas}).")
        self.data_source = data_source
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def _indices(self) -> list[int]:
        n = len(self.data_source)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = -(-n // self.num_replicas)
        order += order[: per_rank * self.num_replicas - n]  # pad so every rank gets as many
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()[self.start :]
        self.start = 0  # only the first epoch after a resume is partial
        return iter(indices)

    def __len__(self) -> int:
        return -(-len(self.data_source) // self.num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the permutation of ``epoch`` and skip its first ``start`` indices of this rank."""
        self.epoch = epoch
        self.start = start
