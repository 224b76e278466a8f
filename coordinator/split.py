"""Splitting a table live: its partition count doubles, each partition p becoming p and p + P.

Row ``id`` of a table of P partitions lives in partition ``id & (P - 1)``; with 2P partitions
it lives in ``id & (2P - 1)``, so old partition p's rows go to new partitions p and p + P and
nowhere else. The split builds the doubled table under a new table_uid beside the old one:

1. ``SplitTable`` records a ``pb.Split`` in the map. Every server that holds a replica of old
   partition p builds new partitions p and p + P from its own copy (a snapshot, then the old
   partition's writes after it, from its own log), while queries and writes go on to the old
   table. Nothing crosses the network. Servers report how far they are (``SplitProgress``).
2. Once every copy has caught up, the coordinator freezes the old table: leaders refuse its
   writes with UNAVAILABLE and routers retry them. The last writes in flight reach every copy.
3. When, for every old partition, its leader reports (at the current map version) the
   position it stopped at and its own copy has it, the coordinator switches the model to
   the new table in one map version: new partitions p and p + P get old partition p's replicas
   whose copies reached that position (a laggard is left out and rebuilt afterwards, as after
   a failure). Routers and servers holding the old map are redirected by the servers, which no
   longer hold the old table; its data is deleted.

If the copies do not catch up within ``split_freeze_s`` of the freeze, writes resume and the
split tries again later. ``cancel`` drops a split not yet switched; its new copies are deleted.
A split and moves do not run at once.
"""
from __future__ import annotations

import logging

import grpc

from embeddings.specs import TableSpec
from shoal.errors import InvalidArgument, NotFound, ShoalError, abort_with
from shoal.proto import shoal_pb2 as pb

from coordinator.state import ClusterState, PartitionRecord

log = logging.getLogger("coordinator.split")
LAGGARD_GRACE_S = 2.0          # after the leader is ready, wait this long for its replicas


def with_split(state: ClusterState, model: str, table: str) -> ClusterState:
    md = state.current(model)
    if md is None:
        raise NotFound(f"model {model!r} does not exist (or has no current version)")
    spec = next((t for t in md.tables if t.name == table), None)
    if spec is None:
        raise NotFound(f"model {model!r} has no table {table!r} (tables: "
                       f"{', '.join(t.name for t in md.tables)})")
    if spec.table_uid in state.splits:
        raise ShoalError(grpc.StatusCode.ALREADY_EXISTS,
                         f"table {table!r} of model {model!r} is being split already")
    if state.moves:
        raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"{len(state.moves)} moves are in flight; a split waits for them "
                         "(shoal status) or for them to be cancelled (shoal cancel)")
    parts = spec.num_partitions * 2
    if parts > spec.num_embeddings:
        raise InvalidArgument(f"table {table!r}: {parts} partitions would exceed its "
                              f"{spec.num_embeddings} rows")
    new = state.copy()
    doubled = TableSpec.from_proto(spec).to_proto()
    doubled.num_partitions = parts
    doubled.table_uid = new.next_table_uid
    new.next_table_uid += 1
    new.splits[spec.table_uid] = pb.Split(model=model, table=table, table_uid=spec.table_uid,
                                          new_table=doubled, model_version=md.version)
    new.version += 1
    return new


def with_frozen(state: ClusterState, uid: int, frozen: bool) -> ClusterState:
    new = state.copy()
    sp = new.splits[uid]
    sp.frozen = frozen
    new.version += 1
    sp.frozen_version = new.version if frozen else 0
    return new


def without_split(state: ClusterState, uid: int) -> ClusterState:
    new = state.copy()
    del new.splits[uid]
    new.version += 1
    return new


def with_split_done(state: ClusterState, uid: int,
                    members: dict[int, tuple[str, ...]]) -> ClusterState:
    """Switch the model to the doubled table: new partitions p and p + P get ``members[p]``
    (old partition p's replicas whose copies are complete, leader first)."""
    new = state.copy()
    sp = new.splits.pop(uid)
    md = new.models.get((sp.model, sp.model_version)) or new.current(sp.model)
    for i, t in enumerate(md.tables):
        if t.table_uid == uid:
            md.tables[i].CopyFrom(sp.new_table)
    half = sp.new_table.num_partitions // 2
    for p in range(half):
        old = new.partitions.pop((uid, p))
        for q in (p, p + half):
            new.partitions[(sp.new_table.table_uid, q)] = PartitionRecord(members[p],
                                                                          old.epoch + 1)
    new.version += 1
    return new


