"""RocksDB storage of rows: the durable truth and the cold tier.

Keys are big-endian ``(table_uid u32, partition u32, row u64)``, so one partition is one
contiguous key range that can be scanned, copied or dropped at once. Values are the raw row bytes
in the table's dtype. Each partition's replication position (the sequence number and epoch of
the last write applied) lives under ``(0xFFFFFFFF, table_uid, partition)``, after every row key,
and is written in the same batch (or SST file) as the rows it describes.

Durability: every write goes through the WAL (or is an ingested SST file) before ``write_rows``
returns. rocksdict takes keys one Python ``bytes`` object at a time; building them is vectorised
(one numpy pass, one ``tolist``), and the per-key work left is inside the binding.
"""
from __future__ import annotations

import abc
import itertools
import os
import pathlib
import shutil
import tempfile
import time
import uuid

import numpy as np
import rocksdict

KEY_DTYPE = np.dtype([("table", ">u4"), ("partition", ">u4"), ("row", ">u8")])
META_TABLE = 0xFFFFFFFF
POSITION_DTYPE = np.dtype("<i8")      # value: (seq, epoch)
MEMTABLE_BYTES = 32 << 20
BACKGROUND_RETRY_S = 0.01


def encode_keys(table_uid: int, partitions: np.ndarray, ids: np.ndarray) -> list[bytes]:
    k = np.empty(len(ids), dtype=KEY_DTYPE)
    k["table"] = table_uid
    k["partition"] = partitions
    k["row"] = ids
    return k.view("V16").tolist()


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
        """Delete every row of one partition (one key range) and its position."""

    @abc.abstractmethod
    def scan_partition(self, table_uid: int, partition: int) -> tuple[np.ndarray, bytes]:
        """(ids, concatenated row bytes) of every row stored in one partition, in id order."""

    @abc.abstractmethod
    def close(self) -> None: ...


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


class RocksRowStore(RowStore):
    def __init__(self, path: str | os.PathLike, block_cache_bytes: int = 64 << 20,
                 sst_threshold_rows: int = 50_000, read_only_db: str | None = None):
        """``read_only_db``: open that RocksDB directory read-only instead (a checkpoint)."""
        self._path = pathlib.Path(path)
        self._path.mkdir(parents=True, exist_ok=True)
        self._sst_threshold = sst_threshold_rows
        self._options = self._make_options(block_cache_bytes)
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

    @staticmethod
    def _make_options(block_cache_bytes: int) -> rocksdict.Options:
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(rocksdict.Cache(block_cache_bytes))
        table.set_bloom_filter(10, False)
        table.set_format_version(5)   # readable by Debian's ldb / sst_dump too
        opts.set_block_based_table_factory(table)
        opts.set_max_background_jobs(2)
        # rocksdict holds the GIL while a write waits for RocksDB (a full memtable, too many L0
        # files): room for three memtables keeps such write stalls, which pause the whole
        # server, rare.
        opts.set_write_buffer_size(MEMTABLE_BYTES)
        opts.set_max_write_buffer_number(3)
        return opts

    def write_rows(self, table_uid, partitions, ids, rows, positions=None, background=False):
        n = len(ids)
        keys, values = [], []
        if positions is not None:
            order = np.argsort(positions[0])              # meta keys sort after every row key
            keys = position_keys(table_uid, positions[0][order])
            values = position_values(positions[1][order], positions[2][order])
        if n == 0 and not keys:
            return
        rows = np.ascontiguousarray(rows)
        row_bytes = rows.nbytes // max(n, 1)
        if n >= self._sst_threshold:
            order = np.lexsort((ids, partitions))          # SST keys must be sorted
            self._ingest(encode_keys(table_uid, partitions[order], ids[order]) + keys,
                         rows[order].view(f"V{row_bytes}").reshape(n).tolist() + values)
        else:
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

    def _ingest(self, keys: list[bytes], values: list[bytes]) -> None:
        fd, path = tempfile.mkstemp(suffix=".sst", dir=self._tmp)
        os.close(fd)
        try:
            writer = rocksdict.SstFileWriter(self._options)
            writer.open(path)
            for k, v in zip(keys, values):
                writer[k] = v
            writer.finish()
            self._db.ingest_external_file([path], self._ingest_opts)
        finally:
            if os.path.exists(path):
                os.unlink(path)

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
        self._db.delete(position_keys(table_uid, np.array([partition]))[0])

    def scan_partition(self, table_uid, partition):
        return PartitionSnapshot(self._db, table_uid, partition).read(None)

    def close(self):
        self._db.close()
        if self._read_only:                 # a checkpoint: delete its files
            shutil.rmtree(self._path, ignore_errors=True)
