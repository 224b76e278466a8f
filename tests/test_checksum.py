"""Partition checksums (pure): order- and chunk-independent, sensitive to any changed, lost,
extra or misplaced row."""
from __future__ import annotations

import numpy as np
import pytest

from embeddings.checksum import combine, partition_checksums, row_checksums


@pytest.mark.parametrize("dtype,dim", [(np.float32, 16), (np.float16, 7), (np.float32, 3)])
def test_partition_checksums(dtype, dim):
    rng = np.random.default_rng(0)
    n, P = 5000, 8
    ids = rng.permutation(20_000)[:n]
    rows = rng.standard_normal((n, dim)).astype(dtype)
    parts = ids & (P - 1)
    want, counts = partition_checksums(ids, rows, parts, P)
    assert counts.sum() == n and (counts == np.bincount(parts, minlength=P)).all()
    # Any order, any chunking: the same.
    order = rng.permutation(n)
    got = np.zeros(P, np.uint64)
    for chunk in np.array_split(order, 7):
        got = combine(got, partition_checksums(ids[chunk], rows[chunk], parts[chunk], P)[0])
    np.testing.assert_array_equal(got, want)
    # One changed value, a lost row, a row under another id: only that partition differs.
    bad = rows.copy()
    bad[10, dim - 1] = bad[10, dim - 1] + dtype(1)
    diff = partition_checksums(ids, bad, parts, P)[0] != want
    assert diff.sum() == 1 and diff[parts[10]]
    keep = np.arange(n) != 20
    diff = partition_checksums(ids[keep], rows[keep], parts[keep], P)[0] != want
    assert diff.sum() == 1 and diff[parts[20]]
    moved = ids.copy()
    moved[30] += P                                     # same partition, another id
    assert (partition_checksums(moved, rows, moved & (P - 1), P)[0] != want).sum() == 1
    # Row checksums of identical rows under different ids differ.
    same = np.repeat(rows[:1], 2, axis=0)
    a, b = row_checksums(np.array([1, 2]), same)
    assert a != b
