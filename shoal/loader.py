"""Loading a sharded checkpoint into the cluster as a new model version.

``load(client, path, model)``: open the checkpoint (``embeddings.checkpoint``), find its
embedding tables, create the model (version 1) or its next version, both "loading" (written,
not servable: queries keep getting the current version), and stream every table's rows in
bounded chunks (``chunk_bytes``; the loader holds a few chunks, never a table). Each chunk goes
to every replica directly (``Ingest``, with an ingest record of the chunk's checksums): to the
replicas on this host as SST files the loader writes once, one per partition, which each of
them checks and links in (``shards.spool``); to the others as rows, which they write as SST
files themselves. Pipelined so the loader reads the next chunk while the servers store the last
ones (MoE checkpoints: ``shoal.moe_loader``, an expert at a time); partitions with a copy being
built, and any
replica that refuses or fails, take the routers' replicated write path instead. Then verify:
every replica's per-partition checksums must equal the source's, computed while streaming
(answered from the ingest records, or by a scan where other writes touched a partition). The
dense parameters (every other tensor) are stored with the version (``client.dense(model,
version)``). Only then is the version marked ready and made current (one map change).

A load that fails or is interrupted leaves its version "loading", never visible to queries.
``resume=True`` reads the checkpoint's checksums again (it may have been repaired), compares
every replica, and rewrites only the partitions that are not complete everywhere;
``client.update_version(model, v, drop=True)`` deletes the version instead.
"""
from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
import torch

from embeddings.checkpoint import CheckpointError, dense_keys, embedding_tables, open_checkpoint
from embeddings.checksum import partition_checksums
from embeddings.partition import rows_in_partition
from embeddings.specs import TableSpec
from shards import spool
from shoal.errors import ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.serving import heap_kept
from shoal.wire import pack

log = logging.getLogger("shoal.loader")
TRANSFERS = ("auto", "rows")     # how chunks reach the replicas (see Sink)
DEFAULT_CHUNK_BYTES = 16 << 20   # the loader's peak memory is about 10 chunks
DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "float32",
          torch.float64: "float32"}


@dataclass
class LoadProgress:
    rows_done: int = 0
    rows_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    started: float = field(default_factory=time.monotonic)
    table: str = ""

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.bytes_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float:
        return (self.bytes_total - self.bytes_done) / self.rate if self.rate else float("inf")


@dataclass
class LoadResult:
    model: str
    version: int
    tables: dict[str, int]          # table -> rows
    bytes: int
    seconds: float
    dense: list[str]                # dense parameter keys, stored with the version
    skipped_partitions: int = 0     # a resume's partitions already complete on every replica
    expert_layers: list[str] = field(default_factory=list)    # an MoE checkpoint's layers
    skipped_layers: list[str] = field(default_factory=list)   # ... and those not MoE
    spooled_files: int = 0          # SST files replicas linked in from the loader's spool


