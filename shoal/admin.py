"""Cluster administration from Python: rebalance, drain, remove, cancel, watch moves.

``Admin(coordinator_address)`` talks to the coordinator; ``shoal.LocalCluster`` uses it to
resize the local deployment (starting and stopping server processes), and the CLI's
``shoal resize | add-server | drain | remove | rebalance | cancel`` use both.
"""
from __future__ import annotations

import time
from typing import Callable

import grpc

from shoal.errors import Unavailable, from_rpc_error
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import RpcClient, channel


class Elastic:
    """What every backend (``LocalCluster``, ``RayCluster``) does the same way on top of its own
    ``add_server()``, ``remove_server(id, timeout, progress)``, ``server_ids()``, ``admin()``
    and ``replication``: rebalance, and resize by adding servers or draining the newest."""

    def rebalance(self, wait: bool = True, timeout: float = 600.0, progress=None):
        """Plan and start moves that even out the servers; wait for them unless told not to."""
        with self.admin() as admin:
            reply = admin.rebalance()
            if wait:
                admin.wait_for_moves(timeout, progress)
            return reply

    def resize(self, servers: int, timeout: float = 600.0, progress=None) -> None:
        """Grow or shrink to ``servers`` shard servers while the cluster serves: new servers
        are started and partitions moved onto them; removed ones (the newest first) are
        drained, all in one plan, then stopped."""
        if servers < max(1, self.replication):
            raise ValueError(f"servers: {servers} is fewer than the replication factor "
                             f"{self.replication}")
        while len(self.server_ids()) < servers:
            self.add_server()
        leaving = sorted(self.server_ids(), key=lambda s: int(s[1:]))[servers:]
        if not leaving:
            self.rebalance(True, timeout, progress)
            return
        with self.admin() as admin:
            for s in leaving:
                admin.drain(s)
        for s in leaving:
            self.remove_server(s, timeout, progress)

    @staticmethod
    def _drained(admin: "Admin", server_id: str, timeout: float, progress) -> pb.ShardMap:
        """Drain ``server_id`` and wait until it holds no replica and builds none."""
        admin.drain(server_id)
        return admin.wait_for_moves(timeout, progress,
                                    until=lambda m: not any(server_id in rs.replicas or
                                                            server_id in rs.learners
                                                            for rs in m.partitions))


