"""The pooled lookup path, top to bottom: merge → route → fan out → gather → pool → split.

``pooled_lookup`` takes validated queries (possibly several clients' requests merged by the
batcher) and returns one ``[batch_size, sum(dims)]`` float32 array per query. Partial sums from
different servers add up, so any split of a table's occurrences across servers (and any retry of
a part of them on another replica) gives the same answer.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from embeddings.partition import partition_of
from shoal.errors import InvalidArgument, ShoalError, StaleMap, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.wire import WithTensor, pack

from router.hedging import Hedger
from router.mapcache import MapCache
from router.routing import KeyPlan, ModelRoute, TableRoute, routed
from router.rowcache import RowCache, cached_fan_out
from router.transport import RETRYABLE, ShardTransport  # noqa: F401 (re-exported)

MAX_ATTEMPTS = 8        # rounds of a request that end with a server failing
MAX_REDIRECTS = 32      # rounds that end with a redirect to a newer map (each is progress; a
                        # map changes many times in a row while replicas are being rebuilt)
PROBE_EVERY = 127        # every 127th batch reads slow servers too, to notice when they recover
                         # (odd and prime: with a batch's preferred server taken in turn, the
                         # probe turns fall on each server in turn; 128 probed only one of 2)


@dataclass
class Query:
    """One validated client request."""
    model: ModelRoute
    keys: list[str]
    values: np.ndarray           # int32 or int64 ids, all keys concatenated
    lengths: np.ndarray          # int64 [len(keys) * batch_size]
    weights: np.ndarray | None   # float32 [len(values)]
    batch_size: int
    arrived: float = 0.0         # perf_counter when the router parsed it
    timings: dict = None         # seconds per stage, once answered (LOOKUP_STAGES)
    plan: KeyPlan = None         # model.plan(keys), when parsed
    per_key: np.ndarray = None   # ids per key

    def __post_init__(self):
        if self.plan is None:
            self.plan = self.model.plan(tuple(self.keys))
        if self.per_key is None:
            self.per_key = self.lengths.reshape(len(self.keys), self.batch_size).sum(axis=1) \
                if self.keys else np.zeros(0, np.int64)

    @property
    def num_ids(self) -> int:
        return len(self.values)


@dataclass
class TableWork:
    """One table's bags over a merged batch, and their running partial sums."""
    name: str
    ids: np.ndarray              # int32 or int64
    lengths: np.ndarray          # per bag
    weights: np.ndarray | None
    sums: np.ndarray | None = None
    _bags: np.ndarray | None = None

    def bags(self) -> np.ndarray:
        """The bag of each occurrence (only needed when a table's ids are split by server)."""
        if self._bags is None:
            self._bags = np.repeat(np.arange(len(self.lengths), dtype=np.int64), self.lengths)
        return self._bags


@dataclass
class Stats:
    batches: int = 0
    redirects: int = 0
    replica_retries: int = 0
    rotation: itertools.count = field(default_factory=itertools.count)


async def pooled_lookup(queries: list[Query], maps: MapCache, transport: ShardTransport,
                        timeout: float, dedup: bool, stats: Stats,
                        hedger: Hedger, cache: RowCache | None = None,
                        columns: tuple[str, ...] | None = None) -> list[np.ndarray]:
    """``cache`` (enabled): rows are fetched (misses) or taken from the router's row cache
    (hits the servers confirm) and pooled here, instead of pooled on the servers.
    ``columns`` (every query's keys, in some order): the output is one array of all the
    queries' rows, in query order, with the keys' embeddings in that order (a list of one;
    predict's dense part takes it as is). Where each key reads a table of its own, the
    tables' sums are added straight into their columns of it: no concatenation, no
    reordering copy; else each query's are taken in that order and joined."""
    t0 = time.perf_counter()
    model = queries[0].model
    works, slots = merge(queries)
    plan = queries[0].plan
    whole = None
    if columns is not None and plan.distinct_tables and all(q.plan is plan for q in queries):
        whole = _column_views(plan, columns, works, model)
    else:
        for w in works.values():
            w.sums = np.zeros((len(w.lengths), model.tables[w.name].spec.dim),
                              dtype=np.float32)
    for _ in queries:
        hedger.budget.deposit()
    t1 = time.perf_counter()
    clock = {"fan_out": 0.0, "combine": 0.0}
    if cache is not None and cache.enabled:
        await cached_fan_out(model, list(works.values()), cache, maps, transport, timeout,
                             stats)
    else:
        await fan_out(model.name, list(works.values()), maps, transport, timeout, dedup, stats,
                      hedger, model.version, clock)
    t2 = time.perf_counter()
    for w in works.values():
        if model.tables[w.name].spec.pooling == "mean":
            w.sums /= np.maximum(w.lengths, 1).astype(np.float32)[:, None]
    stats.batches += 1
    if whole is not None:
        out = [whole]
    else:
        if columns is not None:
            _check_columns(plan, columns)
        out = [split(q, works, slots[i], columns) for i, q in enumerate(queries)]
        if columns is not None:
            out = [np.concatenate(out) if len(out) > 1 else out[0]]
    t3 = time.perf_counter()
    for q in queries:
        q.timings = {"batching": t0 - q.arrived if q.arrived else 0.0, "merge": t1 - t0,
                     "fan_out": clock["fan_out"], "combine": clock["combine"],
                     "servers": max(0.0, t2 - t1 - clock["fan_out"] - clock["combine"]),
                     "pool_split": t3 - t2, "batch_requests": len(queries)}
    return out


