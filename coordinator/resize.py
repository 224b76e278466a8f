"""The coordinator's resizing RPCs (a mixin of ``CoordinatorService``): plan and start
rebalances, drain and remove servers, cancel moves, and report moves in flight.

A move is durable in the map (``ShardMap.moves``); the reconcile loop advances every move a
step per pass (``ClusterState.advance_moves``): the target becomes a learner (snapshot, then
catch-up from the leader's log, as for re-replication), is promoted, then the source is dropped
and deletes its copy. Queries and writes go on throughout; a router with an older map is
redirected only by a server that no longer serves the partition.
"""
from __future__ import annotations

import logging

import grpc

from shoal.errors import ShoalError, abort_with
from shoal.proto import shoal_pb2 as pb

from coordinator.rebalance import Plan, ServerSpec, plan_moves
from coordinator.state import ClusterState

log = logging.getLogger("coordinator.resize")
DEFAULT_TOLERANCE = 0.05


def plan_for(state: ClusterState, alive: set[str], tolerance: float = 0.0,
             load: dict[tuple[int, int], float] | None = None) -> Plan:
    """The rebalance plan for ``state``: live servers only (a dead server's partitions are the
    failure detector's business), each model's server quota kept, ``load`` (lookups per
    partition) evened out after bytes."""
    specs = [ServerSpec(s, info.disk_capacity_bytes, info.draining, info.domain)
             for s, info in sorted(state.servers.items()) if s in alive]
    model_of = {t.table_uid: m.name for m in state.models.values() for t in m.tables}
    return plan_moves({k: r.replicas for k, r in state.partitions.items()},
                      state.partition_bytes(), specs, load=load,
                      tolerance=tolerance or DEFAULT_TOLERANCE,
                      quota_of={k: model_of.get(k[0], "") for k in state.partitions},
                      quotas={m.name: m.server_quota_bytes for m in state.models.values()
                              if m.server_quota_bytes})


class ResizeRPCs:
    """Needs from the host: ``_lock``, ``_state``, ``_commit``, ``alive``, ``_stats``,
    ``_move_started``, ``_clock``, ``_load`` (a ``LoadTracker``)."""

    def _rebalance(self, dry_run: bool, tolerance: float) -> pb.RebalanceReply:
        """Plan (and unless ``dry_run`` start) a rebalance. Caller holds ``_lock``."""
        if self._state.moves and not dry_run:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{len(self._state.moves)} moves of an earlier rebalance are in "
                             "flight; wait for them (shoal status) or cancel them (shoal "
                             "cancel)")
        if self._state.splits and not dry_run:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{len(self._state.splits)} tables are being split; moves wait "
                             "until the splits are done (shoal status)")
        plan = plan_for(self._state, set(self.alive()), tolerance,
                        self._load.partition_load())
        if not dry_run and plan.moves:
            self._commit(self._state.with_moves(plan.moves))
            log.info("rebalance: %d moves, %.1f MiB; bytes per server %s -> %s",
                     len(plan.moves), plan.moved_bytes / 2**20, plan.before, plan.after)
        return pb.RebalanceReply(
            moves=[pb.Move(table_uid=m.table_uid, partition=m.partition, source=m.source,
                           target=m.target, bytes=m.bytes, phase="queued")
                   for m in plan.moves],
            bytes_before=plan.before, bytes_after=plan.after,
            map_version=self._state.version)

    def _continue_draining(self, alive: set[str]) -> None:
        """Once a plan's moves are done, plan again while a live draining server still holds
        replicas (a plan moves each partition once, so two replicas of one partition on
        draining servers take two plans). Caller holds ``_lock``."""
        if self._state.moves:
            return
        if any(info.draining and s in alive and self._state.holdings(s)[0]
               for s, info in self._state.servers.items()):
            try:
                self._rebalance(False, 0.0)
            except ShoalError as e:
                log.warning("cannot finish draining: %s", e.message)

    def Rebalance(self, request, context):
        try:
            with self._lock:
                return self._rebalance(request.dry_run, request.tolerance)
        except ShoalError as e:
            abort_with(context, e)

    def Drain(self, request, context):
        try:
            with self._lock:
                drained = self._state.with_draining(request.server_id, not request.undrain)
                if request.dry_run:
                    saved, self._state = self._state, drained
                    try:
                        return self._rebalance(True, 0.0)
                    finally:
                        self._state = saved
                if drained is self._state and self._state.moves:
                    return pb.RebalanceReply(moves=list(self._state.moves.values()),
                                             map_version=self._state.version)
                if drained is not self._state:
                    self._commit(drained)
                    log.info("server %s is %s", request.server_id,
                             "no longer draining" if request.undrain else "draining")
                if self._state.moves:   # plan afresh, with this server draining too
                    self._commit(self._state.without_moves()[0])
                return self._rebalance(False, 0.0)
        except ShoalError as e:
            abort_with(context, e)

    def RemoveServer(self, request, context):
        try:
            with self._lock:
                self._commit(self._state.without_server(request.server_id))
                self._stats.pop(request.server_id, None)
                self._load.forget(request.server_id)
                log.info("server %s removed from the cluster", request.server_id)
                return pb.RemoveServerReply(map_version=self._state.version)
        except ShoalError as e:
            abort_with(context, e)

    def CancelMoves(self, request, context):
        with self._lock:
            new, n = self._state.without_moves()
            self._commit(new)
            if n:
                log.info("cancelled %d moves", n)
            return pb.CancelMovesReply(cancelled=n, map_version=self._state.version)

    def _fill_moves(self, m: pb.ShardMap, stats: dict) -> None:
        """Soft progress of each move, from its target's heartbeat."""
        sets = {(rs.table_uid, rs.partition): rs for rs in m.partitions}
        now = self._clock()
        for mv in m.moves:
            key = (mv.table_uid, mv.partition)
            rs = sets.get(key)
            if rs is not None and mv.target in rs.replicas:
                mv.phase, mv.bytes_done = "promoted", mv.bytes
            elif rs is not None and mv.target in rs.learners:
                mv.phase = "copying"
                for b in stats.get(mv.target, pb.ServerStats()).builds:
                    if (b.table_uid, b.partition) == key:
                        mv.bytes_done = b.bytes_done
                started = self._move_started.get((key, mv.target))
                mv.seconds = now - started if started is not None else 0.0
            else:
                mv.phase = "queued"