def load(client, path: str, model: str, version: int = 0, format: str = "auto",
         mapping: dict[str, str] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
         make_current: bool = True, resume: bool = False,
         progress: Callable[[LoadProgress], None] | None = None,
         direct: bool = True, transfer: str = "auto", dense_part=None) -> LoadResult:
    """Load the checkpoint at ``path`` as a new version of ``model`` (see the module doc).
    ``version``: a loading version to fill or rewrite (e.g. one created with its tables by
    ``create_model(..., loading=True)``); 0: the next version (with ``resume``: the newest
    loading one).
    ``direct``: send each replica its rows itself (``Ingest``), in parallel; else (and for any
    chunk a replica fails) through the routers' replicated write path.
    ``transfer``: "auto": replicas on this host link SST files the loader writes once
    (``shards.spool``), others get rows; "rows": every replica gets rows.
    ``dense_part``: a ``shoal.DensePart`` stored with the version (what ``predict`` runs,
    e.g. ``DensePart.dlrm(features)`` for a TorchRec DLRM's checkpoint)."""
    with open_checkpoint(path, format) as reader:
        infos = reader.tensors()
        tables = embedding_tables(infos, mapping)
        if not tables and not mapping:
            from shoal.moe_loader import is_moe_checkpoint, load_moe
            if is_moe_checkpoint(path, infos):
                return load_moe(client, reader, path, model, version, chunk_bytes,
                                make_current, resume, progress, direct, transfer)
        if not tables:
            raise CheckpointError(f"{path}: no embedding tables found (keys like "
                                  "'...embedding_bags.<name>.weight'); pass a mapping",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        specs = []
        for name, key in sorted(tables.items()):
            info = infos[key]
            if info.dtype not in DTYPES:
                raise CheckpointError(f"{', '.join(info.files)}: tensor {key!r} has dtype "
                                      f"{info.dtype}; embedding tables must be floating point")
            specs.append(TableSpec(name=name, num_embeddings=info.shape[0], dim=info.shape[1],
                                   dtype=DTYPES[info.dtype], feature_names=(name,)))
        md = _target_version(client, model, version, specs, infos, tables, resume)
        placed = {t.name: t for t in md.tables}
        missing = [n for n in placed if n not in tables]
        if missing:
            raise CheckpointError(f"{path}: no tensor for table(s) {missing} of model "
                                  f"{model!r} v{md.version} (checkpoint tables: "
                                  f"{sorted(tables)}); pass a mapping",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        for n, t in placed.items():
            if infos[tables[n]].shape[0] != t.num_embeddings:
                key = tables[n]
                raise CheckpointError(f"{', '.join(infos[key].files)}: tensor {key!r} has "
                                      f"{infos[key].shape[0]} rows but table {n!r} of model "
                                      f"{model!r} v{md.version} has {t.num_embeddings}",
                                      grpc.StatusCode.INVALID_ARGUMENT)
        source: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        done: dict[str, np.ndarray] = {}       # partitions every replica already holds exactly
        if resume:                             # the source may have been repaired: read it
            source = {n: _source_checksums(reader, tables[n], t, chunk_bytes)
                      for n, t in placed.items()}
            done = {n: ~bad for n, bad in _mismatches(client, md, source).items()}
        todo = {n: ~done[n] if n in done else np.ones(t.num_partitions, bool)
                for n, t in placed.items()}
        rows = {n: sum(rows_in_partition(t.num_embeddings, t.num_partitions, p)
                       for p in np.flatnonzero(todo[n]).tolist()) for n, t in placed.items()}
        prog = LoadProgress(rows_total=sum(rows.values()),
                            bytes_total=sum(rows[n] * TableSpec.from_proto(t).row_bytes
                                            for n, t in placed.items()))
        attempt = uuid.uuid4().hex[:12]
        # Each chunk's buffers reuse the last one's pages; freed memory past a few chunks, and
        # all of it at the end, goes back to the OS: the loader's memory stays a few chunks.
        with heap_kept(2 * chunk_bytes), \
            Sink(client, model, md.version, direct, transfer) as sink:
            for name, t in placed.items():
                if not todo[name].any():
                    continue
                prog.table = name
                sums = _stream_table(sink, reader, tables[name], t, chunk_bytes, prog,
                                     progress, attempt, todo[name])
                source.setdefault(name, sums)
        dense = dense_keys(infos, tables)
        if dense or dense_part is not None:
            _check_dense_size(infos, dense, path)
            client.put_dense(model, md.version, {k: reader.read(k) for k in dense}, dense_part)
        _verify(client, md, source)
        client.update_version(model, md.version, ready=True, make_current=make_current)
        return LoadResult(model, md.version, {n: t.num_embeddings for n, t in placed.items()},
                          prog.bytes_done, prog.seconds, dense,
                          sum(int(d.sum()) for d in done.values()),
                          spooled_files=sink.files_sent)


def _check_dense_size(infos, dense: list[str], path: str) -> None:
    from shoal.config import MAX_MESSAGE_BYTES
    nbytes = sum(int(np.prod(infos[k].shape)) * 8 for k in dense)   # at most 8 bytes a value
    if nbytes > MAX_MESSAGE_BYTES // 2:
        big = max(dense, key=lambda k: int(np.prod(infos[k].shape)))
        raise CheckpointError(f"{path}: the dense parameters ({len(dense)} tensors, up to "
                              f"{nbytes / 2**20:,.0f} MiB, the largest {big!r}) exceed the "
                              f"{MAX_MESSAGE_BYTES // 2 / 2**20:,.0f} MiB a version can keep; "
                              "is a table missing from the mapping?",
                              grpc.StatusCode.INVALID_ARGUMENT)


def _target_version(client, model: str, version: int, specs: list[TableSpec], infos, tables,
                    resume: bool) -> pb.ModelSpec:
    versions = [md for md in client.models() if md.name == model]
    named = next((md for md in versions if md.version == version), None) if version else None
    if named is not None and named.state == "loading":
        return _check_dims(named, specs, infos, tables)   # fill a version created loading
    if resume:
        loading = [md for md in versions if md.state == "loading"]
        if not loading:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"model {model!r} has no loading version {version or ''} to "
                             f"resume (versions: {[(m.version, m.state) for m in versions]})")
        return _check_dims(loading[-1], specs, infos, tables)
    if version:
        raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"version: {version} of model {model!r} is not loading (a load "
                         "creates the next version, or fills one created loading)")
    current = next((md for md in versions if md.current), None)
    if current is not None:
        _check_dims(current, specs, infos, tables)
    if not versions:
        spec = pb.ModelSpec(name=model, tables=[s.to_proto() for s in specs], state="loading")
        return client.create_model_spec(spec)
    return client.create_version(model, specs)


