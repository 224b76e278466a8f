"""The router's hot-row cache: rows of hot ids kept beside the pooling, off by default.

Each table gets a set-associative LRU cache (``TableCache``): ``ways`` slots per set, an id's
set chosen by a hash, the least recently used slot of a set replaced. Lookups, inserts and
evictions are a few vectorised numpy steps per batch, never a Python loop per id.

Validity rests on each partition's write position, ``(epoch, seq)`` of the last write a
replica applied (``shards.replog``). The cache holds a partition's rows only together with the
position they were read at. Every batch asks the servers for the positions of the partitions
it touches, hits included, along with the rows it misses (one ``LookupRows`` per server, the
same fan-out as without the cache); a partition whose position moved has its cached rows
dropped and the batch's hits in it fetched again. So a query that starts after an update is
acknowledged (every replica has applied it) never answers from a row older than the update,
on this router or any other, and no router has to hear of writes made through another.
A version switch needs nothing more: each version's tables have their own uids, and tables
that leave the shard map leave the cache (``RowCache.retain``).
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from embeddings.partition import partition_of
from embeddings.setassoc import ranked_in_sets, set_of
from shoal.errors import ShoalError, StaleMap, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.wire import pack, unpack

from router.mapcache import MapCache
from router.routing import ModelRoute
from router.transport import RETRYABLE, ShardTransport

MAX_ROUNDS = 8                    # fetch rounds of one batch (failures, redirects, moved rows)


def _torch_dtype(spec) -> torch.dtype:
    return getattr(torch, spec.dtype)


class TableCache:
    """Up to ``capacity`` rows of one table; LRU within sets of ``ways`` slots."""

    def __init__(self, spec, capacity: int, ways: int = 8):
        self.spec = spec
        self.ways = max(1, min(ways, capacity))
        self.sets = max(1, capacity // self.ways)
        self.keys = np.full((self.sets, self.ways), -1, dtype=np.int64)
        self.used = np.zeros((self.sets, self.ways), dtype=np.int64)    # last use; 0 = empty
        self.rows = torch.zeros((self.sets * self.ways, spec.dim), dtype=_torch_dtype(spec))
        P = spec.num_partitions
        self.seq = np.full(P, -1, dtype=np.int64)     # position the cached rows were read at
        self.epoch = np.full(P, -1, dtype=np.int64)
        self._clock = itertools.count(1)

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + self.keys.nbytes * 2

    def _set_of(self, ids: np.ndarray) -> np.ndarray:
        return set_of(ids, self.sets)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each (unique) id, -1 where it is not cached; a hit counts as a use."""
        if not ids.size:
            return np.empty(0, dtype=np.int64)
        s = self._set_of(ids)
        match = self.keys[s] == ids[:, None]
        way = match.argmax(axis=1)
        hit = match[np.arange(len(ids)), way]
        slot = np.where(hit, s * self.ways + way, -1)
        self.used[s[hit], way[hit]] = next(self._clock)
        return slot

    def insert(self, ids: np.ndarray, rows: torch.Tensor) -> None:
        """Cache unique, uncached ``ids`` with ``rows``, each evicting its set's least recently
        used slot; ids past ``ways`` new ones in one set are left out."""
        if not ids.size:
            return
        order, ss, rank = ranked_in_sets(self._set_of(ids), self.ways)
        way = np.argsort(self.used[ss], axis=1, kind="stable")[np.arange(len(ss)), rank]
        self.keys[ss, way] = ids[order]
        self.used[ss, way] = next(self._clock)
        self.rows[torch.from_numpy(ss * self.ways + way)] = rows[torch.from_numpy(order)]

    def revalidate(self, parts: np.ndarray, seqs: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """Record the positions servers reported for ``parts``; drop the rows of partitions whose
        position moved. Returns the partitions dropped."""
        moved = (self.seq[parts] != seqs) | (self.epoch[parts] != epochs)
        if not moved.any():
            return np.empty(0, dtype=np.int64)
        gone = parts[moved]
        self.seq[gone], self.epoch[gone] = seqs[moved], epochs[moved]
        mask = np.zeros(self.spec.num_partitions, dtype=bool)
        mask[gone] = True
        held = self.keys >= 0
        drop = held & mask[partition_of(np.where(held, self.keys, 0), self.spec.num_partitions)]
        self.keys[drop] = -1
        self.used[drop] = 0
        return gone


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    invalidated: int = 0          # partitions whose cached rows were dropped (moved position)


class RowCache:
    """Every table's ``TableCache``, created on first use; ``rows_per_table`` 0 means off."""

    def __init__(self, rows_per_table: int, ways: int = 8):
        self.rows_per_table = rows_per_table
        self.ways = ways
        self.tables: dict[int, TableCache] = {}
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.rows_per_table > 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())

    def table(self, spec) -> TableCache:
        t = self.tables.get(spec.table_uid)
        if t is None:
            cap = min(self.rows_per_table, spec.num_embeddings)
            t = self.tables[spec.table_uid] = TableCache(spec, cap, self.ways)
        return t

    def retain(self, table_uids) -> None:
        """Forget tables no longer in the shard map (a dropped or replaced version)."""
        keep = set(table_uids)
        for uid in [u for u in self.tables if u not in keep]:
            del self.tables[uid]


