"""A training sampler that can start where an interrupted run stopped.

:class:`ResumableTrainingSampler` produces detectron2's ``TrainingSampler`` stream (the
same shuffled order for the same seed: ``randperm(size)`` per epoch from one generator
seeded with ``seed``), sharded over processes the same way (process ``r`` of ``W`` takes
stream positions ``r, r + W, r + 2W, ...``). It differs in two ways:

* it starts at stream position ``start`` (the samples an interrupted run consumed:
  iterations done x total batch size), skipping whole epochs without materialising them;
* it yields ``(position, index)`` pairs: the position in the stream names the sample
  for its augmentation seed (:class:`segdistill.data.build.SeededMapDataset`).
"""
from __future__ import annotations

import itertools
from typing import Iterator, Tuple

import torch
from torch.utils.data.sampler import Sampler

from detectron2.utils import comm

__all__ = ["ResumableTrainingSampler"]


class ResumableTrainingSampler(Sampler):
    """Infinite shuffled stream of ``(position, index)`` from ``start`` (see the module docstring)."""

    def __init__(self, size: int, *, seed: int, shuffle: bool = True, start: int = 0):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"ResumableTrainingSampler needs a positive dataset size, got {size!r}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self._size = size
        self._seed = int(seed)
        self._shuffle = shuffle
        self._start = int(start)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        first = self._start + self._rank
        yield from itertools.islice(self._stream(first), 0, None, self._world_size)

    def _stream(self, first: int) -> Iterator[Tuple[int, int]]:
        """The stream from position ``first`` on."""
        g = torch.Generator()
        g.manual_seed(self._seed)
        epoch, offset = divmod(first, self._size)
        if self._shuffle:
            for _ in range(epoch):  # advance the generator exactly as the skipped epochs did
                torch.randperm(self._size, generator=g)
        position = epoch * self._size
        while True:
            order = torch.randperm(self._size, generator=g) if self._shuffle else torch.arange(self._size)
            for i, index in enumerate(order.tolist()[offset:], start=offset):
                yield position + i, index
            position += self._size
            offset = 0