def _column_views(plan, columns, works: dict[str, TableWork], model) -> np.ndarray:
    """One zeroed array [rows, sum of dims], its columns in ``columns`` order; each table's
    work sums into its key's columns of it (a view: each table holds one key's bags, every
    query's in turn)."""
    _check_columns(plan, columns)
    table_of = dict(zip(plan.keys, plan.tables))
    dims = [model.tables[table_of[k]].spec.dim for k in columns]
    rows = len(works[table_of[columns[0]]].lengths) if columns else 0
    out = np.zeros((rows, sum(dims)), dtype=np.float32)
    at = 0
    for k, d in zip(columns, dims):
        works[table_of[k]].sums = out[:, at:at + d]
        at += d
    return out


def _check_columns(plan: KeyPlan, columns) -> None:
    if sorted(columns) != sorted(plan.keys):
        raise InvalidArgument(f"keys: {list(plan.keys)} are not the features {list(columns)}")


def merge(queries: list[Query]):
    """Concatenate every query's bags per table. Returns the works and, per query, where each
    of its keys' bags start inside its table's work."""
    plan = queries[0].plan
    if plan.distinct_tables and len(queries) > 1 and plan.keys and \
            all(q.plan is plan and q.weights is None for q in queries):
        return _merge_alike(queries, plan)
    parts: dict[str, dict[str, list]] = {}
    slots: list[dict[str, int]] = []
    for q in queries:
        offsets = np.zeros(len(q.keys) + 1, dtype=np.int64)
        np.cumsum(q.per_key, out=offsets[1:])
        offsets = offsets.tolist()
        B = q.batch_size
        slot = {}
        for i, (key, table) in enumerate(zip(q.keys, q.plan.tables)):
            acc = parts.get(table)
            if acc is None:
                acc = parts[table] = {"ids": [], "lengths": [], "weights": [], "bags": 0}
            slot[key] = acc["bags"]
            lo, hi = offsets[i], offsets[i + 1]
            acc["ids"].append(q.values[lo:hi])
            acc["lengths"].append(q.lengths[i * B:(i + 1) * B])
            acc["weights"].append(q.weights[lo:hi] if q.weights is not None else None)
            acc["bags"] += B
        slots.append(slot)
    works = {}
    for table, acc in parts.items():
        weights = None
        if any(w is not None for w in acc["weights"]):
            weights = np.concatenate([w if w is not None else np.ones(len(i), np.float32)
                                      for w, i in zip(acc["weights"], acc["ids"])])
        one = len(acc["ids"]) == 1
        works[table] = TableWork(table, acc["ids"][0] if one else np.concatenate(acc["ids"]),
                                 acc["lengths"][0] if one else np.concatenate(acc["lengths"]),
                                 weights)
    return works, slots


def _merge_alike(queries: list[Query], plan: KeyPlan):
    """``merge`` for queries with the same keys, each reading its own table, unweighted (a
    predict batch): a few array operations for the whole batch, not a slice per query and
    key. Table k's ids are key k's ids of every query in turn."""
    K = len(plan.keys)
    per_key = np.stack([q.per_key for q in queries])                  # [Q, K]
    q_start = np.zeros(len(queries), dtype=np.int64)
    np.cumsum([len(q.values) for q in queries][:-1], out=q_start[1:])
    key_start = np.zeros_like(per_key)
    np.cumsum(per_key[:, :-1], axis=1, out=key_start[:, 1:])
    starts = (q_start[:, None] + key_start).T.reshape(-1)              # key-major
    counts = per_key.T.reshape(-1)
    before = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=before[1:])
    values = np.concatenate([q.values for q in queries])
    ids = values[np.repeat(starts - before, counts) + np.arange(int(counts.sum()))]
    lengths = np.concatenate([q.lengths.reshape(K, q.batch_size) for q in queries], axis=1)
    ends = np.cumsum(per_key.sum(axis=0)).tolist()
    works, lo = {}, 0
    for k, table in enumerate(plan.tables):
        works[table] = TableWork(table, ids[lo:ends[k]], lengths[k], None)
        lo = ends[k]
    slots, at = [], 0
    for q in queries:
        slots.append(dict.fromkeys(plan.keys, at))
        at += q.batch_size
    return works, slots