_FETCH, _CACHED, _SETTLED = 0, 1, 2   # a unique id's row: to fetch, from the cache (its
                                      # partition's position unchecked), known good


@dataclass
class _Need:
    """One table's part of a batch: its unique ids and each one's row, once known."""
    name: str
    cache: TableCache
    uniq: np.ndarray              # int64
    inverse: np.ndarray
    state: np.ndarray             # int8 per unique id: _FETCH, _CACHED or _SETTLED
    rows: torch.Tensor            # [len(uniq), dim]
    seen: np.ndarray              # int64 [len(uniq), 2]: (seq, epoch) a cached row was read at


async def cached_fan_out(model: ModelRoute, works, cache: RowCache, maps: MapCache,
                         transport: ShardTransport, timeout: float, stats) -> None:
    """Add to each work's ``sums`` the pooled rows of its ids: cached rows whose partition's
    position the servers confirm, the rest fetched from one replica per partition; pooled
    here."""
    needs = []
    for w in works:
        spec = model.tables[w.name].spec
        tc = cache.table(spec)
        uniq, inverse = np.unique(w.ids, return_inverse=True)
        uniq = uniq.astype(np.int64, copy=False)
        slot = tc.find(uniq)
        hit = np.flatnonzero(slot >= 0)
        rows = torch.empty((len(uniq), spec.dim), dtype=_torch_dtype(spec))
        if hit.size:      # copied now: inserts later in this batch may evict these slots
            rows[torch.from_numpy(hit)] = tc.rows[torch.from_numpy(slot[hit])]
        cache.stats.hits += len(hit)
        cache.stats.misses += len(uniq) - len(hit)
        parts = partition_of(uniq, spec.num_partitions)
        seen = np.stack([tc.seq[parts], tc.epoch[parts]], axis=1)   # other batches may
        needs.append(_Need(w.name, tc, uniq, inverse,              # relabel meanwhile
                           np.where(slot >= 0, _CACHED, _FETCH).astype(np.int8), rows, seen))
    await _settle(model, needs, cache, maps, transport, timeout, stats)
    for w, n in zip(works, needs):
        offsets = np.zeros(len(w.lengths), dtype=np.int64)
        np.cumsum(w.lengths[:-1], out=offsets[1:])
        weights = None if w.weights is None else torch.from_numpy(w.weights).to(n.rows.dtype)
        pooled = F.embedding_bag(torch.from_numpy(n.inverse.astype(np.int64, copy=False)),
                                 n.rows, torch.from_numpy(offsets), mode="sum",
                                 per_sample_weights=weights)
        w.sums += pooled.float().numpy()


