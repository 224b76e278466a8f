"""RocksDB storage of rows: the durable truth and the cold tier.

Keys are big-endian ``(table_uid u32, partition u32, row u64)``, so one partition is one
contiguous key range that can be scanned, copied or dropped at once. Values are the raw row bytes
in the table's dtype. Each partition's replication position (the sequence number and epoch of
the last write applied) lives under ``(0xFFFFFFFF, table_uid, partition)``, after every row key,
and is written in the same batch (or SST file) as the rows it describes.

Bulk rows (a load's chunks, large writes) are written as SST files built by ``shards.sst``
(numpy, no per-row work) and ingested, one file per partition: successive chunks of a load carry
ascending id ranges, so a partition's files never overlap and RocksDB places them in the
bottommost level without compacting them. A load's ingests also store, per partition, an
**ingest record** under ``(0xFFFFFFFE, table_uid, partition, lo)``: the id range ``[lo, hi)`` the
ingest covered, its row count and checksum (``embeddings.checksum``), in the same atomic
ingest as the rows, so a partition's checksum can be answered from its records instead of a
scan (see ``ingest_records``).

Durability: every write goes through the WAL (or is an ingested SST file) before ``write_rows``
returns. rocksdict takes keys one Python ``bytes`` object at a time; building them is vectorised
(one numpy pass, one ``tolist``), and the per-key work left is inside the binding.
"""
from __future__ import annotations

import abc
import contextlib
import errno
import itertools
import os
import pathlib
import shutil
import tempfile
import time
import logging
import uuid

import numpy as np
import rocksdict

from embeddings.checksum import partition_checksums
from shards.failpoints import Failpoints
from shards.sst import write_sst

log = logging.getLogger("shard.storage")

KEY_DTYPE = np.dtype([("table", ">u4"), ("partition", ">u4"), ("row", ">u8")])
META_TABLE = 0xFFFFFFFF
RECORD_SPACE = 0xFFFFFFFE             # ingest records sort after every row, before positions
RECORD_KEY_DTYPE = np.dtype([("space", ">u4"), ("table", ">u4"), ("partition", ">u4"),
                             ("lo", ">u8")])
RECORD_DTYPE = np.dtype([("hi", "<i8"), ("rows", "<i8"), ("checksum", "<u8")])
READ_BACK_SAMPLE = 64                 # rows of each ingest read back through RocksDB
POSITION_DTYPE = np.dtype("<i8")      # value: (seq, epoch)
MEMTABLE_BYTES = 32 << 20
BACKGROUND_RETRY_S = 0.01


def key_array(table_uid: int, partitions, ids: np.ndarray) -> np.ndarray:
    """uint8 [n, 16]: the keys of rows ``ids`` (``partitions``: one or one per id)."""
    k = np.empty(len(ids), dtype=KEY_DTYPE)
    k["table"] = table_uid
    k["partition"] = partitions
    k["row"] = ids
    return k.view(np.uint8).reshape(len(ids), KEY_DTYPE.itemsize)


def encode_keys(table_uid: int, partitions: np.ndarray, ids: np.ndarray) -> list[bytes]:
    return key_array(table_uid, partitions, ids).view("V16").reshape(len(ids)).tolist()


def record_range(table_uid: int, partition: int) -> tuple[bytes, bytes]:
    k = np.array([(RECORD_SPACE, table_uid, partition, 0),
                  (RECORD_SPACE, table_uid, partition + 1, 0)], dtype=RECORD_KEY_DTYPE)
    return k[0].tobytes(), k[1].tobytes()


def position_keys(table_uid: int, partitions: np.ndarray) -> list[bytes]:
    return encode_keys(META_TABLE, np.full(len(partitions), table_uid), partitions)


def position_values(seqs: np.ndarray, epochs: np.ndarray) -> list[bytes]:
    v = np.stack([np.asarray(seqs, POSITION_DTYPE), np.asarray(epochs, POSITION_DTYPE)], 1)
    return v.view("V16").reshape(len(v)).tolist()


def partition_range(table_uid: int, partition: int) -> tuple[bytes, bytes]:
    lo = np.array([(table_uid, partition, 0)], dtype=KEY_DTYPE).tobytes()
    hi = np.array([(table_uid, partition + 1, 0)], dtype=KEY_DTYPE).tobytes()
    return lo, hi


