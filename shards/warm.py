"""Warm starts: a row cache that begins with the hot set, not empty.

Three ways a server comes to hold rows it has no cache for, and where each finds its hot set:

- **A restart** (or a crash): every ``server.hot_save_interval_s`` the server writes each row
  cache's keys and scores, hottest first, to ``hot/<table_uid>.npy`` in its data directory
  (written whole and renamed; ``save_hot``). When it starts serving again a ``warmer`` thread
  reads those rows from its own RocksDB and admits them with their scores (``warm_from_files``).
- **A new replica or a moved partition**: once its copy is complete, the learner asks the
  leader it copied from for the partition's hot ids (``HotIds``) and admits them the same way
  before it reports ready (``shards.replication``).
- **A new version of a model**, once loaded: each table's cache starts from the hot set of the
  same table in the version before it, if this server holds that (``inherit``): the hot ids of
  a recommendation model change little between versions; the rows are the new version's.

Admission is the read path's: rows read from this server's copy, offered with the partition
generations taken before the read (``RowCache.insert(since=)``), so a write or a drop that
lands meanwhile wins; scores travel with the ids, so the warm rows are not the first evicted.
Reads go in chunks of ``CHUNK`` ids, the hottest first.
"""
from __future__ import annotations

import logging
import os
import pathlib
import time

import numpy as np

from embeddings.partition import partition_of
from shards.rowcache import top_slots

log = logging.getLogger("shard.warm")
CHUNK = 4096
HOT_DTYPE = np.dtype([("id", "<i8"), ("score", "<i4")])


def hot_dir(data_dir) -> pathlib.Path:
    return pathlib.Path(data_dir) / "hot"


def hot_set(table, limit: int | None = None, partitions=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) the table's row cache holds, hottest first (none without a cache)."""
    with table.cache_lock:                  # copies only: lookups wait on this lock
        cache = table.cache
        if cache is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        keys, score = cache.keys.copy(), cache.score.copy()
        limit = cache.capacity if limit is None else limit
    slots = top_slots(keys, score, limit, table.spec.num_partitions, partitions)
    return keys.reshape(-1)[slots], score.reshape(-1)[slots]


def save_hot(service, data_dir) -> int:
    """Write every row cache's hot set; files of tables no longer cached here are removed.
    Returns the ids written."""
    where = hot_dir(data_dir)
    where.mkdir(exist_ok=True)
    kept, total = set(), 0
    for uid, table in service.held_tables().items():
        ids, scores = hot_set(table)
        if not ids.size:
            continue
        out = np.empty(len(ids), HOT_DTYPE)
        out["id"], out["score"] = ids, scores
        tmp = where / f"{uid}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, out)
        os.replace(tmp, where / f"{uid}.npy")
        kept.add(f"{uid}.npy")
        total += len(ids)
    for f in where.glob("*.npy"):
        if f.name not in kept:
            f.unlink(missing_ok=True)
    return total


def warm(service, table, ids: np.ndarray, scores: np.ndarray) -> int:
    """Read the rows of ``ids`` (hottest first) from this server's complete copies and offer
    them to the table's row cache with ``scores``; ids of other partitions are skipped.
    Returns the rows admitted."""
    spec = table.spec
    ok = (ids >= 0) & (ids < spec.num_embeddings)
    ids, scores = ids[ok], scores[ok]
    parts = partition_of(ids, spec.num_partitions)
    mine = service.complete_copies(spec.table_uid)[parts]
    ids, scores, parts = ids[mine], scores[mine], parts[mine]
    admitted = 0
    for a in range(0, len(ids), CHUNK):
        ci, cs, cp = ids[a:a + CHUNK], scores[a:a + CHUNK], parts[a:a + CHUNK]
        with table.cache_lock:
            cache = table.cache
            if cache is None:
                break
            since = cache.generation[cp].copy()
        rows = service.reader.read_store(spec, cp, ci, table.arena.dtype)
        with table.cache_lock:
            if table.cache is not cache:
                break
            admitted += cache.insert(ci, rows, cp, since, cs)
    return admitted


def warm_from_files(service, data_dir) -> int:
    """Admit each table's saved hot set (a restart); returns the rows admitted."""
    total = 0
    for f in sorted(hot_dir(data_dir).glob("*.npy")):
        try:
            uid = int(f.stem)
            table = service.held_tables().get(uid)
            if table is None:
                continue
            saved = np.load(f)
            t0 = time.perf_counter()
            n = warm(service, table, saved["id"].astype(np.int64), saved["score"])
            total += n
            log.info("warm start: %d of %d saved hot rows of table %r admitted in %.2f s", n,
                     len(saved), table.spec.name, time.perf_counter() - t0)
        except Exception:
            log.exception("warming the row cache from %s failed", f)
    return total


def inherit(service, table, older) -> int:
    """Start ``table``'s row cache (a version just loaded) with the hot set of ``older`` (the
    same table in the version before); rows admitted."""
    try:
        t0 = time.perf_counter()
        ids, scores = hot_set(older)
        n = warm(service, table, ids, scores)
        log.info("warm start: %d hot rows of table %r (table_uid %d) admitted from the version "
                 "before (table_uid %d) in %.2f s", n, table.spec.name, table.spec.table_uid,
                 older.spec.table_uid, time.perf_counter() - t0)
        return n
    except Exception:
        log.exception("warming table_uid %d from table_uid %d failed", table.spec.table_uid,
                      older.spec.table_uid)
        return 0