def _check_dims(md: pb.ModelSpec, specs: list[TableSpec], infos, tables) -> pb.ModelSpec:
    """``md`` if every checkpoint table it has is of the same dim (else a clear error)."""
    have = {t.name: t for t in md.tables}
    for s in specs:
        old = have.get(s.name)
        if old is not None and old.dim != s.dim:
            key = tables[s.name]
            raise CheckpointError(
                f"{', '.join(infos[key].files)}: tensor {key!r} has dim {s.dim} but table "
                f"{s.name!r} of model {md.name!r} (version {md.version}) has dim {old.dim}",
                grpc.StatusCode.INVALID_ARGUMENT)
    return md


def _chunks(reader, key: str, t: pb.TableSpec, chunk_bytes: int):
    """(ids, rows as a numpy array of the table's dtype) of the table, a chunk at a time."""
    dtype = torch.float16 if t.dtype == "float16" else torch.float32
    step = max(1, chunk_bytes // TableSpec.from_proto(t).row_bytes)
    for lo in range(0, t.num_embeddings, step):
        hi = min(lo + step, t.num_embeddings)
        yield np.arange(lo, hi, dtype=np.int64), \
            reader.read_rows(key, lo, hi).to(dtype).contiguous().numpy()


class _SourceSums:
    """(checksums, rows) per partition of a table's rows in the checkpoint, summed a chunk at
    a time."""

    def __init__(self, num_partitions: int):
        self.P = num_partitions
        self.sums = np.zeros(num_partitions, np.uint64)
        self.counts = np.zeros(num_partitions, np.int64)

    def add(self, ids: np.ndarray, rows: np.ndarray) -> None:
        s, c = partition_checksums(ids, rows, ids & (self.P - 1), self.P)
        with np.errstate(over="ignore"):
            self.sums += s
        self.counts += c


def _source_checksums(reader, key: str, t: pb.TableSpec,
                      chunk_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(checksums, rows) per partition of the table in the checkpoint, read a chunk at a time."""
    acc = _SourceSums(t.num_partitions)
    for ids, rows in _chunks(reader, key, t, chunk_bytes):
        acc.add(ids, rows)
    return acc.sums, acc.counts


def _stream_table(sink: "Sink", reader, key: str, t: pb.TableSpec,
                  chunk_bytes: int, prog: LoadProgress, progress, attempt: str,
                  todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write the rows of the table's partitions ``todo`` (bool per partition); (checksums,
    rows) per partition of the whole table in the checkpoint. Each chunk's idempotency key is
    unique to this attempt (``attempt``): a resume may bring other rows for the same range (a
    repaired checkpoint), which must not be taken for a resend."""
    acc = _SourceSums(t.num_partitions)
    row_bytes = TableSpec.from_proto(t).row_bytes
    for ids, rows in _chunks(reader, key, t, chunk_bytes):
        request_id = f"load/{attempt}/{t.table_uid}/{int(ids[0])}"
        if todo.all():
            sink.write(t, ids, rows, request_id)
            sent = len(ids)
        else:                                   # a resume: only the incomplete partitions
            sel = todo[ids & (t.num_partitions - 1)]
            sent = int(sel.sum())
            if sent:
                sink.write(t, ids[sel], rows[sel], request_id)
        acc.add(ids, rows)
        prog.rows_done += sent
        prog.bytes_done += sent * row_bytes
        if progress is not None:
            progress(prog)
    return acc.sums, acc.counts


class Sink:
    """Where a load's chunks go: each replica directly (``Ingest``, servers in parallel), or,
    for partitions with a copy being built (a learner would miss rows that bypass the leader's
    log) and for any replica that refuses or fails, the routers' write path (leader, log,
    replicas). Replicas on this host whose spool directory the loader can write get the chunk
    as SST files written once, one per partition, which each of them checks and links in
    (``shards.spool``); others get the rows (``transfer="rows"``: every replica does).
    Pipelined: ``write`` sends a chunk, then waits for the one before it, so the loader reads
    the next chunk while the servers store the last ones (``IN_FLIGHT``). Requests carry each
    partition's epoch: a server whose replica set changed since this map refuses them (the map
    is then read again), so no new replica misses a chunk."""

    IN_FLIGHT = 2        # chunks left in flight while the next is sent (each costs ~4 chunks of memory)

    def __init__(self, client, model: str, version: int, direct: bool, transfer: str = "auto"):
        if transfer not in TRANSFERS:
            raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"transfer: {transfer!r} is not one of {', '.join(TRANSFERS)}")
        self._client, self._model, self._version, self._direct = client, model, version, direct
        self._transfer = transfer
        self._channels: dict[str, object] = {}
        self._map: pb.ShardMap | None = None      # read again after a refusal
        self._pending: collections.deque = collections.deque()     # chunks in flight
        self._spool: str | None = None            # this load's directory in the servers' spool
        self._file_servers: set[str] | None = None   # None: not asked yet
        self.files_sent = 0                       # spooled SST files linked in by a replica

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.flush()
        finally:
            for ch in self._channels.values():
                ch.close()
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)

    def write(self, t: pb.TableSpec, ids: np.ndarray, rows: np.ndarray, key: str) -> None:
        if not self._direct:
            self._routed(t, ids, rows, key)
            return
        self._pending.append((t, ids, rows, key) + self._send(t, ids, rows))
        while len(self._pending) > self.IN_FLIGHT:
            self._finish(self._pending.popleft())

    def flush(self) -> None:
        """Wait for the chunks in flight; route what a replica did not take."""
        while self._pending:
            self._finish(self._pending.popleft())

    def _finish(self, sent) -> None:
        t, ids, rows, key, jobs, failed, spooled = sent
        try:
            for held, job, server, files in jobs:
                e = job.exception()
                if e is None:
                    self.files_sent += files
                    continue
                failed = failed | held     # stale map, learner, server lost: route them
                self._map = None
                if files and isinstance(e, grpc.RpcError) and e.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.PERMISSION_DENIED) and e.details().startswith("files"):
                    log.warning("%s does not take spooled files (%s); sending it rows",
                                server, e.details())
                    self._file_servers.discard(server)
            del jobs
        finally:
            spool.release(spooled.values())
        if failed.any():
            sel = failed[ids & (t.num_partitions - 1)]
            self._routed(t, ids[sel], rows[sel], key)

    def _send(self, t: pb.TableSpec, ids: np.ndarray, rows: np.ndarray):
        """Start one Ingest per server: ([(partitions it holds, future, server, files)],
        partitions to route, {partition: spooled file})."""
        from shoal.wire import serialize_with_tensor
        P = t.num_partitions
        if self._map is None:
            self._map = self._client.status().map
        if self._file_servers is None:
            self._find_spool()
        sets = {rs.partition: rs for rs in self._map.partitions if rs.table_uid == t.table_uid}
        if len(sets) != P:
            return [], np.ones(P, bool), {}
        learning = np.array([bool(sets[p].learners) for p in range(P)])
        epochs = np.array([sets[p].epoch for p in range(P)], np.int64)
        parts = ids & (P - 1)
        servers = sorted({s for rs in sets.values() for s in rs.replicas})
        holds = {s: np.array([s in sets[p].replicas for p in range(P)]) & ~learning
                 for s in servers}
        by_file = [s for s in servers if s in self._file_servers and holds[s].any()]
        spooled = {}
        if by_file:
            wanted = np.logical_or.reduce([holds[s] for s in by_file])
            raw = np.ascontiguousarray(rows).view(np.uint8).reshape(len(ids), -1)
            spooled = spool.write_chunk_files(self._spool, t.table_uid, P, ids, raw,
                                              np.flatnonzero(wanted).tolist()) or {}
        jobs, whole = [], None           # one serialised request for servers that hold all
        lo, hi = int(ids[0]), int(ids[-1]) + 1
        for s in servers:
            held = holds[s]
            if not held.any():
                continue
            mine = np.flatnonzero(held)
            routed = pb.PartitionEpochs(partitions=pack(mine, "int32"), epochs=pack(epochs[mine]))
            files = [pb.IngestFile(partition=int(p), path=spooled[p])
                     for p in mine.tolist() if p in spooled]
            if files and len(files) == len(mine) and s in by_file:
                msg = pb.IngestRequest(map_version=self._map.version, table_uid=t.table_uid,
                                       routed=routed, lo=lo, hi=hi,
                                       files=files).SerializeToString()
            else:
                files = []
                head = pb.IngestRequest(map_version=self._map.version, table_uid=t.table_uid,
                                        ids=pack(ids if held.all() else ids[held[parts]]),
                                        routed=routed, lo=lo, hi=hi)
                if held.all():
                    whole = whole or serialize_with_tensor(head, 4, rows)
                    msg = whole
                else:
                    msg = serialize_with_tensor(head, 4, rows[held[parts]])
            jobs.append((held, self._stub(s).future(msg, timeout=120), s, len(files)))
            del msg
        return jobs, learning, spooled

    def _find_spool(self) -> None:
        """The servers that get files: those on this host whose spool directory (the one most
        of them share) this process can write."""
        self._file_servers = set()
        if self._transfer == "rows":
            return
        here, dirs = spool.host_id(), {}
        for s in self._map.servers:
            try:
                st = self._stub(s.server_id, "Stats", pb.ServerStats.FromString)(
                    pb.StatsRequest().SerializeToString(), timeout=10)
            except grpc.RpcError:
                continue
            if st.host_id == here and st.spool_dir and os.access(st.spool_dir, os.W_OK):
                dirs.setdefault(st.spool_dir, set()).add(s.server_id)
        if dirs:
            root, self._file_servers = max(dirs.items(), key=lambda kv: len(kv[1]))
            self._spool = tempfile.mkdtemp(prefix="load-", dir=root)

    def _stub(self, server: str, method: str = "Ingest", reply=pb.IngestReply.FromString):
        from shoal.serving import channel
        address = next(s.address for s in self._map.servers if s.server_id == server)
        if address not in self._channels:
            self._channels[address] = channel(address, self._client.credentials)
        return self._channels[address].unary_unary(   # takes the request already serialised
            f"/shoal.v1.ShardServer/{method}", request_serializer=None,
            response_deserializer=reply)

    def _routed(self, t: pb.TableSpec, ids: np.ndarray, rows: np.ndarray, key: str) -> None:
        self._client.write_rows(self._model, t.name, ids, rows, version=self._version,
                                request_id=key)