class SplitRPCs:
    """Needs from the host: ``_lock``, ``_state``, ``_commit``, ``alive``, ``_stats``,
    ``_clock``, ``_cfg``."""

    def SplitTable(self, request, context):
        try:
            with self._lock:
                if request.cancel:
                    md = self._state.current(request.model)
                    uid = next((t.table_uid for t in md.tables if t.name == request.table),
                               None) if md else None
                    if uid not in self._state.splits:
                        raise NotFound(f"table {request.table!r} of model {request.model!r} "
                                       "is not being split")
                    sp = self._state.splits[uid]
                    self._commit(without_split(self._state, uid))
                    log.info("split of %s/%s cancelled", request.model, request.table)
                    return pb.SplitTableReply(split=sp, map_version=self._state.version)
                self._commit(with_split(self._state, request.model, request.table))
                sp = next(s for s in self._state.splits.values()
                          if s.model == request.model and s.table == request.table)
                log.info("splitting %s/%s: table_uid %d (%d partitions) -> table_uid %d (%d)",
                         sp.model, sp.table, sp.table_uid, sp.new_table.num_partitions // 2,
                         sp.new_table.table_uid, sp.new_table.num_partitions)
                return pb.SplitTableReply(split=sp, map_version=self._state.version)
        except ShoalError as e:
            abort_with(context, e)

    def _advance_splits(self) -> None:
        """One step of every split (freeze, cut over, or give up a freeze). Caller holds
        ``_lock``."""
        if not self._state.splits:
            return
        now = self._clock()
        alive = set(self.alive())
        for uid, sp in sorted(self._state.splits.items()):
            progress = {(s, pr.partition): pr for s, st in self._stats.items()
                        for pr in st.splits if pr.table_uid == uid}
            half = sp.new_table.num_partitions // 2
            recs = [self._state.partitions[(uid, p)] for p in range(half)]
            if not sp.frozen:
                if all(r in alive and (pr := progress.get((r, p))) is not None
                       and 0 <= pr.built_seq == pr.seq
                       for p, rec in enumerate(recs) for r in rec.replicas):
                    self._commit(with_frozen(self._state, uid, True))
                    self._split_frozen_at[uid] = now
                    log.info("split of %s/%s: every copy caught up; writes to the old table "
                             "paused for the cut-over (map version %d)", sp.model, sp.table,
                             self._state.version)
                continue
            frozen_at = self._split_frozen_at.setdefault(uid, now)
            members, waiting = {}, False
            # Only reports made at the current map count: a server that has applied it fences
            # every deposed leader, and the current leader is frozen, so no copy can move past
            # what it reports.
            current = {k: pr for k, pr in progress.items()
                       if pr.map_version >= self._state.version}
            for p, rec in enumerate(recs):
                lead = current.get((rec.replicas[0], p))
                if lead is None or lead.built_seq != lead.seq:
                    waiting = True
                    break
                members[p] = tuple(r for r in rec.replicas
                                   if (pr := current.get((r, p))) is not None
                                   and pr.built_seq == lead.seq)
                if len(members[p]) < len(rec.replicas) and \
                        now - frozen_at < LAGGARD_GRACE_S:
                    waiting = True
            if not waiting:
                self._commit(with_split_done(self._state, uid, members))
                self._split_frozen_at.pop(uid, None)
                log.info("split of %s/%s done: table_uid %d now serves with %d partitions "
                         "(map version %d; writes paused %.2f s)", sp.model, sp.table,
                         sp.new_table.table_uid, sp.new_table.num_partitions,
                         self._state.version, now - frozen_at)
            elif now - frozen_at > self._cfg.split_freeze_s:
                self._commit(with_frozen(self._state, uid, False))
                self._split_frozen_at.pop(uid, None)
                log.warning("split of %s/%s: copies did not finish within %.1f s of the "
                            "freeze; writes resume, and the split tries again", sp.model,
                            sp.table, self._cfg.split_freeze_s)