async def fan_out(model_name: str, works: list[TableWork], maps: MapCache,
                  transport: ShardTransport, timeout: float, dedup: bool, stats: Stats,
                  hedger: Hedger, version: int, clock: dict | None = None) -> None:
    """Send each server one RPC with every table's occurrences it holds; add the partial sums.
    ``clock`` (if given) adds up the seconds spent routing and encoding requests, dedup
    included (``fan_out``), and adding partial sums (``combine``); the rest is the wait.
    A redirected part is re-routed on a refreshed map; a part whose server failed is re-routed
    to another replica (within the retry budget); a part whose server is slower than its recent
    p95 is hedged to another replica and the first answer wins."""
    pending = [(w, None) for w in works]     # (work, occurrence indices or None for all)
    exclude: set[int] = set()
    last_redirect = ""
    failed_rounds = redirected_rounds = 0
    for attempt in itertools.count():
        if failed_rounds >= MAX_ATTEMPTS or redirected_rounds >= MAX_REDIRECTS:
            break
        table = maps.current()
        model = table.model(model_name, version)     # pinned: sums never mix versions
        rotation = next(stats.rotation)
        t_route = time.perf_counter()
        per_server = route(pending, model, rotation, frozenset(exclude),
                           avoid=hedger.slow(probe=rotation % PROBE_EVERY == 0))
        if clock is not None:
            clock["fan_out"] += time.perf_counter() - t_route

        async def send(s: int, items):
            t0 = time.perf_counter()
            req = pb.LookupPooledRequest(map_version=table.version, concat_sums=True, segments=[
                segment(model.tables[w.name], w, occ, dedup, s) for w, occ in items])
            if clock is not None:
                clock["fan_out"] += time.perf_counter() - t0
            try:
                reply = await transport.lookup_pooled(table.addresses[s], req, timeout)
            except ShoalError as e:
                return [(s, items, e)]
            hedger.tracker.observe(s, time.perf_counter() - t0)
            return [(s, items, reply)]

        async def send_hedged(s: int, items):
            delay = hedger.delay(s)
            if delay is None:
                return await send(s, items)
            primary = asyncio.ensure_future(send(s, items))
            done, _ = await asyncio.wait({primary}, timeout=delay)
            if done or not hedger.budget.withdraw():
                return await primary
            try:
                alt = route(items, model, rotation + 1, frozenset(exclude | {s}))
            except Unavailable:              # no other replica holds all of it
                return await primary
            hedger.hedges += 1
            hedge = asyncio.ensure_future(asyncio.gather(*(send(a, it) for a, it in alt.items())))
            done, _ = await asyncio.wait({primary, hedge}, return_when=asyncio.FIRST_COMPLETED)
            first = hedge if hedge in done else primary
            other = primary if first is hedge else hedge
            outcome = [x for group in first.result() for x in group] if first is hedge \
                else first.result()
            if all(not isinstance(r, ShoalError) for _, _, r in outcome):
                if first is hedge:
                    # The primary is left to finish (its reply unused) so the tracker learns its
                    # real latency and routing can avoid a server that stays slow.
                    hedger.hedge_wins += 1
                else:
                    other.cancel()
                    other.add_done_callback(_retrieve)
                return outcome
            rest = await other                  # the first failed: take the other's answer
            return [x for group in rest for x in group] if other is hedge else rest

        outcomes = await asyncio.gather(*(send_hedged(s, items)
                                          for s, items in per_server.items()))
        pending = []
        failed = False
        t_combine = time.perf_counter()
        for s, items, reply in (x for outcome in outcomes for x in outcome):
            if isinstance(reply, StaleMap):
                stats.redirects += 1
                last_redirect = reply.message
                await maps.refresh_async(at_least=reply.map_version)
                pending += items
                continue
            if isinstance(reply, ShoalError) and reply.code in RETRYABLE:
                # The first retry after a failure is free, as in the first round: a request
                # redirected first (a map change) and then meeting a dead server is no more a
                # repeated retry than one that met the dead server at once.
                if failed_rounds and not hedger.budget.withdraw():
                    raise Unavailable(f"lookup on model {model_name!r}: server "
                                      f"{table.server_ids[s]} failed ({reply.message}) and the "
                                      "retry budget is spent")
                stats.replica_retries += 1
                exclude.add(s)
                pending += items
                failed = True
                continue
            if isinstance(reply, ShoalError):
                raise reply
            add_sums(items, reply)
        if clock is not None:
            clock["combine"] += time.perf_counter() - t_combine
        if not pending:
            return
        failed_rounds += failed
        redirected_rounds += not failed
    raise Unavailable(f"lookup on model {model_name!r}: no replica answered after "
                      f"{failed_rounds} rounds with failures and {redirected_rounds} "
                      f"redirects (servers that failed: "
                      f"{sorted(maps.current().server_ids[s] for s in exclude)}; last "
                      f"redirect: {last_redirect or 'none'})")


