"""A shard server's part in splitting a table (see ``coordinator.split``): for every old
partition p it holds a replica of, build the doubled table's partitions p and p + P from its
own copy, and keep them caught up with p's writes until the coordinator switches over.

Build: under the old table's write mutex, take a RocksDB snapshot of p and note the position
(seq, epoch) it ends at; store its rows into the new table, each under ``id & (2P - 1)``, as
paced background writes; then stamp both new partitions with that position. Catch up: apply
p's log entries after it, the same way, each with its position. If this server's log no longer
reaches back (or its copy of p was replaced), the build starts again. Nothing here is on a
request's path: lookups and writes of the old table go on, and the new table serves nothing
until the map says so. Soft state: after a restart the build starts over.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from shoal.errors import ShoalError
from shoal.proto import shoal_pb2 as pb

from shards.replog import NONE
from shards.service import ShardService

log = logging.getLogger("shard.split")
CHUNK_ROWS_BYTES = 2 << 20


class SplitBuilder:
    def __init__(self, service: ShardService, mib_per_s: float, interval_s: float = 0.1):
        self._svc = service
        self._rate = mib_per_s * 2**20
        self._interval = interval_s
        self._built: dict[tuple[int, int, int], tuple[int, int]] = {}  # (uid, p, uid2) -> pos

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval):
            try:
                self.step()
            except Exception:                  # the next pass starts that build again
                log.exception("split step failed")

    def step(self) -> None:
        """Advance every build this server has by one step; publish the progress."""
        svc = self._svc
        work = svc.split_work()
        for key in set(self._built) - set(work):
            del self._built[key]
        progress = {}
        for (uid, p, uid2) in work:
            try:
                pos = self._built.get((uid, p, uid2))
                if pos is None or not self._valid(uid, p, pos):
                    pos = self._copy(uid, p, uid2)
                if pos is not None:
                    pos = self._catch_up(uid, p, uid2, pos)
                if pos is None:
                    self._built.pop((uid, p, uid2), None)
                    continue
                self._built[(uid, p, uid2)] = pos
                mv, seq = self._head(uid, p)
            except ShoalError as e:       # the map moved on (cut over, cancelled) meanwhile
                log.info("split build of partition %d of table_uid %d stopped: %s", p, uid,
                         e.message)
                self._built.pop((uid, p, uid2), None)
                continue
            progress[(uid, p)] = pb.SplitProgress(table_uid=uid, partition=p,
                                                  built_seq=pos[0], seq=seq, map_version=mv)
        for (uid, p, uid2) in work:
            progress.setdefault((uid, p), pb.SplitProgress(table_uid=uid, partition=p,
                                                           built_seq=-1, seq=-1))
        svc.split_progress = progress

    def _head(self, uid: int, p: int) -> tuple[int, int]:
        """(map version, seq of old partition p), read in that order under the write mutex: a
        map that froze the table is applied (under the same mutex) before its version shows."""
        table = self._svc.held(uid)
        with table.write_mutex:
            mv = self._svc.map_version
            return mv, int(table.log.seq[p])

    def _valid(self, uid: int, p: int, pos: tuple[int, int]) -> bool:
        """This server's history of p still has the entry the build stands at."""
        table = self._svc.held(uid)
        with table.write_mutex:
            return table.log.epoch_at(p, pos[0]) == pos[1]

    def _copy(self, uid: int, p: int, uid2: int) -> tuple[int, int] | None:
        svc = self._svc
        table, new = svc.held(uid), svc.held(uid2)
        half = new.spec.num_partitions // 2
        with table.write_mutex:
            seq, epoch = int(table.log.seq[p]), int(table.log.epoch[p])
            if seq < 0:                          # this copy of p is itself being rebuilt
                return None
            snap = svc.store.snapshot_partition(uid, p)
        t0 = time.perf_counter()
        copied = 0
        try:
            if not svc.reset_split_partitions(uid2, (p, p + half)):
                return None
            per_chunk = max(1, CHUNK_ROWS_BYTES // table.spec.row_bytes)
            while True:
                ids, raw = snap.read(per_chunk)
                if not len(ids):
                    break
                rows = np.frombuffer(raw, dtype=table.spec.np_dtype).reshape(-1, table.spec.dim)
                if not svc.put_split_rows(uid2, ids, rows, None):
                    return None
                copied += len(raw)
                ahead = copied / self._rate - (time.perf_counter() - t0) if self._rate else 0
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            snap.close()
        if not svc.put_split_rows(uid2, np.zeros(0, np.int64), None, (p, seq, epoch)):
            return None
        log.info("split: copied partition %d of table_uid %d into partitions %d and %d of "
                 "table_uid %d (%.1f MiB, %.2f s, up to seq %d)", p, uid, p, p + half, uid2,
                 copied / 2**20, time.perf_counter() - t0, seq)
        return seq, epoch

    def _catch_up(self, uid: int, p: int, uid2: int,
                  pos: tuple[int, int]) -> tuple[int, int] | None:
        svc = self._svc
        table = svc.held(uid)
        for _ in range(8):              # bounded per step; the next step goes on
            with table.write_mutex:
                if int(table.log.seq[p]) == pos[0]:
                    return pos
                after = np.full(table.spec.num_partitions, NONE, dtype=np.int64)
                after[p] = pos[0]
                got = table.log.since(after, 4 << 20)
            if got is None:
                return None              # the log no longer reaches back: copy again
            for e in got[0]:
                i = int(np.searchsorted(e.parts, p))
                sel = e.row_parts == p
                at = (p, int(e.seqs[i]), int(e.epochs[i]))
                if not svc.put_split_rows(uid2, e.ids[sel], e.rows[sel], at):
                    return None
                pos = (at[1], at[2])
        return pos
