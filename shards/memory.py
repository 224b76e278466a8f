"""The memory tier: the resident partitions of one table as one dense tensor (an arena).

Row ``id`` of resident partition ``p`` sits at arena row ``slot[p] * rows_per_partition +
(id >> log2(P))``, so a lookup maps ids to arena rows in one vectorised step and pools them with
one ``embedding_bag`` call. No Python object exists per row.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from embeddings.partition import local_index


NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


class TableArena:
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, num_partitions: int):
        self.num_partitions = num_partitions
        self.rows_per_partition = -(-num_embeddings // num_partitions)
        self.dim = dim
        self.dtype = dtype
        self.slot = np.full(num_partitions, -1, dtype=np.int64)
        self.weight = torch.zeros((0, dim), dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def resident(self, partition: int) -> bool:
        return self.slot[partition] >= 0

    def set_partitions(self, partitions: list[int]) -> list[int]:
        """Make exactly ``partitions`` resident, keeping the rows of those already resident.
        Returns the partitions that are new (their rows are zero until filled)."""
        keep = [p for p in partitions if self.slot[p] >= 0]
        new = [p for p in partitions if self.slot[p] < 0]
        rpp = self.rows_per_partition
        # np.zeros takes calloc'd memory: pages are mapped when rows are first written, so
        # making a large table resident is instant and RSS grows with the rows filled.
        weight = torch.from_numpy(np.zeros((len(partitions) * rpp, self.dim),
                                           dtype=NP_DTYPES[self.dtype]))
        slot = np.full(self.num_partitions, -1, dtype=np.int64)
        for i, p in enumerate(partitions):
            slot[p] = i
        for p in keep:
            o, n = self.slot[p] * rpp, slot[p] * rpp
            weight[n:n + rpp] = self.weight[o:o + rpp]
        self.weight, self.slot = weight, slot
        return new

    def rows_index(self, ids: np.ndarray, partitions: np.ndarray) -> np.ndarray:
        """Arena rows of ``ids``; -1 where the partition is not resident."""
        slots = self.slot[partitions]
        idx = slots * self.rows_per_partition + local_index(ids, self.num_partitions)
        return np.where(slots >= 0, idx, -1)

    def fill(self, partition: int, ids: np.ndarray, rows: torch.Tensor) -> None:
        base = self.slot[partition] * self.rows_per_partition
        local = torch.from_numpy(local_index(ids, self.num_partitions) + base)
        self.weight.index_copy_(0, local, rows)


class RWLock:
    """Many readers or one writer. Writers wait for readers in flight; new readers wait for a
    waiting writer, so writes are not starved."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def read(self):
        return _Guard(self._acquire_read, self._release_read)

    def write(self):
        return _Guard(self._acquire_write, self._release_write)

    def _acquire_read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def _release_read(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def _acquire_write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def _release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Guard:
    def __init__(self, enter, leave):
        self._enter, self._leave = enter, leave

    def __enter__(self):
        self._enter()

    def __exit__(self, *exc):
        self._leave()
