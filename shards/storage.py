"""RocksDB storage of rows: the durable truth and the cold tier.

Keys are big-endian ``(table_uid u32, partition u32, row u64)``, so one partition is one
contiguous key range that can be scanned, copied or dropped at once. Values are the raw row bytes
in the table's dtype.

Durability: every write goes through the WAL (or is an ingested SST file) before ``write_rows``
returns. rocksdict takes keys one Python ``bytes`` object at a time; building them is vectorised
(one numpy pass, one ``tolist``), and the per-key work left is inside the binding.
"""
from __future__ import annotations

import abc
import os
import pathlib
import tempfile

import numpy as np
import rocksdict

KEY_DTYPE = np.dtype([("table", ">u4"), ("partition", ">u4"), ("row", ">u8")])


def encode_keys(table_uid: int, partitions: np.ndarray, ids: np.ndarray) -> list[bytes]:
    k = np.empty(len(ids), dtype=KEY_DTYPE)
    k["table"] = table_uid
    k["partition"] = partitions
    k["row"] = ids
    return k.view("V16").tolist()


def partition_range(table_uid: int, partition: int) -> tuple[bytes, bytes]:
    lo = np.array([(table_uid, partition, 0)], dtype=KEY_DTYPE).tobytes()
    hi = np.array([(table_uid, partition + 1, 0)], dtype=KEY_DTYPE).tobytes()
    return lo, hi


class RowStore(abc.ABC):
    """Contract of a server's durable row storage. Called from RPC threads concurrently."""

    @abc.abstractmethod
    def write_rows(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray,
                   rows: np.ndarray) -> None:
        """Durably store ``rows[i]`` under ``(table_uid, partitions[i], ids[i])``. ids unique."""

    @abc.abstractmethod
    def read_rows(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray,
                  row_bytes: int) -> bytes:
        """The rows' bytes, concatenated in order; rows never written read as zeros."""

    @abc.abstractmethod
    def present(self, table_uid: int, partitions: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """bool per id: is a row stored under it?"""

    @abc.abstractmethod
    def drop_partition(self, table_uid: int, partition: int) -> None:
        """Delete every row of one partition (one key range)."""

    @abc.abstractmethod
    def scan_partition(self, table_uid: int, partition: int, after: int = -1,
                       limit: int = 0) -> tuple[np.ndarray, bytes]:
        """(ids, concatenated row bytes) stored in one partition, in id order: those with
        id > ``after``, at most ``limit`` of them (0: all)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class RocksRowStore(RowStore):
    def __init__(self, path: str | os.PathLike, block_cache_bytes: int = 64 << 20,
                 sst_threshold_rows: int = 50_000):
        self._path = pathlib.Path(path)
        self._path.mkdir(parents=True, exist_ok=True)
        self._sst_threshold = sst_threshold_rows
        self._options = self._make_options(block_cache_bytes)
        # Reopening with Rdict(path, options) drops table options; pass them per column family.
        self._db = rocksdict.Rdict(str(self._path / "rocksdb"), self._options,
                                   column_families={"default": self._options})
        self._wopts = rocksdict.WriteOptions()
        self._wopts.sync = False      # WAL on, fsync left to the OS (survives kill -9)
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
        return opts

    def write_rows(self, table_uid, partitions, ids, rows):
        n = len(ids)
        if n == 0:
            return
        rows = np.ascontiguousarray(rows)
        row_bytes = rows.nbytes // n
        if n >= self._sst_threshold:
            order = np.lexsort((ids, partitions))          # SST keys must be sorted
            keys = encode_keys(table_uid, partitions[order], ids[order])
            values = rows[order].view(f"V{row_bytes}").reshape(n).tolist()
            self._ingest(keys, values)
        else:
            keys = encode_keys(table_uid, partitions, ids)
            values = rows.view(f"V{row_bytes}").reshape(n).tolist()
            wb = rocksdict.WriteBatch(raw_mode=True)
            for k, v in zip(keys, values):
                wb.put(k, v)
            self._db.write(wb, self._wopts)

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

    def scan_partition(self, table_uid, partition, after=-1, limit=0):
        lo, hi = partition_range(table_uid, partition)
        if after >= 0:
            lo = encode_keys(table_uid, np.array([partition]), np.array([after + 1]))[0]
        ro = rocksdict.ReadOptions()
        ro.set_iterate_upper_bound(hi)
        keys, values = [], []
        it = self._db.iter(ro)
        it.seek(lo)
        while it.valid() and (not limit or len(keys) < limit):
            keys.append(it.key())
            values.append(it.value())
            it.next()
        del it
        ids = np.frombuffer(b"".join(keys), dtype=KEY_DTYPE)["row"].astype(np.int64)
        return ids, b"".join(values)

    def close(self):
        self._db.close()
