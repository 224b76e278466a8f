"""The memory tier: the resident partitions of one table as one dense tensor (an arena).

Row ``id`` of resident partition ``p`` sits at arena row ``slot[p] * rows_per_partition +
(id >> log2(P))``, so a lookup maps ids to arena rows in one vectorised step and pools them with
one ``embedding_bag`` call. No Python object exists per row.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading

import numpy as np
import torch

from embeddings.partition import local_index


NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class TableArena:
    """Room for every partition of the table, reserved once from calloc'd memory: pages are
    mapped only when rows are written, so a partition that is not resident costs address space,
    not RAM. Partition ``p`` always lives at slot ``p``, so making partitions resident or not
    never copies rows; releasing one hands its pages back to the OS."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, num_partitions: int,
                 huge_pages: bool = False):
        """``huge_pages``: back the arena with transparent huge pages (see ``allocate``)."""
        self.num_partitions = num_partitions
        self.rows_per_partition = -(-num_embeddings // num_partitions)
        self.dim = dim
        self.dtype = dtype
        self.slot = np.full(num_partitions, -1, dtype=np.int64)
        shape = (num_partitions * self.rows_per_partition, dim)
        self._memory, arr = allocate(shape, NP_DTYPES[dtype], huge_pages)
        self.weight = torch.from_numpy(arr).view(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the resident partitions."""
        return int((self.slot >= 0).sum()) * self.rows_per_partition * self.dim * \
            self.weight.element_size()

    def resident(self, partition: int) -> bool:
        return self.slot[partition] >= 0

    def set_partitions(self, partitions: list[int]) -> list[int]:
        """Make exactly ``partitions`` resident, keeping the rows of those already resident.
        Returns the partitions that are new (their rows are zero until filled)."""
        wanted = np.zeros(self.num_partitions, dtype=bool)
        wanted[list(partitions)] = True
        for p in np.flatnonzero((self.slot >= 0) & ~wanted):
            self._release(int(p))
        new = [p for p in partitions if self.slot[p] < 0]
        self.slot = np.where(wanted, np.arange(self.num_partitions), -1)
        return new

    def clear(self, partition: int) -> None:
        """Zero a resident partition's rows (its copy is being replaced)."""
        self._release(partition)

    def _release(self, partition: int) -> None:
        """Zero a partition's rows and give its whole pages back (MADV_DONTNEED)."""
        rpp = self.rows_per_partition
        rows = self.weight[partition * rpp:(partition + 1) * rpp]
        start, size = rows.data_ptr(), rows.numel() * rows.element_size()
        lo = -(-start // PAGE) * PAGE
        hi = (start + size) // PAGE * PAGE
        if hi > lo and _madvise(lo, hi - lo):
            flat = rows.view(-1).view(torch.uint8)
            flat[:lo - start].zero_()
            flat[hi - start:].zero_()
        else:
            rows.zero_()

    def rows_index(self, ids: np.ndarray, partitions: np.ndarray) -> np.ndarray:
        """Arena rows of ``ids``; -1 where the partition is not resident."""
        slots = self.slot[partitions]
        idx = slots * self.rows_per_partition + local_index(ids, self.num_partitions)
        return np.where(slots >= 0, idx, -1)

    def fill(self, partition: int, ids: np.ndarray, rows: torch.Tensor) -> None:
        base = self.slot[partition] * self.rows_per_partition
        local = torch.from_numpy(local_index(ids, self.num_partitions) + base)
        self.weight.index_copy_(0, local, rows)


PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_DONTNEED = 4


def allocate(shape: tuple, dtype, huge_pages: bool):
    """(owner, zeroed array) from an anonymous mapping: pages are mapped when first written.
    NumPy asks for transparent huge pages for any large array (MADV_HUGEPAGE); here that is the
    caller's choice, and small pages are the default. Measured on this VM, whose host takes
    back memory the guest frees (free page reporting), filling 2 GiB of memory freed a while
    before: 7.2-7.7 s of CPU on huge pages, 1.1-1.8 s on 4 KiB pages; lookups were the same
    on both (README, "Loading a checkpoint")."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return None, np.zeros(shape, dtype)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            mm.madvise(advice)
        except OSError:              # a kernel without THP: small pages either way
            pass
    return mm, np.frombuffer(mm, dtype=dtype).reshape(shape)


def _madvise(addr: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), MADV_DONTNEED) == 0


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

    def acquire_read(self) -> None:
        """A read lock not tied to a block or a thread: a lookup takes it on the event loop and
        a worker thread reading its misses from RocksDB releases it."""
        self._acquire_read()

    def release_read(self) -> None:
        self._release_read()

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