class Admin(RpcClient):
    def __init__(self, coordinator_address: str, timeout: float = 30.0, creds=None):
        # wait_for_ready: ride out a coordinator restart
        super().__init__(coordinator_address, pbg.CoordinatorStub, timeout, wait_for_ready=True,
                         creds=creds)

    def shard_map(self) -> pb.ShardMap:
        return self._call(self._stub.GetShardMap, pb.GetShardMapRequest()).map

    def rebalance(self, dry_run: bool = False, tolerance: float = 0.0) -> pb.RebalanceReply:
        return self._call(self._stub.Rebalance,
                          pb.RebalanceRequest(dry_run=dry_run, tolerance=tolerance))

    def drain(self, server_id: str, dry_run: bool = False,
              undrain: bool = False) -> pb.RebalanceReply:
        return self._call(self._stub.Drain, pb.DrainRequest(server_id=server_id,
                                                            dry_run=dry_run, undrain=undrain))

    def remove_server(self, server_id: str) -> int:
        return self._call(self._stub.RemoveServer,
                          pb.RemoveServerRequest(server_id=server_id)).map_version

    def cancel(self) -> int:
        return self._call(self._stub.CancelMoves, pb.CancelMovesRequest()).cancelled

    def split_table(self, model: str, table: str, wait: bool = True, timeout: float = 600.0,
                    progress: Callable[[pb.ShardMap], None] | None = None) -> pb.Split:
        """Double the partition count of ``model``'s ``table``, live; with ``wait``, return
        once the model serves from the doubled table. The ``pb.Split`` names the new
        table_uid and partition count."""
        sp = self._call(self._stub.SplitTable,
                        pb.SplitTableRequest(model=model, table=table)).split
        if wait:
            deadline = time.monotonic() + timeout
            while True:
                m = self.shard_map()
                if progress is not None:
                    progress(m)
                if not any(s.table_uid == sp.table_uid for s in m.splits):
                    break
                if time.monotonic() > deadline:
                    raise Unavailable(f"the split of {model}/{table} is still running after "
                                      f"{timeout:.0f}s (see `shoal status`)")
                time.sleep(0.1)
        return sp

    def cancel_split(self, model: str, table: str) -> None:
        self._call(self._stub.SplitTable,
                   pb.SplitTableRequest(model=model, table=table, cancel=True))

    def set_autoscale(self, policy: pb.AutoscalePolicy) -> pb.AutoscaleStatus:
        return self._call(self._stub.SetAutoscale, pb.SetAutoscaleRequest(policy=policy))

    def autoscale_status(self) -> pb.AutoscaleStatus:
        return self._call(self._stub.SetAutoscale, pb.SetAutoscaleRequest(status_only=True))

    def holdings(self, server_id: str) -> int:
        """Replicas plus copies being built on ``server_id``."""
        m = self.shard_map()
        return sum(server_id in rs.replicas or server_id in rs.learners for rs in m.partitions)

    def wait_for_moves(self, timeout: float = 600.0,
                       progress: Callable[[pb.ShardMap], None] | None = None,
                       until: Callable[[pb.ShardMap], bool] | None = None) -> pb.ShardMap:
        """Poll until no move is in flight and no copy is being built (and ``until(map)``, if
        given); ``progress(map)`` is called on every poll."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.shard_map()
            if progress is not None:
                progress(m)
            if not m.moves and not any(rs.learners for rs in m.partitions) and \
                    (until is None or until(m)):
                return m
            if time.monotonic() > deadline:
                raise Unavailable(f"{len(m.moves)} moves still in flight after {timeout:.0f}s "
                                  "(see `shoal status`)")
            time.sleep(0.25)


def server_stats(address: str, timeout: float = 10.0, creds=None) -> pb.ServerStats:
    ch = channel(address, creds)
    try:
        return pbg.ShardServerStub(ch).Stats(pb.StatsRequest(), timeout=timeout)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        ch.close()


def server_checksums(address: str, table_uid: int, partitions: list[int],
                     timeout: float = 120.0, recorded: bool = False, scanned: bool = False,
                     creds=None):
    """(checksums uint64, rows int64) of partitions stored on one server; ``recorded``: from
    their ingest records where those account for them (see ChecksumsRequest); ``scanned``:
    also return, per partition, whether the server read its rows to answer."""
    import numpy as np

    from shoal.wire import is_set, unpack
    ch = channel(address, creds)
    try:
        reply = pbg.ShardServerStub(ch).Checksums(pb.ChecksumsRequest(
            table_uid=table_uid, partitions=partitions, recorded=recorded), timeout=timeout)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        ch.close()
    out = (unpack(reply.checksums, "checksums", "int64", 1).view(np.uint64),
           unpack(reply.rows, "rows", "int64", 1))
    if scanned:
        read = unpack(reply.scanned, "scanned", "int32", 1) if is_set(reply.scanned) else \
            np.ones(len(partitions), np.int32)
        return out + (read.astype(bool),)
    return out


def describe_splits(m: pb.ShardMap) -> list[str]:
    """One line per split in flight: table, partitions, copies built, frozen or not."""
    lines = []
    for sp in m.splits:
        built = total = 0
        for s in m.servers:
            for pr in s.stats.splits:
                if pr.table_uid == sp.table_uid:
                    total += 1
                    built += 0 <= pr.built_seq == pr.seq
        half = sp.new_table.num_partitions // 2
        lines.append(f"{sp.model}/{sp.table}: {half} -> {sp.new_table.num_partitions} "
                     f"partitions, {built}/{total} copies caught up"
                     f"{', writes paused for the cut-over' if sp.frozen else ''}")
    return lines


def describe_moves(m: pb.ShardMap) -> list[str]:
    """One line per move in flight: partition, source -> target, phase, bytes done, ETA."""
    names = {t.table_uid: (md.name, t.name) for md in m.models for t in md.tables}
    lines = []
    for mv in m.moves:
        model, table = names.get(mv.table_uid, ("?", "?"))
        done = mv.bytes_done / 2**20
        total = mv.bytes / 2**20
        eta = ""
        if mv.phase == "copying" and mv.bytes_done and mv.seconds > 0:
            rate = mv.bytes_done / mv.seconds
            eta = f", {rate / 2**20:.1f} MiB/s, ETA {(mv.bytes - mv.bytes_done) / rate:.0f}s"
        lines.append(f"{model}/{table} partition {mv.partition}: {mv.source} -> {mv.target} "
                     f"{mv.phase or 'queued'} {done:.1f}/{total:.1f} MiB{eta}")
    return lines

