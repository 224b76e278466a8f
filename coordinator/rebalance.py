"""The rebalancer: a pure function from (cluster, models, load) to a plan of partition moves.

No server is contacted here; tests run it on synthetic clusters. A move copies one replica of
one partition from ``source`` to ``target`` (the target is built as a learner, promoted, then the
source is dropped), so a plan changes where data lives, never what a query returns.

The plan moves as few partitions as it can: first every replica on a draining server (those
must go), then, while the active servers with the most and the fewest bytes differ by more than
the tolerance, the one partition whose move between them narrows the gap the most (or a swap,
when no single move does); then the same for each model's bytes (so every model is spread over
the servers and one model's hot traffic does not land on one of them); then, when lookup load
per partition is known, for load; those last two only by moves and swaps that keep bytes
within the tolerance. Replicas of a partition stay on
distinct servers, no server is planned past its capacity (the bytes it may hold on disk:
memory is only a cache of the hottest rows), no model past its quota.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from shoal.errors import ShoalError

Key = tuple[int, int]            # (table_uid, partition)


@dataclass(frozen=True)
class ServerSpec:
    server_id: str
    capacity_bytes: int = 0          # bytes it may hold on disk; 0: unlimited
    draining: bool = False           # must end up holding nothing
    domain: str = ""                 # failure domain; "": the server alone


@dataclass(frozen=True)
class Move:
    table_uid: int
    partition: int
    source: str
    target: str
    bytes: int

    @property
    def key(self) -> Key:
        return (self.table_uid, self.partition)


@dataclass
class Plan:
    moves: list[Move] = field(default_factory=list)
    before: dict[str, int] = field(default_factory=dict)     # bytes per active server
    after: dict[str, int] = field(default_factory=dict)

    @property
    def moved_bytes(self) -> int:
        return sum(m.bytes for m in self.moves)

    def spread(self, which: str = "after") -> float:
        """(max - min) / mean bytes over the active servers."""
        b = list(getattr(self, which).values())
        mean = sum(b) / len(b) if b else 0
        return (max(b) - min(b)) / mean if mean else 0.0


def plan_moves(replicas: dict[Key, tuple[str, ...]], sizes: dict[Key, int],
               servers: list[ServerSpec], load: dict[Key, float] | None = None,
               tolerance: float = 0.05, quota_of: dict[Key, str] | None = None,
               quotas: dict[str, int] | None = None) -> Plan:
    """Moves that empty the draining servers and even out the active ones.

    ``replicas``: each partition's replica set; ``sizes``: its bytes; ``load``: its lookup load
    (any unit), optional. ``tolerance``: stop once the most and least loaded active servers are
    within this fraction of the mean (or no single move narrows the gap). ``quota_of`` /
    ``quotas``: a partition's model and each model's bytes per server at most, optional.
    Raises FAILED_PRECONDITION, with the numbers, when the data cannot fit."""
    active = [s for s in servers if not s.draining]
    if not active:
        raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                         "no server would be left to hold data: every server is draining")
    budget = {s.server_id: s.capacity_bytes or float("inf") for s in servers}
    held: dict[str, set[Key]] = {s.server_id: set() for s in servers}
    bytes_on = {s.server_id: 0 for s in servers}
    for key, reps in replicas.items():
        for r in reps:
            if r in held:
                held[r].add(key)
                bytes_on[r] += sizes[key]
    total = sum(sizes[k] * sum(r in held for r in reps) for k, reps in replicas.items())
    room = sum(budget[s.server_id] for s in active)
    if total > room:
        raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"the cluster holds {_mib(total)} of replicas but the "
                         f"{len(active)} servers that would remain have a disk capacity of "
                         f"{_mib(room)} together; add servers or give them more disk "
                         "(server.disk_capacity_bytes)")
    load = load or {}
    load_on = {s: sum(load.get(k, 0.0) for k in held[s]) for s in held}
    model_bytes: dict[tuple[str, str], int] = {}
    if quota_of:
        for s, keys in held.items():
            for k in keys:
                m = (s, quota_of[k])
                model_bytes[m] = model_bytes.get(m, 0) + sizes[k]

    domain = {s.server_id: s.domain or s.server_id for s in servers}

    def apart(k: Key, t: str, src: str) -> bool:
        """Moving k's replica from ``src`` to ``t`` puts no two of its replicas in one failure
        domain that were not already sharing one."""
        others = {domain.get(r, r) for r in owner[k] if r != src}
        return domain[t] not in others or domain[src] in others

    def fits(k: Key, t: str, src: str) -> bool:
        if k in held[t] or bytes_on[t] + sizes[k] > budget[t] or not apart(k, t, src):
            return False
        if quota_of and quotas and quota_of[k] in quotas:
            return model_bytes.get((t, quota_of[k]), 0) + sizes[k] <= quotas[quota_of[k]]
        return True

    def fits_swap(k: Key, t: str, leaving: Key, src: str) -> bool:
        """``k`` (from ``src``) fits on ``t`` once ``leaving`` has left it."""
        if k in held[t] or bytes_on[t] - sizes[leaving] + sizes[k] > budget[t] or \
                not apart(k, t, src):
            return False
        if quota_of and quotas and quota_of[k] in quotas:
            freed = sizes[leaving] if quota_of[leaving] == quota_of[k] else 0
            return model_bytes.get((t, quota_of[k]), 0) - freed + sizes[k] \
                <= quotas[quota_of[k]]
        return True

    plan = Plan(before={s.server_id: bytes_on[s.server_id] for s in active})
    owner: dict[Key, list[str]] = {k: list(r) for k, r in replicas.items()}

    moved: set[Key] = set()      # a partition moves at most once per plan (one replica)

    def move(k: Key, src: str, dst: str) -> None:
        plan.moves.append(Move(k[0], k[1], src, dst, sizes[k]))
        moved.add(k)
        held[src].discard(k)
        held[dst].add(k)
        bytes_on[src] -= sizes[k]
        bytes_on[dst] += sizes[k]
        load_on[src] -= load.get(k, 0.0)
        load_on[dst] += load.get(k, 0.0)
        if quota_of:
            model_bytes[(src, quota_of[k])] -= sizes[k]
            model_bytes[(dst, quota_of[k])] = model_bytes.get((dst, quota_of[k]), 0) + sizes[k]
        owner[k] = [dst if r == src else r for r in owner[k]]

    # 1. Empty the draining servers, largest partitions first, each to the active server
    #    with the fewest bytes that can take it. (Two replicas of one partition on draining
    #    servers would need two moves of it; the second waits for the next plan.)
    for s in (s.server_id for s in servers if s.draining):
        for k in sorted(held[s] - moved, key=lambda k: (-sizes[k], k)):
            options = [t.server_id for t in active if fits(k, t.server_id, s)]
            if not options:
                raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"partition {k[1]} of table_uid {k[0]} ({_mib(sizes[k])}) on "
                                 f"draining server {s} fits on no other server: each either "
                                 "holds a replica of it already or lacks the memory budget")
            move(k, s, min(options, key=lambda t: (bytes_on[t], load_on[t], t)))
    ids = [s.server_id for s in active]

    def spread(metric: dict, changes: dict) -> float:
        vals = [metric[s] + changes.get(s, 0) for s in ids]
        mean = sum(vals) / len(vals)
        return (max(vals) - min(vals)) / mean if mean else 0.0

    def balance(metric: dict, of: dict, guard) -> None:
        """Narrow the gap in ``metric`` between the most and least loaded active servers, a
        move (or a swap, when no move helps) at a time, while ``guard(changes)`` allows it."""
        for _ in range(sum(len(v) for v in held.values()) + 1):
            hi = max(ids, key=lambda s: (metric[s], s))
            lo = min(ids, key=lambda s: (metric[s], s))
            gap = metric[hi] - metric[lo]
            if spread(metric, {}) <= tolerance:
                return
            best, best_gap = None, gap
            for k in sorted(held[hi] - moved):
                d = of(k)
                if fits(k, lo, hi) and abs(gap - 2 * d) < best_gap - 1e-12 and \
                        guard({hi: -sizes[k], lo: sizes[k]}):
                    best, best_gap = (k, None), abs(gap - 2 * d)
            if best is None:
                for k in sorted(held[hi] - moved):
                    for j in sorted(held[lo] - moved):
                        d = of(k) - of(j)
                        if k in held[lo] or j in held[hi] or \
                                abs(gap - 2 * d) >= best_gap - 1e-12 or \
                                not (fits_swap(k, lo, j, hi) and fits_swap(j, hi, k, lo)):
                            continue
                        b = sizes[k] - sizes[j]
                        if guard({hi: -b, lo: b}):
                            best, best_gap = (k, j), abs(gap - 2 * d)
            if best is None:
                return
            move(best[0], hi, lo)
            if best[1] is not None:
                move(best[1], lo, hi)

    # 2. Even out bytes; 3. then each model's bytes, so no model sits mostly on one server;
    # 4. then lookup load; 3 and 4 without pushing bytes out of the tolerance.
    balance(bytes_on, lambda k: sizes[k], lambda changes: True)
    limit = max(tolerance, spread(bytes_on, {}))

    def keeps_bytes(changes: dict) -> bool:
        return spread(bytes_on, changes) <= limit + 1e-12

    for m in sorted(set(quota_of.values())) if quota_of else ():
        balance(_ModelBytes(model_bytes, m), lambda k: sizes[k] if quota_of[k] == m else 0,
                keeps_bytes)
    if load:
        balance(load_on, lambda k: load.get(k, 0.0), keeps_bytes)
    plan.after = {s: bytes_on[s] for s in ids}
    return plan


class _ModelBytes:
    """One model's bytes per server, a live view of the planner's ``model_bytes``."""

    def __init__(self, model_bytes: dict[tuple[str, str], int], model: str):
        self._b, self._m = model_bytes, model

    def __getitem__(self, server: str) -> int:
        return self._b.get((server, self._m), 0)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n != float("inf") else "unlimited"
