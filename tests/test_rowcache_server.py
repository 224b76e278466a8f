"""The shard server's row cache (``shards.rowcache``), as a unit: its eviction decisions equal
a plain reference model of the policy, batch after batch; writes go through; dropped or
rewritten partitions are never admitted from an older read; the policies' hit rates on Zipf
traffic are near an ideal cache's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shards.rowcache import AGING_READS, POLICIES, RowCache


class ReferenceCache:
    """The policy as plain Python, one id at a time: a set per hash (the cache's own
    ``_set_of``), ``ways`` slots a set. A batch's reads first (hits score: the batch's tick for
    lru, +1 for lfu); then its misses, in order, each set's r-th candidate offered the set's
    r-th lowest-scored slot (empty slots lowest, ties by way); lfu admits it only if its
    frequency (the cache's sketch, ``frequency``) is at least the victim's score. Every
    ``AGING_READS * capacity`` reads, lfu scores halve."""

    def __init__(self, cache: RowCache):
        self.c = cache
        self.keys = [[-1] * cache.ways for _ in range(cache.sets)]
        self.score = [[0] * cache.ways for _ in range(cache.sets)]
        self.tick = 1
        self.reads = 0

    def read(self, ids):
        sets = self.c._set_of(np.asarray(ids, np.int64)).tolist()
        found = []
        for i, s in zip(ids, sets):
            if i in self.keys[s]:
                w = self.keys[s].index(i)
                self.score[s][w] = self.tick if self.c.policy == "lru" else self.score[s][w] + 1
                found.append(s * self.c.ways + w)
            else:
                found.append(-1)
        self.tick += 1
        self.reads += len(ids)
        if self.reads >= AGING_READS * self.c.capacity:   # aging: lfu scores halve
            self.reads = 0
            if self.c.policy == "lfu":
                self.score = [[v >> 1 for v in row] for row in self.score]
        return found

    def offer(self, ids, freq):
        sets = self.c._set_of(np.asarray(ids, np.int64)).tolist()
        rank: dict[int, int] = {}
        order = {s: sorted(range(self.c.ways), key=lambda w: (
            self.score[s][w] if self.keys[s][w] >= 0 else -1, w)) for s in set(sets)}
        for i, s, f in zip(ids, sets, freq):
            r = rank.get(s, 0)
            rank[s] = r + 1
            if r >= self.c.ways:
                continue
            w = order[s][r]
            if self.c.policy == "lfu" and self.keys[s][w] >= 0 and f < self.score[s][w]:
                continue
            self.keys[s][w] = i
            self.score[s][w] = self.tick if self.c.policy == "lru" else f


@pytest.mark.parametrize("policy", POLICIES)
def test_eviction_decisions_equal_the_reference_model(policy):
    rng = np.random.default_rng(5)
    cache = RowCache(num_partitions=4, dim=3, dtype=torch.float32, capacity=64, ways=4,
                     policy=policy)
    ref = ReferenceCache(cache)
    hot = rng.permutation(600)
    for b in range(60):                    # 60 batches of up to 40 ids: 2400 reads < aging
        ids = np.unique(hot[np.minimum(rng.zipf(1.3, 40), 600) - 1])
        ids = rng.permutation(ids)         # order within a batch matters for the ranks
        got = cache.find(ids)
        assert got.tolist() == ref.read(ids.tolist()), f"batch {b}: find"
        miss = ids[got < 0]
        freq = cache.frequency(miss)
        rows = torch.from_numpy(np.repeat(miss[:, None], 3, 1).astype(np.float32))
        cache.insert(miss, rows)
        ref.offer(miss.tolist(), freq.tolist())
        assert cache.keys.tolist() == ref.keys, f"batch {b}: keys"
        assert cache.score.tolist() == ref.score, f"batch {b}: scores"
    held = cache.keys >= 0
    assert held.sum() > 40                            # the sets did fill up
    # Every cached slot holds its own id's row.
    slots = np.flatnonzero(held.reshape(-1))
    np.testing.assert_array_equal(cache.rows[torch.from_numpy(slots), 0].numpy(),
                                  cache.keys.reshape(-1)[slots].astype(np.float32))
    if policy == "lfu":
        assert cache.counters.rejected > 0            # admission said no to cold ids


def test_writes_go_through_and_changed_partitions_are_not_admitted_from_older_reads():
    P = 4
    cache = RowCache(num_partitions=P, dim=2, dtype=torch.float32, capacity=256, ways=8)
    ids = np.arange(12, dtype=np.int64)
    parts = ids % P
    cache.find(ids)
    assert cache.insert(ids, torch.zeros(12, 2)) == 12
    # A write through the cache replaces the cached rows and moves the generations on.
    before = cache.generation.copy()
    assert cache.update(ids[:3], torch.ones(3, 2), parts[:3]) == 3
    assert (cache.generation[parts[:3]] == before[parts[:3]] + 1).all()
    slots = cache.find(ids[:3])
    np.testing.assert_array_equal(cache.rows[torch.from_numpy(slots)].numpy(), np.ones((3, 2)))
    # A read that began before a write to its partition does not admit what it read.
    new = np.array([100, 101, 102], dtype=np.int64)          # partitions 0, 1, 2
    since = cache.generation[new % P].copy()
    cache.find(new)
    cache.update(np.array([4], np.int64), torch.full((1, 2), 5.0), np.array([0]))
    assert cache.insert(new, torch.full((3, 2), 9.0), new % P, since) == 2
    assert cache.counters.stale == 1
    assert cache.find(new).tolist()[0] == -1 and min(cache.find(new)[1:]) >= 0
    # A dropped partition forgets its rows.
    assert cache.drop_partitions([1]) == int((np.r_[ids, new[1:]] % P == 1).sum())
    assert (cache.find(ids[ids % P == 1]) == -1).all()
    assert (cache.find(ids[ids % P == 2]) >= 0).all()


def test_no_capacity_caches_nothing():
    cache = RowCache(num_partitions=2, dim=4, dtype=torch.float16, capacity=0)
    ids = np.arange(10, dtype=np.int64)
    assert (cache.find(ids) == -1).all()
    assert cache.insert(ids, torch.zeros(10, 4, dtype=torch.float16)) == 0
    assert cache.update(ids, torch.zeros(10, 4, dtype=torch.float16), ids % 2) == 0
    assert cache.counters.misses == 10 and cache.capacity == 0


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="policy: 'mru' is not one of lfu, lru"):
        RowCache(2, 4, torch.float32, 16, policy="mru")


@pytest.mark.parametrize("policy,floor", [("lfu", 0.82), ("lru", 0.79)])
def test_hit_rate_on_zipf_traffic_is_near_an_ideal_cache(policy, floor):
    """Zipf(1.05) over 100k rows, a cache of 1/8 of them, batches of 2048 reads deduplicated
    as the router sends them: the share of reads served from the cache over the second half
    (an ideal cache holding the 1/8 hottest rows serves 0.867; measured lfu 0.841, lru
    0.808)."""
    rows = 100_000
    p = np.arange(1, rows + 1, dtype=np.float64) ** -1.05
    rng = np.random.default_rng(0)
    stream = rng.permutation(rows)[rng.choice(rows, size=1_200_000, p=p / p.sum())]
    cache = RowCache(8, 4, torch.float32, rows // 8, policy=policy)
    hit = total = 0
    for b in range(0, len(stream), 2048):
        ids, inverse = np.unique(stream[b:b + 2048], return_inverse=True)
        slots = cache.find(ids)
        if b >= len(stream) // 2:
            hit += int((slots[inverse] >= 0).sum())
            total += len(inverse)
        miss = ids[slots < 0]
        cache.insert(miss, torch.zeros(len(miss), 4))
    assert hit / total > floor, (policy, hit / total)


def test_hottest_lists_cached_ids_by_score_and_scores_travel_with_a_warm_insert():
    """``hottest``: the cached ids, highest score first, limited, and of given partitions only.
    ``insert(scores=)``: warm rows take their given scores, and admission against a full set
    compares those scores with the victims' (not the sketch, which has never seen them)."""
    c = RowCache(num_partitions=4, dim=2, dtype=torch.float32, capacity=4, ways=4)  # one set
    ids = np.array([8, 5, 2, 7], np.int64)
    assert c.insert(ids, torch.arange(8.0).view(4, 2)) == 4
    for reads in ([8, 5, 2], [8, 5], [8]):                 # scores: 8 -> 3, 5 -> 2, 2 -> 1, 7 -> 0
        assert (c.find(np.array(reads, np.int64)) >= 0).all()
    got, scores = c.hottest(10)
    assert got.tolist() == [8, 5, 2, 7] and scores.tolist() == [3, 2, 1, 0]
    assert c.hottest(2)[0].tolist() == [8, 5]
    assert c.hottest(10, partitions=[1, 3])[0].tolist() == [5, 7]   # partition = id % 4
    # A warm insert into the full set: 11 (score 5) evicts 7 (score 0); 13 (score 0) is not
    # admitted over 2 (score 1); the sketch alone would have admitted neither.
    assert c.insert(np.array([11, 13], np.int64), torch.ones(2, 2),
                    scores=np.array([5, 0], np.int32)) == 1
    got, scores = c.hottest(10)
    assert got.tolist() == [11, 8, 5, 2] and scores.tolist() == [5, 3, 2, 1]
    np.testing.assert_array_equal(c.rows[c.find(np.array([11], np.int64))].numpy(), [[1, 1]])


def test_a_resized_cache_keeps_the_hottest_rows_with_their_scores():
    """``carry_to``: a table's cache replaced by one of another size (its share of the budget
    changed) starts with the old one's hottest rows, their rows and scores unchanged."""
    old = RowCache(num_partitions=4, dim=2, dtype=torch.float32, capacity=8, ways=8)
    ids = np.arange(10, 18, dtype=np.int64)
    assert old.insert(ids, torch.arange(16.0).view(8, 2)) == 8
    for k in range(8):                                   # id 10 + k read k times
        if k:
            assert (old.find(ids[8 - k:]) >= 0).all()
    new = RowCache(num_partitions=4, dim=2, dtype=torch.float32, capacity=4, ways=4)
    assert old.carry_to(new) == 4
    got, scores = new.hottest(10)
    assert got.tolist() == [17, 16, 15, 14] and scores.tolist() == [7, 6, 5, 4]
    rows = new.rows[torch.from_numpy(new.find(got))]
    np.testing.assert_array_equal(rows.numpy(), np.arange(16.0).reshape(8, 2)[[7, 6, 5, 4]])


def test_cold_reads_fan_out_only_while_single_multi_gets_are_disk_slow():
    from shards.reads import CHUNK_KEYS, PROBE_EVERY, SLOW_US_PER_KEY, ReadFanout
    f = ReadFanout(8, alpha=0.5)
    assert f.chunks(4096) == 1                      # nothing measured: one multi-get
    f.observe(1000, 1, 1000 * 8e-6)                 # page-cache speed: 8 us a key
    assert f.us_per_key == pytest.approx(8.0) and f.chunks(4096) == 1
    for _ in range(6):                              # the disk: 90 us a key
        f.observe(1000, 1, 1000 * 90e-6)
    assert f.fanned and f.us_per_key > SLOW_US_PER_KEY
    assert f.chunks(4096) == 8 and f.chunks(3 * CHUNK_KEYS) == 3 and f.chunks(CHUNK_KEYS) == 1
    before = f.us_per_key
    f.observe(1000, 8, 1000 * 200e-6)               # fanned-out reads do not move the average
    f.observe(10, 1, 10 * 200e-6)                   # nor do reads too small to time well
    assert f.us_per_key == before
    got = [f.chunks(4096) for _ in range(2 * PROBE_EVERY)]
    assert got.count(1) == 2 and got.count(8) == 2 * PROBE_EVERY - 2   # the probes
    for _ in range(6):                              # the probes find the page cache again
        f.observe(1000, 1, 1000 * 6e-6)
    assert not f.fanned and f.chunks(4096) == 1
