"""The write side of a shard server: leading writes, applying a leader's entries, and serving a
learner its snapshot and catch-up. A mixin of ``ShardService``; everything here runs in a
thread, holds the table's write mutex while it reads or changes the log, and raises ShoalError.

A leader gives each write the next sequence number of every partition it touches, stores it
(rows and positions in one atomic batch), appends it to its log, and returns a ``LeadPlan``: the
entries each peer must get. ``shards.leader`` sends them and acknowledges the write once every
peer has them. Peers are the partition's other replicas and the learners attached to it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from shoal.errors import InvalidArgument, ResourceExhausted, StaleMap, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.serving import trim_heap
from shoal.wire import pack, unpack

from shards.replog import NONE, Entry
from shards.storage import RowStore


log = logging.getLogger("shard.writes")


@dataclass
class Target:
    server_id: str
    address: str
    request: pb.ReplicateRequest
    partitions: np.ndarray       # int32: the partitions it is sent


@dataclass
class LeadPlan:
    table_uid: int
    entries: list[Entry]         # this write's entries (earlier ones too, for a resent write)
    written: int
    targets: list[Target]


class WritePath:
    """Needs from the host: ``server_id``, ``_store``, ``_cfg``, ``_addresses``, ``_enter``,
    ``_table``, ``_check``, ``_put``, ``map_version``, ``_on_disk``, ``wait_promoted``."""

    _store: RowStore

    # ------------------------------------------------------------ leader
    def lead_write(self, request: pb.WriteRowsRequest) -> LeadPlan:
        self._enter(request.map_version)
        table = self._table(request.table_uid)
        spec = table.spec
        ids = unpack(request.ids, "ids", "int64", 1)
        rows = unpack(request.rows, "rows", spec.dtype, 2)
        if rows.shape != (len(ids), spec.dim):
            raise InvalidArgument(f"rows: shape {list(rows.shape)} must be [{len(ids)}, "
                                  f"{spec.dim}] (one row of dim {spec.dim} per id)")
        if len(ids) > self._cfg.max_ids_per_request:
            raise ResourceExhausted(f"ids: {len(ids)} ids exceed max_ids_per_request "
                                  f"{self._cfg.max_ids_per_request}")
        if len(np.unique(ids)) != len(ids):
            raise InvalidArgument("ids: must be unique within one write")
        with table.write_mutex:             # the checks, the sequence and the store are one step
            row_parts = self._check(table, ids, request.routed)
            if table.frozen:
                raise Unavailable(f"table {spec.name!r} is being split: its writes pause for "
                                  "the cut-over to the new partitions; retry shortly")
            routed = unpack(request.routed.partitions, "routed.partitions", "int32", 1)
            self._check_leader(table, routed)
            mine = np.zeros(spec.num_partitions, dtype=bool)
            mine[routed] = True
            entries = [r for e in table.log.by_request(request.request_id)
                       if (r := e.restrict(mine)) is not None]
            covered = np.zeros(spec.num_partitions, dtype=bool)
            for e in entries:
                covered[e.parts] = True
            fresh = ~covered[row_parts]
            if fresh.any():
                if not fresh.all():     # a resend: partitions applied the first time are done
                    ids, rows, row_parts = ids[fresh], rows[fresh], row_parts[fresh]
                e = table.log.next_entry(request.request_id, table.epochs, ids, rows, row_parts)
                self._put(table, e.row_parts, e.ids, e.rows, (e.parts, e.seqs, e.epochs))
                table.log.append(e)
                entries.append(e)
            plan = LeadPlan(spec.table_uid, entries, int(fresh.size), [])
            plan.targets = self._targets(table, entries)
        if len(ids) >= self._cfg.sst_threshold_rows:
            trim_heap()
        return plan

    def replan(self, plan: LeadPlan, done: set[str]) -> LeadPlan:
        """The plan's entries for the peers the current map gives, less those in ``done``;
        StaleMap if this server no longer leads every partition involved."""
        table = self._table(plan.table_uid)
        with table.write_mutex:
            parts = np.unique(np.concatenate([e.parts for e in plan.entries]))
            self._check_leader(table, parts)
            targets = [t for t in self._targets(table, plan.entries) if t.server_id not in done]
        return LeadPlan(plan.table_uid, plan.entries, plan.written, targets)

    def _check_leader(self, table, parts: np.ndarray) -> None:
        not_led = parts[~table.leads[parts]]
        if not_led.size:
            p = int(not_led[0])
            raise StaleMap(f"server {self.server_id} does not lead partition {p} of table "
                           f"{table.spec.name!r} at map version {self.map_version} (leader: "
                           f"{table.leader_of.get(p) or 'none here'})", self.map_version,
                           int(table.epochs[p]))

    def _targets(self, table, entries: list[Entry]) -> list[Target]:
        out = []
        for server in sorted(set(table.peers) | set(table.attached)):
            mask = table.peers.get(server, table.no_parts) | \
                (table.attached.get(server, table.no_parts) & table.learner_mask(server))
            sub = [r for e in entries if (r := e.restrict(mask)) is not None]
            if not sub or server not in self._addresses:
                continue
            parts = np.unique(np.concatenate([e.parts for e in sub])).astype(np.int32)
            out.append(Target(server, self._addresses[server], pb.ReplicateRequest(
                map_version=self.map_version, table_uid=table.spec.table_uid,
                leader=self.server_id, routed=pb.PartitionEpochs(
                    partitions=pack(parts), epochs=pack(table.epochs[parts])),
                entries=[e.to_proto() for e in sub]), parts))
        return out

    def catch_up_request(self, table_uid: int, partitions: np.ndarray,
                         seqs: np.ndarray) -> pb.ReplicateRequest | None:
        """The entries a peer that is behind lacks (``partitions`` after ``seqs``); None when
        the log no longer reaches back that far."""
        table = self._table(table_uid)
        after = np.full(table.spec.num_partitions, NONE, dtype=np.int64)
        after[partitions] = seqs
        with table.write_mutex:
            self._check_leader(table, partitions)
            got = table.log.since(after)
            if got is None:
                return None
            parts = np.unique(partitions).astype(np.int32)
            return pb.ReplicateRequest(
                map_version=self.map_version, table_uid=table_uid, leader=self.server_id,
                routed=pb.PartitionEpochs(partitions=pack(parts),
                                          epochs=pack(table.epochs[parts])),
                entries=[e.to_proto() for e in got[0]])

    # ------------------------------------------------------------ follower
    def replicate(self, request: pb.ReplicateRequest) -> pb.ReplicateReply:
        # A copy being promoted takes the promoting map first: the entry is then checked
        # against it (a deposed leader's is refused, as by every other replica).
        self.wait_promoted(request.table_uid,
                           unpack(request.routed.partitions, "routed.partitions", "int32", 1))
        self._enter(request.map_version)
        table = self._table(request.table_uid)
        spec = table.spec
        entries = [Entry.from_proto(e, spec.num_partitions, spec.dtype, spec.dim,
                                    f"entries[{i}]") for i, e in enumerate(request.entries)]
        with table.write_mutex:
            ids = np.concatenate([e.ids for e in entries]) if entries else np.zeros(0, np.int64)
            self._check(table, np.unique(ids), request.routed)   # epochs: fence old leaders
            routed = unpack(request.routed.partitions, "routed.partitions", "int32", 1)
            for p in np.unique(routed).tolist():
                if table.leader_of.get(p) != request.leader:
                    raise StaleMap(f"{request.leader} sent entries of partition {p} of table "
                                   f"{spec.name!r}, which {table.leader_of.get(p) or 'nobody'}"
                                   f" leads at map version {self.map_version}",
                                   self.map_version, int(table.epochs[p]))
            for e in entries:
                if not np.isin(e.parts, routed).all():
                    raise InvalidArgument("entries: a partition is missing from routed")
            applied, behind, diverged = self._apply_entries(table, entries)
        return pb.ReplicateReply(
            applied_rows=applied, behind_partitions=pack(behind.astype(np.int32)),
            behind_seqs=pack(table.log.seq[behind]),
            diverged_partitions=pack(diverged.astype(np.int32)))

    def _apply_entries(self, table, entries: list[Entry]):
        """Apply each entry's partitions that come next; (rows applied, behind, diverged)."""
        applied = 0
        behind, diverged = set(), set()
        for e in entries:
            new, late, bad = table.log.classify(e)
            behind.update(e.parts[late].tolist())
            diverged.update(e.parts[bad].tolist())
            if new.any():
                keep = np.zeros(table.spec.num_partitions, dtype=bool)
                keep[e.parts[new]] = True
                r = e.restrict(keep)
                try:
                    self._put(table, r.row_parts, r.ids, r.rows, (r.parts, r.seqs, r.epochs))
                except BaseException:
                    table.missed[r.parts] = True     # the leader acknowledges without us
                    raise
                table.missed[r.parts] = False        # (entries apply in order: no gap left)
                table.log.append(r)
                applied += len(r.ids)
        behind -= diverged
        return (applied, np.array(sorted(behind), dtype=np.int64),
                np.array(sorted(diverged), dtype=np.int64))

    # ------------------------------------------------------------ leader, for learners
    def catch_up(self, request: pb.CatchUpRequest) -> pb.CatchUpReply:
        self._enter(request.map_version)
        table = self._table(request.table_uid)
        p = request.partition
        self._check_partition(table, p)
        with table.write_mutex:
            self._check_leader(table, np.array([p]))
            if not table.learner_mask(request.learner)[p]:
                raise StaleMap(f"{request.learner} is not a learner of partition {p} of "
                               f"table {table.spec.name!r} at map version "
                               f"{self.map_version}", self.map_version, int(table.epochs[p]))
            log = table.log
            if request.after_seq > log.seq[p] or \
                    log.epoch_at(p, request.after_seq) != request.after_epoch:
                return pb.CatchUpReply(unavailable=True)
            after = np.full(table.spec.num_partitions, NONE, dtype=np.int64)
            after[p] = request.after_seq
            got = log.since(after, request.max_bytes or (4 << 20))
            if got is None:
                return pb.CatchUpReply(unavailable=True)
            entries, complete = got
            if complete:             # at the head: every later write goes to it too
                table.attach(request.learner, p)
            head = int(log.seq[p])
        return pb.CatchUpReply(entries=[e.to_proto() for e in entries], attached=complete,
                               head_seq=head)

    def open_snapshot(self, table_uid: int, partition: int, map_version: int, learner: str):
        """(PartitionSnapshot, seq, epoch): the partition as it is between two writes, and the
        position of the last entry in it. The caller closes the snapshot."""
        self._enter(map_version)
        table = self._table(table_uid)
        self._check_partition(table, partition)
        with table.write_mutex:
            self._check_leader(table, np.array([partition]))
            table.detach(learner, partition)
            t0 = time.perf_counter()
            snap = self._store.snapshot_partition(table_uid, partition,
                                                  self._cfg.snapshot == "checkpoint")
            log.info("%s snapshot for %s's copy of partition %d of table %r: %.1f ms",
                     self._cfg.snapshot, learner, partition, table.spec.name,
                     (time.perf_counter() - t0) * 1e3)
            return snap, int(table.log.seq[partition]), int(table.log.epoch[partition])

    def _check_partition(self, table, p: int) -> None:
        if not 0 <= p < table.spec.num_partitions:
            raise InvalidArgument(f"partition: {p} is not in [0, {table.spec.num_partitions})")

    # ------------------------------------------------------------ learner
    def position(self, table_uid: int, partition: int) -> tuple[int, int] | None:
        """(seq, epoch) of a complete copy of the partition held on disk, else None."""
        table = self._table(table_uid)
        with table.write_mutex:
            seq = int(table.log.seq[partition])
            if (table_uid, partition) not in self._on_disk or seq < 0:
                return None
            return seq, int(table.log.epoch[partition])

    def reset_partition(self, table_uid: int, partition: int) -> None:
        """Drop this server's copy of a partition before a snapshot is installed; marked
        incomplete (seq -1) until ``finish_snapshot``."""
        table = self._table(table_uid)
        with table.write_mutex, table.lock.write():
            self._empty_copy(table, partition)

    def _empty_copy(self, table, partition: int) -> None:
        """Drop this server's rows of a partition and mark its copy incomplete (seq -1).
        Caller holds ``table.write_mutex`` and the arena's write lock."""
        uid = table.spec.table_uid
        if (uid, partition) in self._on_disk:
            self._store.drop_partition(uid, partition)
        self._store.set_position(uid, partition, -1, 0)
        self._on_disk.add((uid, partition))
        table.log.reset(partition, -1, 0)
        table.missed[partition] = False
        table.written[partition] += 1
        if table.arena.resident(partition):
            table.arena.clear(partition)
        if table.cache is not None:
            with table.cache_lock:
                table.cache.drop_partitions([partition])

    def install_rows(self, table_uid: int, partition: int, ids: np.ndarray,
                     rows: np.ndarray) -> None:
        """Store a run of snapshot rows as a background write: one that backs off rather than
        wait, holding the GIL, for RocksDB to catch up."""
        table = self._table(table_uid)
        with table.write_mutex:
            self._put(table, np.full(len(ids), partition, dtype=np.int64), ids, rows,
                      background=True)

    def finish_snapshot(self, table_uid: int, partition: int, seq: int, epoch: int) -> None:
        table = self._table(table_uid)
        with table.write_mutex:
            self._store.set_position(table_uid, partition, seq, epoch)
            table.log.reset(partition, seq, epoch)

    def apply_caught_up(self, table_uid: int, entries: list[pb.LogEntry]) -> tuple[int, bool]:
        """Apply catch-up entries from the leader; (rows applied, whether all applied)."""
        table = self._table(table_uid)
        spec = table.spec
        parsed = [Entry.from_proto(e, spec.num_partitions, spec.dtype, spec.dim)
                  for e in entries]
        with table.write_mutex:
            applied, behind, diverged = self._apply_entries(table, parsed)
        return applied, not behind.size and not diverged.size
