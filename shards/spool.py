"""A load's spool: SST files written once by the loader and hard-linked in by every replica on
the same host.

Replicas of a partition hold the same rows, and an SST file is immutable once written: so when
the loader and some shard servers share a host (one machine, the local default), the loader
writes each partition's rows of a chunk as one SST file (``shards.sst.write_sst``) into the
servers' spool directory, and each replica checks the file and links it into its own RocksDB
(``Ingest`` with ``files``), instead of every replica receiving the rows and writing its own
copy. RocksDB never changes a file it ingested, and deleting one link (a compaction, a dropped
version) leaves the others.

A server takes a spooled file only if it is a regular file under its spool directory, owned by
the server's own user, and byte for byte the file ``write_sst`` writes for the exact keys of the
partition's ids in the chunk (``shards.sst.read_sst_values``, every block checksum included);
it reads the rows out of it while checking (for its memory tier and the ingest record's
checksum). Anything else is refused, naming the file, and the loader sends that server rows
instead. ``host_id`` tells the loader which servers share its host.
"""
from __future__ import annotations

import mmap
import os
import socket

import grpc
import numpy as np

from shards.sst import read_sst_values
from shoal.errors import ShoalError

SPOOL_DIR_NAME = "spool"


def host_id() -> str:
    """This host, as the loader and servers compare it: its name and this boot's id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def default_spool_dir(data_dir: os.PathLike | str) -> str:
    """Where a server whose data directory is ``data_dir`` (one of a cluster's, side by side)
    takes spooled files from: ``spool`` beside it, shared by the servers of that directory."""
    return os.path.join(os.path.dirname(os.path.abspath(data_dir)), SPOOL_DIR_NAME)


def open_spooled(spool_dir: str, path: str, keys: np.ndarray, out: np.ndarray,
                 field: str) -> int:
    """Open the spooled SST file ``path``, check it (see the module doc) and copy its values
    into ``out`` (uint8 [n, value_len]); the open descriptor, which names the inode checked.
    INVALID_ARGUMENT for a file that is not what it must be, FAILED_PRECONDITION for one this
    server cannot see (the loader on another host, or in another mount namespace)."""
    real = os.path.realpath(path) if path and "\0" not in path else ""
    root = os.path.realpath(spool_dir) if spool_dir else "\0"
    if not real.startswith(root + os.sep):
        raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{field}: {path!r} is not under this server's spool directory "
                         f"{spool_dir!r}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"{field}: cannot open {path!r} here ({e.strerror}): is the loader "
                         "on another host?") from None
    try:
        st = os.fstat(fd)
        want = f"a regular file owned by uid {os.geteuid()}"
        if not (st.st_mode & 0o170000 == 0o100000 and st.st_uid == os.geteuid()):
            raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{field}: {path!r} is not {want}")
        limit = 2 * out.nbytes + keys.nbytes * 4 + (1 << 20)    # the layout's overhead < this
        if not 0 < st.st_size <= limit:
            raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{field}: {path!r} is {st.st_size} bytes; an SST file of "
                             f"{len(keys)} rows of {out.shape[1]} bytes is under {limit}")
        # Unmapped when the last view of it goes (an explicit close would fail while an
        # exception's frames still hold one).
        # (MAP_POPULATE: the cached pages mapped in one call, not a fault per page.)
        buf = np.frombuffer(mmap.mmap(fd, st.st_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                      mmap.PROT_READ), np.uint8)
        try:
            read_sst_values(buf, keys, out)
        except ValueError as e:
            raise ShoalError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{field}: {path!r} is not the SST file of these rows: {e}") from None
        return fd
    except BaseException:
        os.close(fd)
        raise


def chunk_ids(lo: int, hi: int, partition: int, num_partitions: int) -> np.ndarray:
    """The ids of ``partition`` (``id & (P - 1)``) in ``[lo, hi)``, ascending."""
    first = lo + (partition - lo) % num_partitions
    return np.arange(first, hi, num_partitions, dtype=np.int64)


def chunk_counts(lo: int, hi: int, partitions: np.ndarray, num_partitions: int) -> np.ndarray:
    """How many ids each of ``partitions`` has in ``[lo, hi)`` (``len(chunk_ids(...))``, for
    all of them at once)."""
    first = lo + (partitions - lo) % num_partitions
    return np.maximum(0, -(-(hi - first) // num_partitions))


def write_chunk_files(directory: str, table_uid: int, num_partitions: int, ids: np.ndarray,
                      raw: np.ndarray, partitions: list[int]) -> dict[int, str] | None:
    """The loader's side: one SST file per partition of ``partitions`` with rows in the chunk
    (``ids`` ascending, ``raw`` uint8 [n, row_bytes] their rows), written and synced into
    ``directory``: {partition: path}. None if the chunk does not hold every id of each of its
    partitions in its range (such a chunk goes as rows)."""
    from shards.sst import write_sst
    from shards.storage import key_array, start_writeback, sync_file

    P, n = num_partitions, len(ids)
    lo, hi = int(ids[0]), int(ids[-1]) + 1
    contiguous = hi - lo == n
    parts = ids & (P - 1)
    if not contiguous:
        want = chunk_counts(lo, hi, np.arange(P), P)
        have = np.bincount(parts, minlength=P)
        if (n > 1 and not (ids[1:] > ids[:-1]).all()) or not ((have == 0) | (have == want)).all():
            return None
    paths = {}
    for p in partitions:
        sel = raw[(p - lo) % P::P] if contiguous else raw[parts == p]
        if not len(sel):
            continue
        path = os.path.join(directory, f"t{table_uid}-p{p}-{lo}.sst")
        write_sst(path, [(key_array(table_uid, p, chunk_ids(lo, hi, p, P)), sel)])
        start_writeback(path)
        paths[p] = path
    for path in paths.values():
        sync_file(path)
    return paths


def release(paths) -> None:
    """Drop spooled files once every replica has linked them in: this link, and their pages
    from the page cache (the memory tier serves those rows; the next files reuse the pages)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.unlink(path)
