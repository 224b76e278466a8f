"""Hot-expert replication, applied: the coordinator's side of ``experts.placement``.

An expert layer's experts are the partitions of its table, and the servers count the tokens
each partition runs (``ExpertForward`` adds them to the per-partition counters of their
heartbeats), so ``LoadTracker`` knows every expert's token rate. Every ``expert_rebalance_s``
(and on ``RebalanceExperts``), for each expert layer of each current model, the coordinator
plans with ``plan_replicas`` from the current placement: the hottest experts get redundant
replicas on the least loaded servers while that lowers the busiest server by
``expert_min_gain`` of the mean, within each server's room (its even share of the layer's
replicas plus ``hot_expert_bytes`` of redundant ones); cold redundant replicas make room.

Changes go through the same steps as any copy: an added replica is a learner (built from the
leader, then promoted: routers split the expert's tokens across it only once it serves), a
dropped one leaves its replica set with the epoch raised (routers that still send it tokens
are redirected). No expert goes below the model's replication. A layer with copies still being
built is left alone until they finish.
"""
from __future__ import annotations

import logging

import numpy as np

from experts.placement import apply, imbalance, plan_replicas
from experts.specs import ExpertLayerSpec
from shoal.errors import NotFound, ShoalError, abort_with
from shoal.proto import shoal_pb2 as pb

from coordinator.state import ClusterState, slot_bytes

log = logging.getLogger("coordinator")

MAX_COPIES_PER_PASS = 8


class ExpertRPCs:
    """Needs from the host: ``_lock``, ``_state``, ``_commit``, ``_cfg``, ``_load``, ``alive``,
    ``_experts_at`` (the clock of the last periodic pass)."""

    def RebalanceExperts(self, request, context):
        try:
            with self._lock:
                return self._rebalance_experts(request.model, request.layer, request.dry_run)
        except ShoalError as e:
            abort_with(context, e)

    def _rebalance_experts(self, model: str = "", layer: str = "",
                           dry_run: bool = False) -> pb.RebalanceExpertsReply:
        state = self._state
        targets = [md for md in state.models.values() if md.current and md.expert_layers
                   and (not model or md.name == model)]
        if model and not targets:
            raise NotFound(f"model: {model!r} has no current version with expert layers")
        serving = state.serving(sorted(self.alive()))
        out, new = [], state
        for md in targets:
            layers = [m for m in md.expert_layers if not layer or m.name == layer]
            if layer and not layers:
                raise NotFound(f"layer: {layer!r} is not an expert layer of model {md.name!r} "
                               f"(expert layers: {', '.join(m.name for m in md.expert_layers)})")
            for m in layers:
                balance, new = self._balance_layer(new, md, m, serving)
                out.append(balance)
        if not dry_run and new is not state:
            self._commit(new)
            for b in out:
                if b.changes:
                    log.info("model %s layer %s: hot experts %s; imbalance %.2f -> %.2f "
                             "planned (map version %d)", b.model, b.layer,
                             ", ".join(f"{c.kind} {c.expert}@{c.server}" for c in b.changes),
                             b.imbalance_before, b.imbalance_after, self._state.version)
        return pb.RebalanceExpertsReply(layers=out, map_version=self._state.version)

    def _balance_layer(self, state: ClusterState, md: pb.ModelSpec, m: pb.ExpertLayer,
                       servers: list[str]) -> tuple[pb.ExpertLayerBalance, ClusterState]:
        spec = ExpertLayerSpec.from_proto(m)
        table = next(t for t in md.tables if t.name == m.table)
        uid, E = table.table_uid, spec.num_experts
        rates = self._load.partition_load()
        load = np.array([rates.get((uid, e), 0.0) for e in range(E)])
        recs = {e: state.partitions[(uid, e)] for e in range(E)}
        placement = {e: list(r.replicas) for e, r in recs.items()}
        per_server = self._load.table_server_load(uid)
        measured = np.array([per_server.get(s, 0.0) for s in servers])
        before = float(measured.max() / measured.mean()) if measured.size and \
            measured.mean() > 0 else 1.0
        out = pb.ExpertLayerBalance(model=md.name, version=md.version, layer=m.name,
                                    imbalance_before=before, imbalance_after=before,
                                    tokens_per_s=load.tolist())
        if any(r.learners for r in recs.values()):
            out.note = "copies of this layer's experts are still being built"
            return out, state
        if load.sum() <= 0 or len(servers) < 2:
            out.note = "no tokens observed yet" if load.sum() <= 0 else "a single server"
            return out, state
        R = max(1, md.replication)
        even = -(-E * R // len(servers))
        room = even + self._cfg.hot_expert_bytes // max(1, slot_bytes(table))
        capacity = {s: max(room, sum(s in w for w in placement.values())) for s in servers}
        actions = plan_replicas(load, placement, servers, capacity, MAX_COPIES_PER_PASS,
                                self._cfg.expert_min_gain, min_replicas=R,
                                domain_of={s: state.domain_of(s) for s in servers})
        out.imbalance_after = imbalance(load, apply(placement, actions), servers)
        for a in actions:
            key = (uid, a.expert)
            state = state.with_learner(key, a.server) if a.kind == "add" else \
                state.without_replica(a.server, [key])
            out.changes.add(kind=a.kind, expert=a.expert, server=a.server)
        if not actions:
            out.note = "no copy lowers the busiest server enough"
        return out, state

    def _maybe_rebalance_experts(self, now: float) -> None:
        """The periodic pass (from the reconcile loop; the caller holds the lock)."""
        every = self._cfg.expert_rebalance_s
        if every <= 0 or now - self._experts_at < every:
            return
        self._experts_at = now
        try:
            self._rebalance_experts()
        except ShoalError as e:
            log.warning("hot-expert pass skipped: %s", e.message)
