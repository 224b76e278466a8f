"""The arithmetic of set-associative row caches (the router's and the shard servers'): which
set an id hashes to, and where each of a batch's candidates ranks within its set. Vectorised;
both caches' layouts and policies stay their own."""
from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def set_of(ids: np.ndarray, sets: int) -> np.ndarray:
    """The set of each id: a multiplicative hash's high bits, modulo ``sets``."""
    h = ids.astype(np.uint64) * GOLDEN
    return ((h >> np.uint64(29)) % np.uint64(max(1, sets))).astype(np.int64)


def ranked_in_sets(s: np.ndarray, ways: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For candidates in sets ``s`` (in the order given): (their indices, their sets, their
    rank within the set in that order), sorted by set, keeping the first ``ways`` of each."""
    order = np.argsort(s, kind="stable")
    ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    rank = np.arange(len(ss)) - np.repeat(starts, np.diff(np.r_[starts, len(ss)]))
    keep = rank < ways
    return order[keep], ss[keep], rank[keep]
