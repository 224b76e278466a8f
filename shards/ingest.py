"""Bulk loads and their verification on a shard server: ``Ingest`` (a load's chunk, sent as
rows or as SST files spooled on this host, stored as SST files with a per-partition ingest
record) and ``Checksums`` (per-partition checksums, from the records where they cover the
partition, else a scan). A mixin of ``ShardService``.
"""
from __future__ import annotations

import logging
import os
import time

import grpc
import numpy as np

from embeddings.checksum import row_checksums
from embeddings.specs import check_ids
from shoal.errors import InvalidArgument, ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.wire import WithTensor, pack, unpack

from shards import spool
from shards.held import HeldTable
from shards.storage import StorageError, key_array

log = logging.getLogger("shard")


class IngestPath:
    """Needs from the host: ``server_id``, ``_store``, ``_cfg``, ``_enter``, ``_table``,
    ``_check``, ``_to_memory``, ``_on_disk``, ``_spool_dir``, ``_host_id``, ``last_bulk_write``."""

    def ingest(self, request: pb.IngestRequest) -> pb.IngestReply:
        """Store bulk rows of a loading version's table on this replica (see IngestRequest)."""
        self._enter(request.map_version)
        table = self._table(request.table_uid)
        spec = table.spec
        if not table.loading:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"table {spec.name!r} (table_uid {spec.table_uid}) is not of a "
                             "loading version; Ingest only fills a version being loaded (use "
                             "WriteRows)")
        if len(request.files):
            return self._ingest_spooled(table, request)
        ids = unpack(request.ids, "ids", "int64", 1)
        rows = request.tensor("rows", spec.dtype, 2) if isinstance(request, WithTensor) else \
            unpack(request.rows, "rows", spec.dtype, 2)
        if rows.shape != (len(ids), spec.dim):
            raise InvalidArgument(f"rows: shape {list(rows.shape)} must be [{len(ids)}, "
                                  f"{spec.dim}]")
        check_ids(ids, spec, "ids")
        if not (ids[1:] > ids[:-1]).all() and len(np.unique(ids)) != len(ids):
            raise InvalidArgument("ids: must be unique within one ingest")   # (sorted: O(n))
        if not len(ids):
            return pb.IngestReply(rows=0)
        lo, hi = (request.lo, request.hi) if request.hi else (int(ids.min()), int(ids.max()) + 1)
        if not 0 <= lo < hi or ids.min() < lo or ids.max() >= hi:
            raise InvalidArgument(f"lo, hi: ids span [{int(ids.min())}, {int(ids.max()) + 1}), "
                                  f"which must lie within [lo, hi) = [{lo}, {hi}), lo >= 0")
        parts = self._check(table, ids, request.routed)
        # The files are written and synced outside the lock: the next chunk's are built while
        # this one's wait for the disk. The routing is checked again under the lock.
        prepared = self._store.prepare_ingest(spec.table_uid, parts, ids, rows, lo, hi)
        return self._commit_ingest(table, ids, parts, rows, request.routed, prepared)

    def _ingest_spooled(self, table: HeldTable, request: pb.IngestRequest) -> pb.IngestReply:
        """Ingest's ``files`` form (``shards.spool``): each file checked and read, then linked
        in; the rows read feed the ingest records and the memory tier."""
        spec = table.spec
        P, lo, hi = spec.num_partitions, int(request.lo), int(request.hi)
        rows_given = request.given if isinstance(request, WithTensor) else \
            request.HasField("rows")
        if rows_given or request.HasField("ids"):
            raise InvalidArgument("files: given with ids or rows; send one or the other")
        if not 0 <= lo < hi <= spec.num_embeddings:
            raise InvalidArgument(f"lo, hi: [{lo}, {hi}) must lie within [0, "
                                  f"{spec.num_embeddings}) of table {spec.name!r}, lo < hi")
        parts = np.array([f.partition for f in request.files], np.int64)
        if parts.min() < 0 or parts.max() >= P or len(np.unique(parts)) != len(parts):
            raise InvalidArgument(f"files: partitions {parts.tolist()} must be distinct, each "
                                  f"in [0, {P})")
        counts = spool.chunk_counts(lo, hi, parts, P)
        if not counts.all():
            raise InvalidArgument(f"files: [{lo}, {hi}) holds no id of partition "
                                  f"{int(parts[np.argmin(counts)])}")
        self._limit(int(counts.sum()))
        per = [spool.chunk_ids(lo, hi, p, P) for p in parts.tolist()]
        ids = np.concatenate(per)
        routed_parts = self._check(table, ids, request.routed)
        rows = np.empty((len(ids), spec.dim), spec.np_dtype)
        raw = rows.view(np.uint8).reshape(len(ids), spec.row_bytes)
        fds, at = [], 0
        try:
            for i, (f, p, n) in enumerate(zip(request.files, parts.tolist(), counts.tolist())):
                fds.append(spool.open_spooled(self._spool_dir, f.path,
                                              key_array(spec.table_uid, p, per[i]),
                                              raw[at: at + n], f"files[{i}]"))
                at += n
            try:
                prepared = self._store.prepare_linked_ingest(spec.table_uid, routed_parts, ids,
                                                             rows, lo, hi, fds)
            except OSError as e:        # another file system (EXDEV), a full disk
                raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"files: cannot link {request.files[0].path!r} into "
                                 f"{self.server_id}'s store: {e.strerror}") from None
        finally:
            for fd in fds:
                os.close(fd)
        return self._commit_ingest(table, ids, routed_parts, rows, request.routed, prepared)

    def _commit_ingest(self, table: HeldTable, ids, parts, rows, routed,
                       prepared) -> pb.IngestReply:
        try:
            self._commit_prepared(table, ids, parts, rows, routed, prepared)
        finally:
            prepared.discard()
        self.last_bulk_write = time.monotonic()
        return pb.IngestReply(rows=len(ids))

    def _commit_prepared(self, table: HeldTable, ids, parts, rows, routed, prepared) -> None:
        spec = table.spec
        with table.write_mutex:         # the map (epochs, learners) cannot change meanwhile
            self._check_routing(table, routed)
            for server, learning in table.learners.items():
                busy = learning[parts]
                if busy.any():
                    p = int(parts[np.flatnonzero(busy)[0]])
                    raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                                     f"partition {p} of table {spec.name!r} has a copy being "
                                     f"built on {server}: its rows must go through the "
                                     "leader's write path (WriteRows), not Ingest")
            mine = np.flatnonzero(np.bincount(parts, minlength=spec.num_partitions))
            new = np.array([p for p in mine.tolist() if (spec.table_uid, p) not in self._on_disk],
                           np.int64)
            positions = (new, table.log.seq[new].copy(), table.log.epoch[new].copy()) \
                if len(new) else None      # the position marks the copy as stored
            try:
                prepared.commit(positions)
            except StorageError as e:
                raise ShoalError(grpc.StatusCode.DATA_LOSS, f"ingest into table {spec.name!r} "
                                 f"on {self.server_id}: {e}") from None
            self._on_disk.update((spec.table_uid, int(p)) for p in new)
            self._to_memory(table, parts, ids, rows)

    def checksums(self, request: pb.ChecksumsRequest) -> pb.ChecksumsReply:
        """Checksums of stored partitions (``embeddings.checksum``): from a partition's ingest
        records if asked (``recorded``) and they account for it, else read from RocksDB."""
        parts = np.asarray(request.partitions, dtype=np.int64)
        if len(parts) > 65536 or (parts.size and parts.min() < 0):
            raise InvalidArgument(f"partitions: {len(parts)} partitions, must be 0..65536 "
                                  "values, each >= 0")
        sums = np.zeros(len(parts), np.uint64)
        counts = np.zeros(len(parts), np.int64)
        scanned = np.zeros(len(parts), np.int32)
        for i, p in enumerate(parts.tolist()):
            if (request.table_uid, p) not in self._on_disk:
                continue
            got = self._recorded(request.table_uid, p) if request.recorded else None
            if got is not None:
                sums[i], counts[i] = got
                continue
            ids, raw = self._store.scan_partition(request.table_uid, p)
            scanned[i] = 1
            if len(ids):
                rows = np.frombuffer(raw, np.uint8).reshape(len(ids), -1)
                sums[i] = row_checksums(ids, rows).sum(dtype=np.uint64)
                counts[i] = len(ids)
        return pb.ChecksumsReply(checksums=pack(sums.view(np.int64)), rows=pack(counts),
                                 scanned=pack(scanned))

    def _recorded(self, table_uid: int, p: int) -> tuple[int, int] | None:
        """(checksum, rows) of a partition from its ingest records, if they account for every
        row it stores: no sequenced write ever touched it (its sequence is 0: a write through
        the leader, a replayed log or an installed snapshot would have moved it or dropped the
        records), and no two records overlap (ingests of different chunkings)."""
        table = self._tables.get(table_uid)
        if table is None or p >= table.spec.num_partitions:
            return None
        with table.write_mutex:
            if int(table.log.seq[p]) != 0:
                return None
            rec = self._store.ingest_records(table_uid, p)
        if not len(rec) or (rec["lo"][1:] < rec["hi"][:-1]).any():
            return None
        with np.errstate(over="ignore"):
            return int(rec["checksum"].sum(dtype=np.uint64)), int(rec["rows"].sum())