def _verify(client, md: pb.ModelSpec, source: dict[str, tuple[np.ndarray, np.ndarray]],
            timeout: float = 120.0) -> None:
    """Every replica of every partition holds exactly the rows sent (checksums and counts). A
    replica that cannot be reached (a server lost during the load, not yet dropped from its
    replica sets) is asked again on a newer map, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _verify_once(client, md, source)
        except ShoalError as e:
            if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                    or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _verify_once(client, md: pb.ModelSpec, source) -> None:
    _mismatches(client, md, source, strict=True)


def _mismatches(client, md: pb.ModelSpec, source, strict: bool = False) -> dict[str, np.ndarray]:
    """Per table, bool per partition: does any replica not hold exactly the source's rows
    (checksums and counts, from the servers' ingest records where they account for a
    partition)? ``strict``: raise DATA_LOSS naming the first such partition, and let an
    unreachable server's error through; else count its partitions as not matching."""
    from shoal.admin import server_checksums

    m = client.status().map
    addresses = {s.server_id: s.address for s in m.servers}
    out = {}
    for t in md.tables:
        want_sums, want_rows = source[t.name]
        bad_parts = np.zeros(t.num_partitions, bool)
        sets = [rs for rs in m.partitions if rs.table_uid == t.table_uid]
        held = {rs.partition for rs in sets if rs.replicas}
        if len(held) < t.num_partitions:
            if strict:                   # a replica set lost entirely, or not placed yet
                raise ShoalError(grpc.StatusCode.UNAVAILABLE,
                                 f"load of {md.name} v{md.version}: table {t.name!r} has "
                                 f"{t.num_partitions - len(held)} partitions without a replica")
            bad_parts[[p for p in range(t.num_partitions) if p not in held]] = True
        by_server: dict[str, list[int]] = {}
        for rs in sets:
            for s in rs.replicas:
                by_server.setdefault(s, []).append(rs.partition)
        for s, parts in sorted(by_server.items()):
            try:
                sums, rows = server_checksums(addresses[s], t.table_uid, parts, recorded=True,
                                              creds=client.credentials)
            except ShoalError:
                if strict:
                    raise
                bad_parts[parts] = True
                continue
            bad = [(p, int(r), int(want_rows[p])) for p, c, r in zip(parts, sums, rows)
                   if c != want_sums[p] or r != want_rows[p]]
            bad_parts[[p for p, _, _ in bad]] = True
            if bad and strict:
                p, r, w = bad[0]
                raise ShoalError(grpc.StatusCode.DATA_LOSS,
                                 f"load of {md.name} v{md.version}: table {t.name!r} partition "
                                 f"{p} on {s} does not match the checkpoint ({r} rows stored, "
                                 f"{w} sent; {len(bad)} partitions differ); the version stays "
                                 "loading: resume the load or drop it")
        out[t.name] = bad_parts
    return out