Positions = tuple[np.ndarray, np.ndarray, np.ndarray]     # (partitions, seqs, epochs)


def start_writeback(path: str) -> None:
    """Start writing a file's dirty pages back without waiting (``POSIX_FADV_DONTNEED`` on
    dirty pages starts their writeback): every file of a chunk is on its way to the disk
    before the first sync waits, and the disk stays busy while the next file is built."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def link_fd(fd: int, path: str) -> None:
    """Hard-link the file open as ``fd`` at ``path`` (``linkat`` through ``/proc/self/fd``,
    following it: Python's ``os.link`` would link the /proc entry itself)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    if libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(path),
                   at_symlink_follow) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _unlink(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


class StorageError(RuntimeError):
    """RocksDB does not hold what was just written to it."""


def disk_full(e: BaseException | None) -> str | None:
    """What a write's exception says if it failed for a full disk (ENOSPC from Shoal's own
    file writes, RocksDB's "No space left on device" through rocksdict), else None."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        if "No space left on device" in str(e):
            return str(e)[:300]
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _position_run(table_uid: int, positions: Positions) -> tuple[np.ndarray, np.ndarray]:
    """The (keys, values) run of partitions' positions, ascending, for an SST file."""
    order = np.argsort(positions[0])
    k = key_array(META_TABLE, table_uid, positions[0][order])
    v = np.stack([np.asarray(positions[1], POSITION_DTYPE)[order],
                  np.asarray(positions[2], POSITION_DTYPE)[order]], 1)
    return k, v.view(np.uint8).reshape(len(v), 16)


class RowStore(abc.ABC):
    """Contract of a server's durable row storage. Called from RPC threads concurrently."""

    @abc.abstractmethod
    def write_rows(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray,
                   rows: np.ndarray, positions: Positions | None = None,
                   background: bool = False) -> None:
        """Durably store ``rows[i]`` under ``(table_uid, partitions[i], ids[i])`` (ids unique)
        and, atomically with them, the replication ``positions`` of the partitions written.
        ``background``: a copy's
        rows; if RocksDB would make the write wait (a write stall, with the GIL held), back off
        and retry instead, so the server's other work goes on."""

    @abc.abstractmethod
    def prepare_ingest(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray,
                       rows: np.ndarray, lo: int, hi: int) -> "PreparedIngest":
        """Write (and sync) a load's bulk rows, ids unique and in ``[lo, hi)``, as SST files,
        one per partition, not yet visible: ``PreparedIngest.commit`` ingests them. Needs no
        lock: a caller serialising its writes prepares outside its lock and commits inside."""

    @abc.abstractmethod
    def prepare_linked_ingest(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray,
                              rows: np.ndarray, lo: int, hi: int,
                              fds: list[int]) -> "PreparedIngest":
        """``prepare_ingest`` for rows already in SST files, one per partition present, open
        as ``fds`` and checked to hold exactly ``rows`` (``shards.sst.read_sst_values``): the
        files are hard-linked in, not rewritten; their pages stay cached for the other
        replicas that link them too."""

    @abc.abstractmethod
    def ingest_records(self, table_uid: int, partition: int) -> np.ndarray:
        """The partition's ingest records, ascending by ``lo``: a structured array with the
        fields ``lo`` and those of ``RECORD_DTYPE``."""

    @abc.abstractmethod
    def read_positions(self, table_uid: int, num_partitions: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
        """(seq, epoch) int64 [num_partitions] of every partition; 0 where none is stored."""

    @abc.abstractmethod
    def set_position(self, table_uid: int, partition: int, seq: int, epoch: int) -> None: ...

    @abc.abstractmethod
    def stored_partitions(self) -> set[tuple[int, int]]:
        """(table_uid, partition) of every partition with a stored position."""

    @abc.abstractmethod
    def snapshot_partition(self, table_uid: int, partition: int,
                           checkpoint: bool = False) -> "PartitionSnapshot":
        """The partition's rows as they are now, to read later a chunk at a time while writes
        go on. ``checkpoint``: read them from a RocksDB checkpoint opened read-only (hard links
        plus a memtable flush) instead of a RocksDB iterator, which is itself a consistent
        point-in-time view and costs nothing to take."""

    @abc.abstractmethod
    def read_rows(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray,
                  row_bytes: int) -> bytes:
        """The rows' bytes, concatenated in order; rows never written read as zeros."""

    @abc.abstractmethod
    def present(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """bool per id: is a row stored under it?"""

    @abc.abstractmethod
    def drop_partition(self, table_uid: int, partition: int) -> None:
        """Delete every row of one partition (one key range), its ingest records and its
        position."""

    @abc.abstractmethod
    def scan_partition(self, table_uid: int, partition: int) -> tuple[np.ndarray, bytes]:
        """(ids, concatenated row bytes) of every row stored in one partition, in id order."""

    @abc.abstractmethod
    def close(self) -> None: ...

    path: str = ""                      # where its files are

    def disk_bytes(self) -> int:
        """Bytes of the store's files on disk."""
        return 0

    def compact_ingested(self, needs=None) -> list[int]:
        """Rewrite the tables bulk-loaded since last time for point reads; their uids."""
        return []

    def disk_free(self) -> int:
        """Bytes free on the store's file system."""
        return 0


class PartitionSnapshot:
    """One partition's rows as of the moment this was made (a RocksDB iterator is a consistent
    point-in-time view: later writes, deletes and flushes do not show through it), read in id
    order a chunk at a time."""

    def __init__(self, db: rocksdict.Rdict, table_uid: int, partition: int, on_close=None):
        lo, hi = partition_range(table_uid, partition)
        self._ro = rocksdict.ReadOptions()         # the iterator borrows its upper bound
        self._ro.set_iterate_upper_bound(hi)
        self._items = iter(db.items(from_key=lo, read_opt=self._ro))   # the view starts here
        self._on_close = on_close

    def read(self, limit: int | None) -> tuple[np.ndarray, bytes]:
        """Up to ``limit`` (None: all) more (ids, concatenated row bytes); none at the end."""
        keys, values = [], []
        for k, v in itertools.islice(self._items, limit):
            keys.append(k)
            values.append(v)
        ids = np.frombuffer(b"".join(keys), dtype=KEY_DTYPE)["row"].astype(np.int64)
        return ids, b"".join(values)

    def close(self) -> None:
        self._items = None
        if self._on_close is not None:
            self._on_close()


class PreparedIngest:
    """A load's rows written as SST files (``RocksRowStore.prepare_ingest``), waiting for
    ``commit`` or ``discard``."""

    def __init__(self, store: "RocksRowStore", table_uid: int, partitions: np.ndarray,
                 ids: np.ndarray, rows: np.ndarray, lo: int, hi: int, present: np.ndarray,
                 paths: list[str], drop_cache: bool = True):
        self._store, self._uid = store, table_uid
        self._parts, self._ids, self._rows = partitions, ids, rows
        self._paths = paths
        self._drop_cache = drop_cache
        # The records, computed here, outside the caller's lock.
        sums, counts = partition_checksums(ids, rows, partitions, int(present.max()) + 1)
        rk = np.empty(len(present), RECORD_KEY_DTYPE)
        rk["space"], rk["table"], rk["partition"], rk["lo"] = RECORD_SPACE, table_uid, present, lo
        rv = np.empty(len(present), RECORD_DTYPE)
        rv["hi"], rv["rows"], rv["checksum"] = hi, counts[present], sums[present]
        self._records = (rk.view(np.uint8).reshape(len(rk), -1),
                         rv.view(np.uint8).reshape(len(rv), -1))

    def commit(self, positions: Positions | None) -> None:
        """Ingest the rows with each partition's ingest record (and ``positions``) in one
        atomic step, then read a sample back through RocksDB (``StorageError`` if it differs)."""
        uid = self._uid
        meta = [self._records]
        if positions is not None and len(positions[0]):
            meta.append(_position_run(uid, positions))
        paths, self._paths = self._paths, []
        try:
            paths += self._store._write_files([meta])
        except BaseException:
            _unlink(paths)
            raise
        self._store._ingest_files(
            paths, lambda: self._store._read_back(uid, self._parts, self._ids, self._rows),
            self._drop_cache)
        self._store.ingested(uid)

    def discard(self) -> None:
        paths, self._paths = self._paths, []
        _unlink(paths)


class RocksRowStore(RowStore):
    def __init__(self, path: str | os.PathLike, block_cache_bytes: int = 64 << 20,
                 sst_threshold_rows: int = 50_000, read_only_db: str | None = None,
                 memtable_bytes: int = MEMTABLE_BYTES, failpoints: Failpoints | None = None,
                 mmap_reads: bool = False):
        """``read_only_db``: open that RocksDB directory read-only instead (a checkpoint).
        ``memtable_bytes``: one write buffer (three are kept; see ``shards.tiers``).
        ``failpoints``: where a test may hold this store (``shards.failpoints``).
        ``mmap_reads``: RocksDB reads its files through memory maps, not ``pread``: point reads
        of page-cached rows cost 3.3 us of CPU a key against 4.6 (2M rows of 256 B, 1,500 random
        keys a multi-get), but every page read stays mapped, so the process's RSS holds the
        file pages it touched (6-8x the memory budget in ``bench/tiered.py``). Off by default."""
        self.failpoints = failpoints or Failpoints(None)
        self._path = pathlib.Path(path)
        self.path = str(self._path)
        self._path.mkdir(parents=True, exist_ok=True)
        self._sst_threshold = sst_threshold_rows
        self._options = self._make_options(block_cache_bytes, memtable_bytes)
        if mmap_reads:
            self._options.set_allow_mmap_reads(True)
        self._read_only = read_only_db
        # Reopening with Rdict(path, options) drops table options; pass them per column family.
        if read_only_db:
            self._db = rocksdict.Rdict(read_only_db, self._options,
                                       column_families={"default": self._options},
                                       access_type=rocksdict.AccessType.read_only())
        else:
            self._db = rocksdict.Rdict(str(self._path / "rocksdb"), self._options,
                                       column_families={"default": self._options})
            shutil.rmtree(self._path / "checkpoints", ignore_errors=True)  # a crash's leftovers
        self._wopts = rocksdict.WriteOptions()
        self._wopts.sync = False      # WAL on, fsync left to the OS (survives kill -9)
        self._bg_wopts = rocksdict.WriteOptions()
        self._bg_wopts.sync = False
        self._bg_wopts.no_slowdown = True     # fail rather than stall (see write_rows)
        self._bg_wopts.low_pri = True
        self._ingest_opts = rocksdict.IngestExternalFileOptions()
        self._ingest_opts.set_move_files(True)   # hard-link the file in, do not copy it
        self._tmp = self._path / "sst-tmp"
        self._tmp.mkdir(exist_ok=True)
        if not read_only_db:         # files of writes a crash cut short: never ingested
            _unlink([str(p) for p in self._tmp.glob("*.sst")])
        self._disk_bytes = (-1e9, 0)      # (when measured, bytes)
        self._ingested: set[int] = set()  # tables that took SST files, to compact

    @staticmethod
    def _make_options(block_cache_bytes: int,
                      memtable_bytes: int = MEMTABLE_BYTES) -> rocksdict.Options:
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(rocksdict.Cache(block_cache_bytes))
        table.set_bloom_filter(10, False)
        table.set_format_version(5)   # readable by Debian's ldb / sst_dump too
        opts.set_block_based_table_factory(table)
        # Rows are float bits, which Snappy does not shrink; compressed blocks only cost CPU on
        # every cold read. (Shoal's own SST files are written uncompressed too.)
        opts.set_compression_type(rocksdict.DBCompressionType.none())
        opts.set_max_background_jobs(2)
        # rocksdict holds the GIL while a write waits for RocksDB (a full memtable, too many L0
        # files): room for three memtables keeps such write stalls, which pause the whole
        # server, rare.
        opts.set_write_buffer_size(memtable_bytes)
        opts.set_max_write_buffer_number(3)
        return opts

    def write_rows(self, table_uid, partitions, ids, rows, positions=None, background=False):
        n = len(ids)
        if n == 0 and (positions is None or not len(positions[0])):
            return
        rows = np.ascontiguousarray(rows)
        row_bytes = rows.nbytes // max(n, 1)
        if n >= self._sst_threshold:
            order = np.lexsort((ids, partitions))          # SST keys must be sorted
            runs = [(key_array(table_uid, partitions[order], ids[order]),
                     rows[order].view(np.uint8).reshape(n, row_bytes))]
            if positions is not None:                      # meta keys sort after every row
                runs.append(_position_run(table_uid, positions))
            self._ingest([runs])
            self.ingested(table_uid)
        else:
            keys, values = [], []
            if positions is not None:
                order = np.argsort(positions[0])
                keys = position_keys(table_uid, positions[0][order])
                values = position_values(positions[1][order], positions[2][order])
            wb = rocksdict.WriteBatch(raw_mode=True)
            if n:
                for k, v in zip(encode_keys(table_uid, partitions, ids),
                                rows.view(f"V{row_bytes}").reshape(n).tolist()):
                    wb.put(k, v)
            for k, v in zip(keys, values):
                wb.put(k, v)
            if background:
                self._write_in_background(wb)
            else:
                self._db.write(wb, self._wopts)

    def _write_in_background(self, wb: rocksdict.WriteBatch) -> None:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            try:
                self._db.write(wb, self._bg_wopts)
                return
            except Exception as e:         # rocksdict raises a plain exception: "Incomplete"
                if "ncomplete" not in str(e) and "slowdown" not in str(e).lower():
                    raise
            time.sleep(BACKGROUND_RETRY_S)  # without the GIL: the event loop runs meanwhile
        self._db.write(wb, self._wopts)

    def read_positions(self, table_uid, num_partitions):
        values = self._db.get(position_keys(table_uid, np.arange(num_partitions)),
                              default=bytes(16))
        v = np.frombuffer(b"".join(values), dtype=POSITION_DTYPE).reshape(num_partitions, 2)
        return v[:, 0].copy(), v[:, 1].copy()

    def set_position(self, table_uid, partition, seq, epoch):
        self.write_rows(table_uid, np.zeros(0, np.int64), np.zeros(0, np.int64),
                        np.zeros((0, 1), np.float32),
                        (np.array([partition]), np.array([seq]), np.array([epoch])))

    def stored_partitions(self):
        lo = np.array([(META_TABLE, 0, 0)], dtype=KEY_DTYPE).tobytes()
        it = self._db.iter(rocksdict.ReadOptions())
        it.seek(lo)
        keys = []
        while it.valid():
            keys.append(it.key())
            it.next()
        del it
        k = np.frombuffer(b"".join(keys), dtype=KEY_DTYPE)
        return set(zip(k["partition"].tolist(), k["row"].tolist()))

    def snapshot_partition(self, table_uid, partition, checkpoint=False):
        if not checkpoint:
            return PartitionSnapshot(self._db, table_uid, partition)
        root = self._path / "checkpoints"
        root.mkdir(exist_ok=True)
        path = root / uuid.uuid4().hex
        rocksdict.Checkpoint(self._db).create_checkpoint(str(path))
        copy = RocksRowStore(path, 8 << 20, read_only_db=str(path))
        return PartitionSnapshot(copy._db, table_uid, partition, on_close=copy.close)

    def prepare_ingest(self, table_uid, partitions, ids, rows, lo, hi):
        files, present = self._partition_files(table_uid, partitions, ids, rows)
        return PreparedIngest(self, table_uid, partitions, ids, rows, lo, hi, present,
                              self._write_files(files))

    def prepare_linked_ingest(self, table_uid, partitions, ids, rows, lo, hi, fds):
        present = np.flatnonzero(np.bincount(partitions))
        paths = []
        try:
            for fd in fds:     # the inode checked, whatever its path names by now
                path = str(self._tmp / f"{uuid.uuid4().hex}.sst")
                link_fd(fd, path)
                paths.append(path)
        except BaseException:
            _unlink(paths)
            raise
        return PreparedIngest(self, table_uid, partitions, ids, rows, lo, hi, present, paths,
                              drop_cache=False)

    def bulk_write(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray,
                   rows: np.ndarray) -> None:
        """Rows as SST files, one per partition, ingested at once: what a load's ingest
        (``prepare_ingest`` and ``commit``) does without records, positions or the read-back
        (the floor ``bench/load.py`` measures)."""
        self._ingest(self._partition_files(table_uid, partitions, ids, rows)[0])
        self.ingested(table_uid)

    @staticmethod
    def _partition_files(table_uid, partitions, ids, rows):
        """([[run]] one SST file per partition present, the partitions present). A contiguous
        ascending id range (a load's chunk) needs no sort: partition p's rows are every P-th
        row, a strided view that the SST writer copies straight into its blocks."""
        n = len(ids)
        rows = np.ascontiguousarray(rows)
        raw = rows.view(np.uint8).reshape(n, rows.nbytes // max(n, 1))
        P = int(partitions.max()) + 1 if n else 0
        if n and int(ids[-1]) - int(ids[0]) == n - 1 and (n < 2 or (ids[1:] > ids[:-1]).all()) \
                and P & (P - 1) == 0 and (partitions == ids & (P - 1)).all():
            # (P here is at most the table's partition count; any power of two >= the largest
            # partition present cuts the range the same way for ids & (P - 1).) Partition p's
            # first row is at (p - ids[0]) mod P.
            present = [p for p in range(P) if (p - int(ids[0])) % P < n]
            files = [[(key_array(table_uid, p, ids[(p - int(ids[0])) % P::P]),
                       raw[(p - int(ids[0])) % P::P])] for p in present]
            return files, np.array(present, np.int64)
        order = np.lexsort((ids, partitions))
        parts, ids, raw = partitions[order], ids[order], raw[order]
        present, starts = np.unique(parts, return_index=True)
        bounds = np.append(starts, n).tolist()
        files = [[(key_array(table_uid, p, ids[a:b]), raw[a:b])]
                 for p, a, b in zip(present.tolist(), bounds[:-1], bounds[1:])]
        return files, present

    def _read_back(self, table_uid: int, parts: np.ndarray, ids: np.ndarray,
                   rows: np.ndarray) -> None:
        """Read a spread sample of just-ingested rows through RocksDB: the files say what
        ``shards.sst`` meant them to say."""
        pick = np.unique(np.linspace(0, len(ids) - 1, min(len(ids), READ_BACK_SAMPLE))
                         .astype(np.int64))
        got = self._db.get(encode_keys(table_uid, parts[pick], ids[pick]))
        want = np.ascontiguousarray(rows[pick]).view(np.uint8).reshape(len(pick), -1)
        for i, v in enumerate(got):             # a small, fixed sample: not a per-row loop
            if v is None or v != want[i].tobytes():
                raise StorageError(f"ingested row {int(ids[pick[i]])} of table_uid {table_uid} "
                                   f"reads back {'missing' if v is None else 'different'} "
                                   "from RocksDB")

    def ingest_records(self, table_uid, partition):
        lo, hi = record_range(table_uid, partition)
        ro = rocksdict.ReadOptions()
        ro.set_iterate_upper_bound(hi)
        keys, values = [], []
        for k, v in self._db.items(from_key=lo, read_opt=ro):   # one per load chunk
            keys.append(k)
            values.append(v)
        out = np.empty(len(keys), np.dtype([("lo", "<i8")] + RECORD_DTYPE.descr))
        if keys:
            k = np.frombuffer(b"".join(keys), RECORD_KEY_DTYPE)
            v = np.frombuffer(b"".join(values), RECORD_DTYPE)
            out["lo"] = k["lo"]
            for f in RECORD_DTYPE.names:
                out[f] = v[f]
        return out

    def _ingest(self, files: list[list[tuple[np.ndarray, np.ndarray]]]) -> None:
        """Write each file's runs (``shards.sst.write_sst``) and ingest them all at once."""
        self._ingest_files(self._write_files(files))

    def _write_files(self, files: list[list[tuple[np.ndarray, np.ndarray]]]) -> list[str]:
        """SST files of ``files``' runs, written and synced (the wait for the disk happens
        here, without the GIL: rocksdict holds it through an ingest, which would sync them
        otherwise)."""
        paths = []
        try:
            for runs in files:
                fd, path = tempfile.mkstemp(suffix=".sst", dir=self._tmp)
                os.close(fd)
                paths.append(path)
                write_sst(path, runs)
                start_writeback(path)
            for path in paths:
                sync_file(path)
        except BaseException:
            _unlink(paths)
            raise
        return paths

    def _ingest_files(self, paths: list[str], then=None, drop_cache: bool = True) -> None:
        """Ingest ``paths`` (moved into the database) and run ``then()`` (the read-back) while
        their pages are still cached; then drop those pages from the page cache, as RocksDB's
        own SstFileWriter does: the memory tier serves the rows, and the next files reuse the
        freed pages instead of faulting in new ones. (Dropping them before the ingest made
        RocksDB's open and the read-back go to the disk: about 1.6 s a server per 2 GiB.)"""
        fds = []
        try:
            fds = [os.open(p, os.O_RDONLY) for p in paths]
            self.failpoints.hit("store.ingest")
            self._db.ingest_external_file(paths, self._ingest_opts)
            _unlink(paths)
            if then is not None:
                then()
        finally:
            _unlink(paths)
            for fd in fds:
                if drop_cache:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)

    def ingested(self, table_uid: int) -> None:
        """Note a table that took SST files: ``compact_ingested`` rewrites it later."""
        self._ingested.add(table_uid)

    def compact_ingested(self, needs=None) -> list[int]:
        """Rewrite the key ranges of the tables that took SST files since last time, into
        RocksDB's own format; returns their uids. Shoal's own SST files (``shards.sst``) carry
        no bloom filter and 16 KiB blocks: a point read of them cost 25 us of CPU a key, of
        the same rows rewritten by RocksDB 5.7-6.3 (700 random keys of 500k rows in 8
        partitions, page-cached, loaded as a checkpoint load writes them; with the page cache
        cold, 57-100 us against 5-6). A load's files do not overlap, so RocksDB places them in
        its last level and a plain ``compact_range`` leaves them as they are (0.0 s): the
        rewrite is forced (``BottommostLevelCompaction.force``; 0.6-0.9 s per 128 MB here).
        rocksdict lets other threads run meanwhile (the longest pause of a 0.5 ms loop beside a
        2.4 s compaction: 4.4 ms). ``needs(uid)``: the bytes a table's rewrite may take; a table
        is left as it is when the disk has not 1.25x that free (a full disk stops RocksDB's
        writes: reads of such a table stay slower instead)."""
        done = []
        opts = rocksdict.CompactOptions()
        opts.set_bottommost_level_compaction(rocksdict.BottommostLevelCompaction.force())
        opts.set_exclusive_manual_compaction(False)    # automatic compactions go on
        while self._ingested:
            uid = self._ingested.pop()
            need = needs(uid) if needs is not None else 0
            if need and self.disk_free() < 1.25 * need:
                log.warning("not compacting table_uid %d: %.0f MiB free, its rewrite may take "
                            "%.0f MiB", uid, self.disk_free() / 2**20, need / 2**20)
                continue
            lo = np.array([(uid, 0, 0)], dtype=KEY_DTYPE).tobytes()
            hi = np.array([(uid + 1, 0, 0)], dtype=KEY_DTYPE).tobytes()
            log.info("compacting table_uid %d (it took SST files)", uid)
            self._db.compact_range(lo, hi, opts)
            done.append(uid)
        return done

    def read_rows(self, table_uid, partitions, ids, row_bytes):
        if len(ids) == 0:
            return b""
        keys = encode_keys(table_uid, partitions, ids)
        return b"".join(self._db.get(keys, default=bytes(row_bytes)))

    def present(self, table_uid, partitions, ids):
        if len(ids) == 0:
            return np.zeros(0, dtype=bool)
        values = self._db.get(encode_keys(table_uid, partitions, ids))
        return np.fromiter((v is not None for v in values), dtype=bool, count=len(ids))

    def drop_partition(self, table_uid, partition):
        lo, hi = partition_range(table_uid, partition)
        self._db.delete_range(lo, hi)
        self._db.delete_range(*record_range(table_uid, partition))
        self._db.delete(position_keys(table_uid, np.array([partition]))[0])

    def scan_partition(self, table_uid, partition):
        return PartitionSnapshot(self._db, table_uid, partition).read(None)

    def disk_bytes(self):
        now = time.monotonic()
        if now - self._disk_bytes[0] > 1.0:         # asked at every heartbeat: a listing a second
            total = 0
            for root in (self._path / "rocksdb", self._tmp):
                with contextlib.suppress(OSError), os.scandir(root) as it:
                    for e in it:
                        with contextlib.suppress(OSError):
                            if e.is_file(follow_symlinks=False):
                                total += e.stat(follow_symlinks=False).st_size
            self._disk_bytes = (now, total)
        return self._disk_bytes[1]

    def disk_free(self):
        try:
            return shutil.disk_usage(self._path).free
        except OSError:
            return 0

    def close(self):
        self._db.close()
        if self._read_only:                 # a checkpoint: delete its files
            shutil.rmtree(self._path, ignore_errors=True)