async def _settle(model: ModelRoute, needs: list[_Need], cache: RowCache, maps: MapCache,
                  transport: ShardTransport, timeout: float, stats) -> None:
    """Rounds of one ``LookupRows`` per server until every unique id's row is settled: each
    round fetches the rows still missing and checks the position of every partition with an
    unsettled id; cached rows of a partition that moved are fetched in the next round."""
    exclude: set[int] = set()
    for _ in range(MAX_ROUNDS):
        if all((n.state == _SETTLED).all() for n in needs):
            return                  # (before taking a rotation: each batch takes one, in turn)
        table = maps.current()
        route = table.model(model.name, model.version)
        rotation = next(stats.rotation)
        per_server: dict[int, list] = {}
        for n in needs:
            open_ = np.flatnonzero(n.state != _SETTLED)
            if not open_.size:
                continue
            tr = route.tables[n.name]
            P = tr.spec.num_partitions
            parts = partition_of(n.uniq[open_], P)
            touched = np.flatnonzero(np.bincount(parts, minlength=P))
            choice = tr.choose(rotation, frozenset(exclude))
            servers = choice[touched]
            if servers.min() < 0:
                raise Unavailable(f"partition {int(touched[np.argmin(servers)])} of table "
                                  f"{n.name!r} has no live replica")
            fetching = n.state[open_] == _FETCH
            fetch, fetch_server = open_[fetching], choice[parts[fetching]]
            for s in np.unique(servers):
                per_server.setdefault(int(s), []).append(
                    (n, tr, touched[servers == s].astype(np.int32), fetch[fetch_server == s]))
        if not per_server:
            return

        async def send(s, items):
            req = pb.LookupRowsRequest(map_version=table.version, with_positions=True, segments=[
                pb.RowsSegment(table_uid=tr.spec.table_uid, ids=pack(n.uniq[sel]),
                               routed=pb.PartitionEpochs(partitions=pack(mine),
                                                         epochs=pack(tr.epochs[mine])))
                for n, tr, mine, sel in items])
            try:
                return await transport.lookup_rows(table.addresses[s], req, timeout)
            except ShoalError as e:
                return e

        replies = await asyncio.gather(*(send(s, it) for s, it in per_server.items()))
        for (s, items), reply in zip(per_server.items(), replies):
            if isinstance(reply, StaleMap):
                stats.redirects += 1
                await maps.refresh_async(at_least=reply.map_version)
                continue
            if isinstance(reply, ShoalError):
                if reply.code not in RETRYABLE:
                    raise reply
                stats.replica_retries += 1
                exclude.add(s)
                continue
            for (n, tr, mine, sel), rows, pos in zip(items, reply.rows, reply.positions):
                _apply(n, cache, mine, sel, unpack(rows, "rows", tr.spec.dtype, 2),
                       unpack(pos.seqs, "seqs", "int64", 1),
                       unpack(pos.epochs, "epochs", "int64", 1))
    raise Unavailable(f"lookup on model {model.name!r}: rows not settled after {MAX_ROUNDS} "
                      "rounds (servers failing, redirects or rows being written)")


def _apply(n: _Need, cache: RowCache, mine: np.ndarray, sel: np.ndarray, rows: np.ndarray,
           seqs: np.ndarray, epochs: np.ndarray) -> None:
    """One server's answer for one table: the positions of partitions ``mine`` first (a moved
    one drops its cached rows, and this batch's hits in it go back to be fetched), then the
    fetched rows of ``sel`` settle and enter the cache at the positions they were read at."""
    P = n.cache.spec.num_partitions
    cache.stats.invalidated += len(n.cache.revalidate(mine.astype(np.int64), seqs, epochs))
    at = np.full((P, 2), -2, dtype=np.int64)          # -2: not checked by this answer
    at[mine, 0], at[mine, 1] = seqs, epochs
    parts = partition_of(n.uniq, P)
    cached = (n.state == _CACHED) & (at[parts, 0] != -2)
    good = cached & (at[parts] == n.seen).all(axis=1)
    n.state[good] = _SETTLED
    n.state[cached & ~good] = _FETCH                   # read before the partition moved
    got = torch.from_numpy(rows.copy()).view(n.rows.dtype)
    n.rows[torch.from_numpy(sel)] = got
    n.state[sel] = _SETTLED
    n.cache.insert(n.uniq[sel], got)
