"""A shard server's row cache: the hottest rows of one table in memory, RocksDB behind it.

``capacity`` fixed-size slots of one preallocated arena (``rows``: a tensor of
``[sets * ways, dim]``), set-associative: an id's set is chosen by a hash, and it may sit in any
of the set's ``ways`` slots. Finding, inserting and evicting are a few vectorised numpy steps
per batch of ids; no Python object exists per row and no Python loop runs per id.

Two eviction policies (``POLICIES``), each a score per slot, the lowest score evicted:

- ``lru``: the score is the batch in which the row was last read; every miss is admitted.
- ``lfu`` (the default): the score is how often the row was read, and a miss is admitted only
  if it has been read at least as often as the row it would evict (TinyLFU's admission: how
  often an id was read, cached or not, is kept in a small count sketch). Scores and the sketch
  are halved every ``AGING_READS * capacity`` reads, so yesterday's hot rows age out. On Zipf traffic
  this keeps the rows that stay hot, where LRU lets a burst of one-off ids flush them
  (``bench/tiered.py`` measures both).

Within one batch, a set's candidates (in the order given) take the set's slots from the lowest
score up: candidate ``r`` may replace the ``r``-th lowest slot, if the policy admits it, and at
most ``ways`` candidates per set are considered (``tests/test_rowcache_server.py`` holds a
plain reference model of exactly this and compares every decision).

Coherence is the caller's: rows are written through (``update``) by the write path, and
partitions are dropped (``drop_partitions``) when their copy changes wholesale; ``generation``
counts those changes per partition, so a read that began before one does not admit what it read
(``insert(..., since=)``). Not thread-safe: the owner holds a lock around every call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from embeddings.partition import partition_of
from embeddings.setassoc import GOLDEN, ranked_in_sets, set_of

_SKETCH_SEED = np.uint64(0xC2B2AE3D27D4EB4F)
POLICIES = ("lfu", "lru")
MAX_SCORE = np.iinfo(np.int32).max
CARRY_CHUNK = 16_384        # rows copied per hold of the lock by carry_to
AGING_READS = 10            # lfu scores and the sketch halve every this many reads a slot
                            # (40 and 160 gave the same hit rates)


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    inserted: int = 0
    evicted: int = 0
    rejected: int = 0            # misses the policy did not admit (colder than the victim)
    stale: int = 0               # misses not admitted: their partition changed while read


class RowCache:
    def __init__(self, num_partitions: int, dim: int, dtype: torch.dtype, capacity: int,
                 ways: int = 8, policy: str = "lfu"):
        if policy not in POLICIES:
            raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
        self.num_partitions = num_partitions
        self.policy = policy
        self.ways = max(1, min(ways, capacity)) if capacity > 0 else 1
        self.sets = capacity // self.ways if capacity > 0 else 0
        self.keys = np.full((self.sets, self.ways), -1, dtype=np.int64)
        self.score = np.zeros((self.sets, self.ways), dtype=np.int32)
        self.rows = torch.zeros((self.sets * self.ways, dim), dtype=dtype)
        self.generation = np.zeros(num_partitions, dtype=np.int64)
        # How often ids were read (cached or not), for admission: 8 counters a slot (32 bytes;
        # with 4 the lfu hit rate in tests/test_rowcache_server.py fell from 0.84 to 0.83,
        # with 16 it rose to 0.85).
        self._sketch = np.zeros(max(64, 8 * self.capacity), dtype=np.int32)
        self._tick = 1
        self._reads_since_aging = 0
        self.counters = CacheCounters()

    # ------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int:
        return self.sets * self.ways

    @property
    def nbytes(self) -> int:
        """Memory held: the arena, its keys and scores, and the sketch."""
        return self.rows.numel() * self.rows.element_size() + self.keys.nbytes + \
            self.score.nbytes + self._sketch.nbytes

    @property
    def used(self) -> int:
        return int((self.keys >= 0).sum())

    # ------------------------------------------------------------ reads
    def _set_of(self, ids: np.ndarray) -> np.ndarray:
        return set_of(ids, self.sets)

    def _sketch_index(self, ids: np.ndarray) -> np.ndarray:
        h = (ids.astype(np.uint64) ^ _SKETCH_SEED) * GOLDEN
        return ((h >> np.uint64(31)) % np.uint64(len(self._sketch))).astype(np.int64)

    def _match(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(set, way, cached) of each id; ``way`` is meaningful where ``cached``."""
        s = self._set_of(ids)
        match = self.keys[s] == ids[:, None]
        way = match.argmax(axis=1)
        return s, way, match[np.arange(len(ids)), way]

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id (unique ids), -1 where it is not cached. Counts the read: a hit's
        score rises (policy), and every id's count in the sketch."""
        if not ids.size or not self.sets:
            self.counters.misses += int(ids.size)
            return np.full(ids.size, -1, dtype=np.int64)
        s, way, hit = self._match(ids)
        slot = np.where(hit, s * self.ways + way, -1)
        hs, hw = s[hit], way[hit]
        if self.policy == "lru":
            self.score[hs, hw] = self._tick
        else:
            self.score[hs, hw] = np.minimum(self.score[hs, hw].astype(np.int64) + 1, MAX_SCORE)
        # (np.add.at: 1.0 ms for 10,000 ids here; counting first: 0.1 ms)
        where, count = np.unique(self._sketch_index(ids), return_counts=True)
        self._sketch[where] += count.astype(np.int32)
        self._tick += 1
        n_hit = int(hit.sum())
        self.counters.hits += n_hit
        self.counters.misses += len(ids) - n_hit
        self._reads_since_aging += len(ids)
        if self._reads_since_aging >= AGING_READS * max(1, self.capacity):
            self._age()
        return slot

    def _age(self) -> None:
        self._reads_since_aging = 0
        self._sketch >>= 1
        if self.policy == "lfu":
            self.score >>= 1

    def hottest(self, limit: int, partitions=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of up to ``limit`` cached rows, the highest scores first; only those
        of ``partitions`` if given (a warm start's hot set: ``shards.warm``)."""
        slots = top_slots(self.keys, self.score, limit, self.num_partitions, partitions)
        return self.keys.reshape(-1)[slots], self.score.reshape(-1)[slots]

    def carry_to(self, other: "RowCache", lock=None) -> int:
        """Offer ``other`` (this table's cache resized, not yet in use) this cache's rows,
        hottest first, with their scores; returns how many it took. ``lock`` (this cache's) is
        held only to copy keys and scores, then the chosen rows (a slot refilled meanwhile is
        skipped): the choosing and the inserting run outside it. Writes that land meanwhile are
        the caller's to reconcile (``generation``; ``shards.mapping``)."""
        lock = lock or contextlib.nullcontext()
        with lock:
            keys, score = self.keys.reshape(-1).copy(), self.score.reshape(-1).copy()
        slots = top_slots(keys, score, other.capacity, self.num_partitions)
        taken = 0
        for a in range(0, len(slots), CARRY_CHUNK):       # the lock held ~2 ms at a time
            chunk = slots[a:a + CARRY_CHUNK]
            with lock:
                chunk = chunk[self.keys.reshape(-1)[chunk] == keys[chunk]]
                rows = self.rows[torch.from_numpy(chunk)]
            taken += other.insert(keys[chunk], rows, scores=score[chunk])
        return taken

    def frequency(self, ids: np.ndarray) -> np.ndarray:
        """The sketch's estimate of how often each id was read lately."""
        return self._sketch[self._sketch_index(ids)]

    # ------------------------------------------------------------ admission and writes
    def insert(self, ids: np.ndarray, rows: torch.Tensor, parts: np.ndarray | None = None,
               since: np.ndarray | None = None, scores: np.ndarray | None = None) -> int:
        """Offer unique ``ids`` with their ``rows``; returns how many were cached. Ids cached
        meanwhile (another request's admission) are skipped. ``since``: each id's partition
        generation when its row was read (``parts`` the partitions): rows of partitions changed
        since are not admitted (a write or a drop came after the read). ``scores`` (lfu): the
        ids' scores where another cache kept them (a warm start), in place of the sketch's."""
        if not ids.size or not self.sets:
            return 0
        fresh = ~self._match(ids)[2]
        if since is not None:
            current = self.generation[parts] == since
            self.counters.stale += int((fresh & ~current).sum())
            fresh &= current
        if not fresh.all():
            ids, rows = ids[fresh], rows[torch.from_numpy(np.flatnonzero(fresh))]
            scores = scores[fresh] if scores is not None else None
            if not ids.size:
                return 0
        order, ss, rank = ranked_in_sets(self._set_of(ids), self.ways)
        # Each set's slots from the lowest score up (empty slots first), ties by way.
        held = self.keys[ss] >= 0
        key = np.where(held, self.score[ss].astype(np.int64), -1)
        way = np.argsort(key, axis=1, kind="stable")[np.arange(len(ss)), rank]
        victim_held = held[np.arange(len(ss)), way]
        victim_score = self.score[ss, way]
        if self.policy == "lru":
            admit = np.ones(len(ss), dtype=bool)
            new_score = np.full(len(ss), self._tick, dtype=np.int32)
        else:
            freq = self.frequency(ids[order]) if scores is None else \
                np.asarray(scores, np.int64)[order]
            admit = ~victim_held | (freq >= victim_score)
            new_score = np.minimum(freq, MAX_SCORE).astype(np.int32)
        self.counters.rejected += int((~admit).sum())
        self.counters.evicted += int((admit & victim_held).sum())
        order, ss, way, new_score = order[admit], ss[admit], way[admit], new_score[admit]
        self.keys[ss, way] = ids[order]
        self.score[ss, way] = new_score
        self.rows[torch.from_numpy(ss * self.ways + way)] = rows[torch.from_numpy(order)]
        self.counters.inserted += len(order)
        return len(order)

    def update(self, ids: np.ndarray, rows: torch.Tensor, parts: np.ndarray) -> int:
        """Write-through: the new ``rows`` of (unique) ``ids`` replace the cached ones; their
        partitions' generation moves on. Returns the rows that were cached."""
        if parts.size:
            self.generation[np.unique(parts)] += 1
        if not ids.size or not self.sets:
            return 0
        s, way, cached = self._match(ids)
        hit = np.flatnonzero(cached)
        if hit.size:
            slots = s[hit] * self.ways + way[hit]
            self.rows[torch.from_numpy(slots)] = rows[torch.from_numpy(hit)]
        return int(hit.size)

    def drop_partitions(self, partitions) -> int:
        """Forget every cached row of ``partitions`` (their copy was replaced or left this
        server); returns how many were dropped."""
        mask = np.zeros(self.num_partitions, dtype=bool)
        mask[np.asarray(list(partitions), dtype=np.int64)] = True
        self.generation[mask] += 1
        held = self.keys >= 0
        drop = held & mask[partition_of(np.where(held, self.keys, 0), self.num_partitions)]
        self.keys[drop] = -1
        self.score[drop] = 0
        return int(drop.sum())


def top_slots(keys: np.ndarray, score: np.ndarray, limit: int, num_partitions: int,
              partitions=None) -> np.ndarray:
    """Flat slots of up to ``limit`` cached rows (``keys`` >= 0), the highest ``score`` first;
    only rows of ``partitions`` if given. Pure: works on a copy of a cache's keys and scores
    taken under its lock (``shards.warm.hot_set``) as on the cache itself."""
    keys, score = keys.reshape(-1), score.reshape(-1)
    held = keys >= 0
    if partitions is not None:
        mask = np.zeros(num_partitions, dtype=bool)
        mask[np.asarray(list(partitions), dtype=np.int64)] = True
        held &= mask[partition_of(np.where(held, keys, 0), num_partitions)]
    slots = np.flatnonzero(held)
    if len(slots) > limit:
        slots = slots[np.argpartition(-score[slots], limit - 1)[:limit]] if limit > 0 else \
            slots[:0]
    return slots[np.argsort(-score[slots], kind="stable")]
