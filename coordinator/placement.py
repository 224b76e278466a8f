"""Placement: a pure function from (servers, partitions, replication) to replica sets.

No server is contacted here; tests run it on synthetic clusters.
"""
from __future__ import annotations

from dataclasses import dataclass

from shoal.errors import ShoalError
import grpc


@dataclass(frozen=True)
class PartitionLoad:
    """One partition to place: its key and its bytes."""
    table_uid: int
    partition: int
    bytes: int


@dataclass(frozen=True)
class ServerLoad:
    """A live server and the bytes (and leaderships) it already holds."""
    server_id: str
    bytes: int = 0
    leaders: int = 0
    domain: str = ""            # its failure domain (a host, a Ray node); "": itself alone
    capacity: int = 0           # bytes it may hold on disk (0: unlimited)


def distinct_domains(order: list[str], n: int, domain_of: dict[str, str],
                     taken: set[str] = frozenset()) -> list[str]:
    """The first ``n`` servers of ``order`` whose failure domains differ from each other and
    from ``taken``; where there are not enough such domains, the next servers in order fill
    the rest (sharing a domain beats having too few replicas)."""
    chosen, seen = [], set(taken)
    for s in order:
        d = domain_of.get(s) or s
        if d not in seen:
            chosen.append(s)
            seen.add(d)
            if len(chosen) == n:
                return chosen
    return chosen + [s for s in order if s not in chosen][:n - len(chosen)]


def place(partitions: list[PartitionLoad], servers: list[ServerLoad],
          replication: int, server_quota: int = 0) -> dict[tuple[int, int], tuple[str, ...]]:
    """Replica sets for the partitions of one model: ``replication`` distinct servers each, in
    distinct failure domains while there are enough (``ServerLoad.domain``), first the leader.

    Greedy: largest partitions first, each onto the servers holding the fewest of this model's
    bytes, then the fewest bytes overall, so every model is spread over all servers (one
    model's hot traffic does not land on one of them) even when some servers are fuller than
    others; the leader is the replica with the fewest leaderships so reads and writes spread.
    ``server_quota``: bytes of this model one server may hold (0: no limit). No server is
    given more than its capacity (disk). Deterministic.
    """
    if replication < 1:
        raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"replication {replication} must be at least 1")
    if len(servers) < replication:
        raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"replication {replication} needs at least {replication} live servers; "
                         f"{len(servers)} are alive ({', '.join(s.server_id for s in servers)}). "
                         "Start more servers or lower the replication factor.")
    load = {s.server_id: s.bytes for s in servers}
    capacity = {s.server_id: s.capacity or float("inf") for s in servers}
    free = sum(max(0, capacity[s] - load[s]) for s in load)
    domain_of = {s.server_id: s.domain for s in servers}
    mine = {s.server_id: 0 for s in servers}
    leaders = {s.server_id: s.leaders for s in servers}
    out: dict[tuple[int, int], tuple[str, ...]] = {}
    for part in sorted(partitions, key=lambda p: (-p.bytes, p.table_uid, p.partition)):
        order = sorted((s for s in load if (not server_quota or
                        mine[s] + part.bytes <= server_quota) and
                        load[s] + part.bytes <= capacity[s]),
                       key=lambda s: (mine[s], load[s], leaders[s], s))
        if len(order) < replication:
            total = sum(p.bytes for p in partitions) * replication
            limit, code, fix = (
                (f"the {len(servers)} servers' disk capacity ({free / 2**20:,.1f} MiB free "
                 "together)", grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "add servers or give them more disk (server.disk_capacity_bytes)")
                if not server_quota else
                (f"a server quota of {server_quota / 2**20:,.1f} MiB on {len(servers)} servers",
                 grpc.StatusCode.FAILED_PRECONDITION, "raise the quota or add servers"))
            raise ShoalError(code, f"the model's {total / 2**20:,.1f} MiB of replicas do not "
                             f"fit {limit}: partition {part.partition} of table_uid "
                             f"{part.table_uid} ({part.bytes / 2**20:,.1f} MiB) has room on "
                             f"{len(order)} servers, needs {replication}; {fix}")
        chosen = distinct_domains(order, replication, domain_of)
        leader = min(chosen, key=lambda s: (leaders[s], load[s], s))
        replicas = (leader,) + tuple(s for s in chosen if s != leader)
        for s in chosen:
            load[s] += part.bytes
            mine[s] += part.bytes
        leaders[leader] += 1
        out[(part.table_uid, part.partition)] = replicas
    return out
