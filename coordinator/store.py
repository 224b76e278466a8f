"""Where the coordinator keeps its durable state.

Contract: ``save(state)`` is called after every change, before the change is acknowledged, and
is atomic (all of the state or none of it). ``load()`` is called once at start-up and returns the
last saved state, or None for a new cluster.
"""
from __future__ import annotations

import abc
import pathlib
import sqlite3
import threading

from shoal.proto import shoal_pb2 as pb

from coordinator.state import ClusterState


class StateStore(abc.ABC):
    @abc.abstractmethod
    def load(self) -> ClusterState | None: ...

    @abc.abstractmethod
    def save(self, state: ClusterState) -> None: ...

    # Blobs beside the state (a model version's dense parameters), durable once put.
    @abc.abstractmethod
    def put_blob(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_blob(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    def delete_blob(self, key: str) -> None: ...


class MemoryStateStore(StateStore):
    """For unit tests of coordinator logic."""

    def __init__(self):
        self._state: ClusterState | None = None
        self._blobs: dict[str, bytes] = {}

    def load(self):
        return self._state.copy() if self._state else None

    def save(self, state):
        self._state = state.copy()

    def put_blob(self, key, data):
        self._blobs[key] = bytes(data)

    def get_blob(self, key):
        return self._blobs.get(key)

    def delete_blob(self, key):
        self._blobs.pop(key, None)


class SqliteStateStore(StateStore):
    """The state as one serialised ShardMap row, replaced in a single transaction (WAL mode,
    synchronous=FULL), so a crash leaves either the old state or the new one."""

    def __init__(self, path: str | pathlib.Path):
        self._path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS state "
                         "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER, "
                         "next_table_uid INTEGER, shard_map BLOB)")
        self._db.execute("CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, data BLOB)")

    def load(self):
        row = self._db.execute("SELECT next_table_uid, shard_map FROM state WHERE id = 1").fetchone()
        if row is None:
            return None
        return ClusterState.from_map(pb.ShardMap.FromString(row[1]), row[0])

    def save(self, state):
        blob = state.to_map().SerializeToString()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO state VALUES (1, ?, ?, ?)",
                             (state.version, state.next_table_uid, blob))

    def put_blob(self, key, data):
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?)", (key, bytes(data)))

    def get_blob(self, key):
        row = self._db.execute("SELECT data FROM blobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def delete_blob(self, key):
        with self._lock:
            self._db.execute("DELETE FROM blobs WHERE key = ?", (key,))

    def close(self):
        self._db.close()
