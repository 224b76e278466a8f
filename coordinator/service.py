"""The coordinator's gRPC service: membership, the model registry, the versioned shard map.

It is not on the request path: routers and servers cache the map and poll for new versions.
Every change is applied to a copy of the state, saved durably, then published.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import grpc

from shoal.config import CoordinatorConfig
from shoal.errors import NotFound, ShoalError, abort_with
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg

from coordinator.autoscale import AutoscaleRPCs
from coordinator.loadstats import LoadTracker
from coordinator.experts import ExpertRPCs
from coordinator.resize import ResizeRPCs
from coordinator.split import SplitRPCs
from coordinator.versions import VersionRPCs
from coordinator.state import ClusterState
from coordinator.status import EventLog, status_view
from coordinator.store import StateStore

log = logging.getLogger("coordinator")


class CoordinatorService(ResizeRPCs, SplitRPCs, AutoscaleRPCs, VersionRPCs, ExpertRPCs,
                         pbg.CoordinatorServicer):
    def __init__(self, store: StateStore, config: CoordinatorConfig,
                 default_replication: int = 0, clock: Callable[[], float] = time.monotonic,
                 build_replica: Callable[[str, pb.BuildReplicaRequest], None] | None = None):
        """``build_replica(address, request)`` asks a learner to start copying a partition
        (a gRPC call in the process; tests pass a fake)."""
        self._store = store
        self._cfg = config
        self._default_replication = default_replication or config.default_replication
        self._clock = clock
        self._lock = threading.Lock()
        self._state = store.load() or ClusterState()
        # Soft: server -> clock of its last heartbeat. After a restart every known server gets
        # one lease of grace, as if it had just heartbeated, so the cluster is not seen as
        # dead for the half second until heartbeats resume.
        self._last_seen: dict[str, float] = {s: clock() for s in self._state.servers}
        self._stats: dict[str, pb.ServerStats] = {}   # soft: latest stats per server
        self._last_pass: float | None = None          # clock of the last reconcile pass
        self._build_replica = build_replica
        self._build_sent: dict[tuple, tuple] = {}     # soft: (key, learner) -> (clock, source)
        self._move_started: dict[tuple, float] = {}   # soft: (key, target) -> clock
        self._load = LoadTracker()                     # soft: lookups per partition
        self._split_frozen_at: dict[int, float] = {}   # soft: table_uid -> clock of its freeze
        self._experts_at = clock()                     # soft: clock of the last hot-expert pass
        self.metrics_address = ""                      # set by the process once it serves them
        self._metrics: dict[str, str] = {}             # soft: server -> its /metrics address
        self.events = EventLog()                       # soft: recent failures, for the page
        self._seen_dead: set[str] = set()              # soft: servers already listed as dead

    # ------------------------------------------------------------ helpers
    def _commit(self, new: ClusterState) -> None:
        if new is not self._state:
            self._store.save(new)
            self._state = new

    def alive(self) -> list[str]:
        now = self._clock()
        return sorted(s for s in self._state.servers
                      if now - self._last_seen.get(s, -1e18) <= self._cfg.lease_s)

    def shard_map(self) -> pb.ShardMap:
        """The current map with liveness and stats. Takes no lock: states are replaced, never
        changed in place, so readers never wait for a change being saved (an fsync)."""
        state, last_seen, stats = self._state, dict(self._last_seen), dict(self._stats)
        m = state.to_map()
        now = self._clock()
        m.default_replication = self._default_replication
        m.coordinator_metrics_address = self.metrics_address
        for s in m.servers:
            seen = last_seen.get(s.server_id, -1e18)
            s.state = "alive" if now - seen <= self._cfg.lease_s else "dead"
            s.last_heartbeat_age_s = now - last_seen.get(s.server_id, now)
            if s.server_id in stats:
                s.stats.CopyFrom(stats[s.server_id])
            s.metrics_address = self._metrics.get(s.server_id, "")
        self._fill_moves(m, stats)
        return m

    def partition_load(self) -> dict[tuple[int, int], float]:
        """Ids (tokens) per second per (table_uid, partition), from the heartbeats."""
        with self._lock:
            return self._load.partition_load()

    def status_view(self) -> dict:
        """The status page's data (``coordinator.status.status_view``)."""
        m = self.shard_map()
        with self._lock:
            partition_load, server_load = self._load.partition_load(), self._load.server_load()
        return status_view(m, partition_load, server_load, self.events.recent())

    # ------------------------------------------------------------ reconcile loop
    def reconcile(self) -> list[str]:
        """One pass of the failure detector: every server whose lease has run out is dropped
        from the replica sets it shares with others (epoch + 1, a new leader where it led).
        Idempotent; returns the servers acted on. Called every ``lease_s / 5`` by the process."""
        with self._lock:
            now = self._clock()
            stalled = now - self._last_pass if self._last_pass is not None else 0.0
            self._last_pass = now
            if stalled > self._cfg.lease_s / 2:
                # The coordinator itself did not run for a while (starved, paused): silence in
                # that window says nothing about the servers. Give every one the time back.
                for s in self._last_seen:
                    self._last_seen[s] += stalled
                log.warning("reconcile loop stalled %.1fs; leases extended by as much", stalled)
            alive = set(self.alive())
            if not alive:
                return []        # everyone silent at once: the coordinator's problem, not theirs
            acted = []
            for server_id in sorted(set(self._state.servers) - alive - self._seen_dead):
                self.events.add("server_dead", f"{server_id} missed its {self._cfg.lease_s} s "
                                "lease")
            self._seen_dead = set(self._state.servers) - alive
            for server_id in sorted(self._seen_dead):
                new = self._state.without_replica(server_id)
                if new is not self._state:
                    t0 = time.perf_counter()
                    self._commit(new)
                    acted.append(server_id)
                    log.warning("server %s missed its lease (%.1fs): dropped from replica sets, "
                                "map version %d (%.1f ms)", server_id, self._cfg.lease_s,
                                new.version, (time.perf_counter() - t0) * 1e3)
            self._commit(self._state.advance_moves(alive, self._cfg.max_moves_per_server))
            self._continue_draining(alive)
            self._advance_splits()
            self._autoscale(alive)
            self._maybe_rebalance_experts(now)
        self._rebuild()
        return acted

    def _rebuild(self) -> None:
        """Re-replication: give every partition with fewer replicas (+ learners) than its
        model's replication factor a learner on the least-loaded live server that is not
        building too many copies already; (re)ask learners that have not reported."""
        requests = []
        with self._lock:
            alive = set(self.alive())
            now = self._clock()
            state = self._state
            building = collections.Counter(s for rec in state.partitions.values()
                                           for s in rec.learners)
            serving = set(state.serving(sorted(alive)))
            loads = {s.server_id: s.bytes for s in state.server_loads(sorted(alive))}
            for key, rec in sorted(state.partitions.items()):
                want = state.replication_of(key[0])
                if len(rec.replicas) + len(rec.learners) >= want or \
                        not any(r in alive for r in rec.replicas):
                    continue
                options = [s for s in sorted(serving) if s not in rec.replicas
                           and s not in rec.learners
                           and building[s] < self._cfg.max_builds_per_server]
                if not options:
                    continue
                # Another failure domain than the copies it has, where one can take it.
                held_in = {state.domain_of(s) for s in rec.replicas + rec.learners}
                elsewhere = [s for s in options if state.domain_of(s) not in held_in]
                target = min(elsewhere or options, key=lambda s: (loads[s], s))
                state = state.with_learner(key, target)
                building[target] += 1
                loads[target] += 1
                log.info("partition %s: %d of %d replicas; building a copy on %s", key,
                         len(rec.replicas), want, target)
            self._commit(state)
            addresses = {s.server_id: s.address for s in state.servers.values()}
            for key, rec in state.partitions.items():
                source = rec.replicas[0] if rec.replicas and rec.replicas[0] in alive else None
                for learner in rec.learners:
                    sent = self._build_sent.get((key, learner))
                    if source is None or learner not in alive or (
                            sent is not None and sent[1] == source
                            and now - sent[0] < self._cfg.build_resend_s):
                        continue
                    self._build_sent[(key, learner)] = (now, source)
                    self._move_started.setdefault((key, learner), now)
                    requests.append((addresses[learner], pb.BuildReplicaRequest(
                        table_uid=key[0], partition=key[1], epoch=rec.epoch,
                        source_address=addresses[source], map_version=state.version,
                        source_id=source)))
        for address, request in requests:
            if self._build_replica is None:
                continue
            try:
                self._build_replica(address, request)
            except Exception as e:           # the next pass after build_resend_s asks again
                log.warning("asking %s to build partition %d of table_uid %d failed: %s",
                            address, request.partition, request.table_uid, e)
                self.events.add("build_failed", f"asking {address} to build partition "
                                f"{request.table_uid}:{request.partition} failed: {e}")

    def run_reconcile_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self._cfg.lease_s / 5):
            try:
                self.reconcile()
            except Exception as e:             # keep reconciling whatever one pass hit
                log.exception("reconcile pass failed")
                self.events.add("reconcile_failed", f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------ RPCs
    def ReplicaReady(self, request, context):
        key = (request.table_uid, request.partition)
        with self._lock:
            rec = self._state.partitions.get(key)
            if rec is not None and request.leader and rec.replicas[:1] != (request.leader,):
                # It caught up with a server that no longer leads: the new leader does not send
                # it writes. The next reconcile pass asks it to build again from the new one.
                log.info("partition %s: %s caught up with %s, which no longer leads; not "
                         "promoted", key, request.server_id, request.leader)
                self._build_sent.pop((key, request.server_id), None)
                return pb.ReplicaReadyReply(map_version=self._state.version)
            new = self._state.with_promoted(key, request.server_id)
            if new is not self._state:
                self._commit(new)
                self._build_sent.pop((key, request.server_id), None)
                self._move_started.pop((key, request.server_id), None)
                # A move's source can be dropped now rather than at the next pass.
                self._commit(self._state.advance_moves(set(self.alive()),
                                                       self._cfg.max_moves_per_server))
                log.info("partition %s: %s copied %d rows, replayed %d entries and is now a "
                         "replica (epoch %d)", key, request.server_id, request.rows,
                         request.entries, new.partitions[key].epoch)
            return pb.ReplicaReadyReply(map_version=self._state.version)

    def ReportFailure(self, request, context):
        """A leader could not replicate a write to ``server_id``: drop it from those partitions
        (epoch + 1) so the leader can acknowledge without it. Only the partitions' current,
        live leader may ask; anyone else gets FAILED_PRECONDITION (it may be deposed itself)."""
        keys = [(request.table_uid, int(p)) for p in request.partitions]
        with self._lock:
            if request.reporter not in self.alive():
                abort_with(context, ShoalError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"reporter {request.reporter!r} is not a live server; it may not drop "
                    f"replicas"))
            bad = [k for k in keys if k not in self._state.partitions
                   or self._state.partitions[k].replicas[:1] != (request.reporter,)]
            if bad:
                abort_with(context, ShoalError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"reporter {request.reporter!r} does not lead partition {bad[0][1]} of "
                    f"table_uid {request.table_uid} at map version {self._state.version}"))
            new = self._state.without_replica(request.server_id, keys)
            if new is not self._state:
                self._commit(new)
                log.warning("%s reported %s unreachable (%s): dropped from %d partitions of "
                            "table_uid %d, map version %d", request.reporter, request.server_id,
                            request.reason, len(keys), request.table_uid, new.version)
                self.events.add("replica_unreachable", f"{request.reporter} could not "
                                f"replicate to {request.server_id} ({request.reason}); dropped "
                                f"from {len(keys)} partitions of table_uid {request.table_uid}")
            return pb.ReportFailureReply(map_version=self._state.version)

    def Register(self, request, context):
        with self._lock:
            if request.server_id not in self._state.servers:
                self.events.add("info", f"{request.server_id} joined at {request.address}")
            self._commit(self._state.with_server(request.server_id, request.address,
                                                 request.memory_budget_bytes, request.domain,
                                                 request.disk_capacity_bytes))
            # Soft, like stats: a restarted server's metrics port may change, and that is no
            # change of the map.
            self._metrics[request.server_id] = request.metrics_address
            self._last_seen[request.server_id] = self._clock()
            return pb.RegisterReply(map_version=self._state.version)

    def Heartbeat(self, request, context):
        with self._lock:
            if request.server_id not in self._state.servers:
                abort_with(context, NotFound(f"server_id {request.server_id!r} is not registered;"
                                             " register first"))
            self._last_seen[request.server_id] = self._clock()
            self._stats[request.server_id] = request.stats
            self._load.observe(request.server_id, self._clock(), request.stats.table_loads)
            if request.stats.splits:
                self._advance_splits()
            return pb.HeartbeatReply(map_version=self._state.version)

    def GetShardMap(self, request, context):
        if request.known_version and request.known_version == self._state.version:
            return pb.GetShardMapReply(unchanged=True)
        return pb.GetShardMapReply(map=self.shard_map())

    def CreateModel(self, request, context):
        try:
            with self._lock:
                new, model = self._state.with_model(request.spec,
                                                    self._state.serving(self.alive()), self._cfg,
                                                    self._default_replication,
                                                    request.new_version)
                self._commit(new)
        except ShoalError as e:
            abort_with(context, e)
        return pb.CreateModelReply(map=self.shard_map(), model=model)

    def SetReplicas(self, request, context):
        try:
            with self._lock:
                self._commit(self._state.with_replicas(request.table_uid, request.partition,
                                                       list(request.replicas)))
                rec = self._state.partitions[(request.table_uid, request.partition)]
                version = self._state.version
        except ShoalError as e:
            abort_with(context, e)
        return pb.SetReplicasReply(
            partition=pb.ReplicaSet(table_uid=request.table_uid, partition=request.partition,
                                    replicas=list(rec.replicas), epoch=rec.epoch),
            map_version=version)
