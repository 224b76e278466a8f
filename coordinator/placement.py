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


def place(partitions: list[PartitionLoad], servers: list[ServerLoad],
          replication: int) -> dict[tuple[int, int], tuple[str, ...]]:
    """Replica sets for ``partitions``: ``replication`` distinct servers each, first the leader.

    Greedy on bytes: largest partitions first, each onto the least-loaded servers; the leader is
    the replica with the fewest leaderships so reads and writes spread. Deterministic.
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
    leaders = {s.server_id: s.leaders for s in servers}
    out: dict[tuple[int, int], tuple[str, ...]] = {}
    for part in sorted(partitions, key=lambda p: (-p.bytes, p.table_uid, p.partition)):
        order = sorted(load, key=lambda s: (load[s], leaders[s], s))
        chosen = order[:replication]
        leader = min(chosen, key=lambda s: (leaders[s], load[s], s))
        replicas = (leader,) + tuple(s for s in chosen if s != leader)
        for s in chosen:
            load[s] += part.bytes
        leaders[leader] += 1
        out[(part.table_uid, part.partition)] = replicas
    return out
