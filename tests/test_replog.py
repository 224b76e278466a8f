"""The replication log's bookkeeping (pure): sequencing, classification of incoming entries,
catch-up ranges, truncation, deduplication by idempotency key."""
from __future__ import annotations

import numpy as np

from shards.replog import NONE, Entry, ReplicationLog

P, DIM = 4, 2


def write(log: ReplicationLog, ids, epoch: int = 1, request_id: str = "") -> Entry:
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.repeat(ids[:, None], DIM, 1).astype(np.float32)
    e = log.next_entry(request_id, np.full(P, epoch, np.int64), ids, rows, ids & (P - 1))
    log.append(e)
    return e


def fresh(max_bytes: int = 1 << 20) -> ReplicationLog:
    return ReplicationLog(np.zeros(P, np.int64), np.zeros(P, np.int64), max_bytes)


def test_leader_sequences_each_partition_separately():
    log = fresh()
    e1 = write(log, [0, 1, 5])                  # partitions 0, 1 (ids 1 and 5)
    assert e1.parts.tolist() == [0, 1] and e1.seqs.tolist() == [1, 1]
    e2 = write(log, [4, 2])                     # partitions 0, 2
    assert e2.parts.tolist() == [0, 2] and e2.seqs.tolist() == [2, 1]
    assert e2.prev_epochs.tolist() == [1, 0]    # partition 0's last entry was at epoch 1
    assert log.seq.tolist() == [2, 1, 1, 0]


def test_follower_classifies_new_duplicate_behind_and_diverged():
    leader, follower = fresh(), fresh()
    e1, e2 = write(leader, [0, 1]), write(leader, [4, 5])
    new, behind, bad = follower.classify(e2)    # missed e1: behind on both partitions
    assert not new.any() and behind.all() and not bad.any()
    new, behind, bad = follower.classify(e1)
    assert new.all() and not behind.any() and not bad.any()
    follower.append(e1)
    assert follower.classify(e1)[0].sum() == 0 and not follower.classify(e1)[2].any()  # dup
    follower.append(e2)
    # A new leader at epoch 2 that never had e2 writes its own seq 2 of partition 0: the
    # follower's seq 2 came from epoch 1, so the histories differ.
    other = fresh()
    other.append(e1)
    e2b = write(other, [8], epoch=2)
    new, behind, bad = follower.classify(e2b)
    assert bad.tolist() == [True] and not new.any()
    # ... and its seq 3 (prev epoch 2) does not follow the follower's seq 2 (epoch 1) either.
    e3b = write(other, [12], epoch=2)
    assert follower.classify(e3b)[2].tolist() == [True]


def test_since_returns_only_later_entries_of_wanted_partitions():
    log = fresh()
    write(log, [0, 1])
    write(log, [4, 2])
    write(log, [8])
    after = np.full(P, NONE, np.int64)
    after[0] = 1
    got, complete = log.since(after)
    assert complete and [e.parts.tolist() for e in got] == [[0], [0]]
    assert [e.ids.tolist() for e in got] == [[4], [8]]
    after[0], after[2] = 3, 0
    got, _ = log.since(after)
    assert [e.ids.tolist() for e in got] == [[2]]


def test_eviction_truncates_and_moves_the_floor():
    log = fresh(max_bytes=300)                  # room for one small entry
    write(log, [0], request_id="a")
    write(log, [4], request_id="b")
    write(log, [1])
    assert len(log) == 1
    assert log.floor_seq.tolist() == [2, 0, 0, 0]
    after = np.full(P, NONE, np.int64)
    after[0] = 1
    assert log.since(after) is None             # seq 2 of partition 0 is gone
    after[0] = 2
    assert log.since(after) == ([], True)
    assert log.epoch_at(0, 2) == 1 and log.epoch_at(0, 1) is None
    assert log.by_request("a") == [] and log.by_request("b") == []
    log.set_budget(0)                           # nothing fits: everything is evicted
    assert len(log) == 0 and log.floor_seq.tolist() == [2, 1, 0, 0]


def test_by_request_finds_a_resent_write():
    log = fresh()
    e = write(log, [0, 1], request_id="k")
    write(log, [2], request_id="other")
    assert log.by_request("k") == [e]
    assert log.by_request("") == []


def test_reset_forgets_a_partition():
    log = fresh()
    write(log, [0, 1])
    write(log, [4])
    log.reset(0, 7, 3)
    assert log.seq.tolist()[0] == 7 and log.epoch_at(0, 7) == 3
    after = np.full(P, NONE, np.int64)
    after[1] = 0
    got, _ = log.since(after)
    assert [e.parts.tolist() for e in got] == [[1]]     # partition 0 gone from the entries
