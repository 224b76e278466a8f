"""Per-partition checksums of rows: the same function on the loader (over the rows it read from
a checkpoint) and on every shard server (over the rows it stores), so a load is verified
against its source and across replicas without moving the rows again.

A row's checksum mixes its id and its bytes (as 64-bit words, each multiplied by its own odd
constant, summed with wrap-around); a partition's checksum is the wrapping sum of its rows'.
Sums do not depend on order, so rows can be checked in whatever chunks and order they pass.
Vectorised: no Python loop per row. Not cryptographic: it catches lost, stale, truncated or
misplaced rows, not an adversary.
"""
from __future__ import annotations

import numpy as np

_MULT = (np.arange(1, 4097, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
_ID_MULT = np.uint64(0xC2B2AE3D27D4EB4F)


def row_checksums(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """uint64 per row of ``rows`` ([n, dim], any dtype) stored under ``ids``."""
    n = len(ids)
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((n, pad), np.uint8)], axis=1)
    words = raw.view(np.uint64)
    k = words.shape[1]
    mult = _MULT[:k] if k <= len(_MULT) else np.resize(_MULT, k)
    with np.errstate(over="ignore"):
        h = np.einsum("ij,j->i", words, mult)      # wrapping uint64; no [n, k] temporary
        h ^= np.asarray(ids, dtype=np.int64).view(np.uint64) * _ID_MULT
    return h


def partition_checksums(ids: np.ndarray, rows: np.ndarray, parts: np.ndarray,
                        num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(checksum uint64 [P], rows int64 [P]) of rows grouped by their partition ``parts``."""
    out = np.zeros(num_partitions, dtype=np.uint64)
    if len(ids):
        np.add.at(out, parts, row_checksums(ids, rows))
    return out, np.bincount(parts, minlength=num_partitions).astype(np.int64)


def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Checksums of two disjoint sets of rows together."""
    with np.errstate(over="ignore"):
        return a + b