def add_sums(items, reply) -> None:
    """Add a server's partial sums into the works: one tensor of every segment's
    (``all_sums``, read in place) or a tensor per segment."""
    if isinstance(reply, WithTensor) and reply.given:
        flat = reply.tensor("all_sums", "float32", 1)
        need = sum(w.sums.size for w, _ in items)
        if flat.size != need:
            raise ShoalError(grpc.StatusCode.INTERNAL, f"all_sums: {flat.size} values from a "
                             f"server for {need} expected")
        at = 0
        for w, _ in items:
            np.add(w.sums, flat[at:at + w.sums.size].reshape(w.sums.shape), out=w.sums)
            at += w.sums.size
        return
    for (w, _), sums in zip(items, reply.sums):
        np.add(w.sums, np.frombuffer(sums.data, np.float32).reshape(w.sums.shape), out=w.sums)


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a cancelled fan-out's outcome as seen (no 'exception was never retrieved')."""
    if not fut.cancelled():
        fut.exception()


def route(pending, model: ModelRoute, rotation: int, exclude: frozenset[int],
          avoid: frozenset[int] = frozenset()):
    """Group occurrences by the server chosen for their partition. A table whose occurrences
    all go to one server (the common case: see ``TableRoute.choose``) is sent whole. Servers in
    ``avoid`` (slow ones) are skipped for partitions that have another replica."""
    per_server: dict[int, list] = {}
    for w, occ in pending:
        tr = model.tables[w.name]
        choice = tr.choose(rotation, exclude)
        if avoid:
            fallback = tr.choose(rotation, exclude | avoid)
            choice = np.where(fallback >= 0, fallback, choice)
        first = int(choice[0])
        if first >= 0 and (choice == first).all():    # the common case: no per-id work
            per_server.setdefault(first, []).append((w, occ))
            continue
        ids = w.ids if occ is None else w.ids[occ]
        parts = partition_of(ids, tr.spec.num_partitions)
        servers = choice[parts]
        if not servers.size:
            continue
        lo, hi = int(servers.min()), int(servers.max())
        if lo < 0:
            p = int(parts[np.flatnonzero(servers < 0)[0]])
            raise Unavailable(f"partition {p} of table {w.name!r} has no live replica")
        if lo == hi:
            per_server.setdefault(lo, []).append((w, occ))
            continue
        for s in np.flatnonzero(np.bincount(servers)):
            mine = np.flatnonzero(servers == s)
            per_server.setdefault(int(s), []).append((w, mine if occ is None else occ[mine]))
    return per_server


def segment(tr: TableRoute, w: TableWork, occ: np.ndarray | None, dedup: bool,
            server: int) -> pb.PooledSegment:
    """The request part for occurrences ``occ`` (None: all) of one table, to ``server``."""
    if occ is None:
        ids, lengths, weights = w.ids, w.lengths, w.weights
    else:
        ids = w.ids[occ]
        lengths = np.bincount(w.bags()[occ], minlength=len(w.lengths))
        weights = None if w.weights is None else w.weights[occ]
    seg = pb.PooledSegment(table_uid=tr.spec.table_uid, lengths=pack(lengths, "int32"),
                           routed=tr.routed_all() if tr.holds_all(server) else
                           routed(tr, partition_of(ids, tr.spec.num_partitions)))
    if dedup:
        uniq, inverse = np.unique(ids, return_inverse=True)
        seg.ids.CopyFrom(pack(uniq))
        seg.inverse.CopyFrom(pack(inverse, "int32"))
    else:
        seg.ids.CopyFrom(pack(ids, "int32" if tr.spec.num_embeddings < 2**31 else "int64"))
    if weights is not None:
        seg.weights.CopyFrom(pack(weights))
    return seg


def split(q: Query, works: dict[str, TableWork], slot: dict[str, int],
          keys: tuple[str, ...] | None = None) -> np.ndarray:
    """This query's pooled embeddings, features in the model's order (or in ``keys``'s)."""
    plan = q.plan
    if keys is None:
        keys, tables = plan.output_keys, [plan.tables[i] for i in plan.output_index]
    else:
        table_of = dict(zip(plan.keys, plan.tables))
        tables = [table_of[k] for k in keys]
    if not keys:
        return np.empty((q.batch_size, 0), dtype=np.float32)
    return np.concatenate([works[t].sums[slot[k]:slot[k] + q.batch_size]
                           for t, k in zip(tables, keys)], axis=1)


def output_keys(q: Query) -> tuple[list[str], list[int]]:
    return q.plan.output_keys, q.plan.output_dims
