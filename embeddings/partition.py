"""The row -> partition function: pure and vectorised.

A table has P partitions, P a power of two. Row ``id`` lives in partition ``id & (P - 1)`` at
local index ``id >> log2(P)``. Neighbouring ids land in different partitions, so hot ranges
spread; splitting a partition in two (P -> 2P) sends each row of partition p to p or p + P.
"""
from __future__ import annotations

import numpy as np


def partition_of(ids: np.ndarray, num_partitions: int) -> np.ndarray:
    return ids & (num_partitions - 1)


def local_index(ids: np.ndarray, num_partitions: int) -> np.ndarray:
    return ids >> (num_partitions.bit_length() - 1)


def rows_in_partition(num_embeddings: int, num_partitions: int, partition: int) -> int:
    """How many ids in [0, num_embeddings) fall in ``partition``."""
    return max(0, (num_embeddings - partition + num_partitions - 1) // num_partitions)


def choose_num_partitions(num_embeddings: int, row_bytes: int, target_bytes: int,
                          min_partitions: int, max_partitions: int) -> int:
    """The power of two that makes partitions near ``target_bytes``, within the bounds and never
    more partitions than rows."""
    want = max(min_partitions, -(-num_embeddings * row_bytes // target_bytes))
    p = 1 << max(0, int(want - 1).bit_length())
    p = min(p, 1 << (max(1, max_partitions).bit_length() - 1))   # a power of two, <= max
    while p > 1 and p > num_embeddings:
        p //= 2
    return p
