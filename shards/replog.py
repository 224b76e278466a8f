"""Per-partition sequence numbers and the log of recent writes, for one table on one server.

Every write a leader accepts becomes an ``Entry``: for each partition it touches, that
partition's next sequence number and the epoch it was written at. ``(epoch, seq)`` names an
entry: one server leads a partition at one epoch. Every replica keeps the same bookkeeping for
the entries it applies, so any of them can lead next and any can answer a catch-up.

The log keeps the newest entries within a byte budget (an entry larger than the whole budget,
such as a bulk load's, is not kept). It serves three things: catching a
replica up after it missed entries (``since``), checking that a returning replica's history is
a prefix of the leader's (``epoch_at``), and deduplicating a resent write by its idempotency key
(``by_request``). Pure bookkeeping, no I/O: the caller makes entries durable before
``append``ing them, and holds the table's write mutex around every call.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from embeddings.partition import partition_of
from shoal.proto import shoal_pb2 as pb
from shoal.wire import pack, unpack

NONE = np.iinfo(np.int64).max      # "not wanted" in an ``after`` array


@dataclass(frozen=True)
class Entry:
    request_id: str
    parts: np.ndarray          # int32, ascending, unique
    seqs: np.ndarray           # int64 per partition
    epochs: np.ndarray         # int64 per partition: epoch it was written at
    prev_epochs: np.ndarray    # int64 per partition: epoch of the entry at seq - 1
    ids: np.ndarray            # int64
    rows: np.ndarray           # [n, dim]
    row_parts: np.ndarray      # int64 partition of every id

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.rows.nbytes + 256

    def restrict(self, keep: np.ndarray) -> "Entry | None":
        """The entry limited to the partitions where ``keep`` (bool, by partition) is set."""
        k = keep[self.parts]
        if k.all():
            return self
        if not k.any():
            return None
        r = keep[self.row_parts]
        return Entry(self.request_id, self.parts[k], self.seqs[k], self.epochs[k],
                     self.prev_epochs[k], self.ids[r], self.rows[r], self.row_parts[r])

    def to_proto(self) -> pb.LogEntry:
        return pb.LogEntry(request_id=self.request_id, partitions=pack(self.parts),
                           seqs=pack(self.seqs), write_epochs=pack(self.epochs),
                           prev_epochs=pack(self.prev_epochs), ids=pack(self.ids),
                           rows=pack(self.rows))

    @classmethod
    def from_proto(cls, e: pb.LogEntry, num_partitions: int, dtype: str, dim: int,
                   where: str = "entry") -> "Entry":
        from shoal.errors import InvalidArgument
        parts = unpack(e.partitions, f"{where}.partitions", "int32", 1)
        seqs = unpack(e.seqs, f"{where}.seqs", "int64", 1)
        epochs = unpack(e.write_epochs, f"{where}.write_epochs", "int64", 1)
        prev = unpack(e.prev_epochs, f"{where}.prev_epochs", "int64", 1)
        ids = unpack(e.ids, f"{where}.ids", "int64", 1)
        rows = unpack(e.rows, f"{where}.rows", dtype, 2)
        if not (len(parts) == len(seqs) == len(epochs) == len(prev)):
            raise InvalidArgument(f"{where}: partitions, seqs, write_epochs and prev_epochs "
                                  f"must have one value per partition ({len(parts)})")
        if rows.shape != (len(ids), dim):
            raise InvalidArgument(f"{where}.rows: shape {list(rows.shape)} must be "
                                  f"[{len(ids)}, {dim}]")
        if parts.size and (parts.min() < 0 or parts.max() >= num_partitions
                           or (np.diff(parts) <= 0).any()):
            raise InvalidArgument(f"{where}.partitions: must be ascending, unique, in "
                                  f"[0, {num_partitions})")
        if seqs.size and seqs.min() < 1:
            raise InvalidArgument(f"{where}.seqs: must be >= 1")
        row_parts = partition_of(ids, num_partitions)
        if ids.size and not np.isin(row_parts, parts).all():
            raise InvalidArgument(f"{where}.ids: an id lies outside the entry's partitions")
        return cls(e.request_id, parts, seqs, epochs, prev, ids, rows, row_parts)


class ReplicationLog:
    def __init__(self, seq: np.ndarray, epoch: np.ndarray, max_bytes: int):
        """``seq``/``epoch``: each partition's last applied entry, as stored on disk."""
        self.seq = seq.astype(np.int64)
        self.epoch = epoch.astype(np.int64)
        # The newest entry of each partition no longer in the log (at start: the last applied).
        self.floor_seq = self.seq.copy()
        self.floor_epoch = self.epoch.copy()
        self._entries: collections.deque[Entry] = collections.deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._by_request: dict[str, list[Entry]] = {}

    @property
    def nbytes(self) -> int:
        return self._bytes

    def set_budget(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        while self._bytes > self._max_bytes and self._entries:
            self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------ leader side
    def next_entry(self, request_id: str, epochs_now: np.ndarray, ids: np.ndarray,
                   rows: np.ndarray, row_parts: np.ndarray) -> Entry:
        """The entry a leader gives a new write (not yet applied; see ``append``)."""
        parts = np.unique(row_parts).astype(np.int32)
        return Entry(request_id, parts, self.seq[parts] + 1, epochs_now[parts].astype(np.int64),
                     self.epoch[parts].copy(), ids, rows, row_parts)

    def by_request(self, request_id: str) -> list[Entry]:
        return list(self._by_request.get(request_id, ())) if request_id else []

    # ------------------------------------------------------------ replica side
    def classify(self, e: Entry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per partition of ``e``: (new, behind, diverged) bool masks. ``new``: the next entry,
        apply it. ``behind``: earlier entries are missing. ``diverged``: this replica's history
        differs from the sender's. The rest are entries already applied."""
        cur, cur_epoch = self.seq[e.parts], self.epoch[e.parts]
        nxt = e.seqs == cur + 1
        new = nxt & (e.prev_epochs == cur_epoch)
        diverged = nxt & ~new
        diverged |= (e.seqs == cur) & (e.epochs != cur_epoch)
        for i in np.flatnonzero(e.seqs < cur):            # an older entry: rare, during catch-up
            known = self.epoch_at(int(e.parts[i]), int(e.seqs[i]))
            diverged[i] = known is not None and known != e.epochs[i]
        return new, e.seqs > cur + 1, diverged

    def append(self, e: Entry) -> None:
        """Record an entry that is now durably applied (to every partition it names)."""
        self.seq[e.parts] = e.seqs
        self.epoch[e.parts] = e.epochs
        self._entries.append(e)
        self._bytes += e.nbytes
        if e.request_id:
            self._by_request.setdefault(e.request_id, []).append(e)
        while self._bytes > self._max_bytes and self._entries:
            self._evict()

    def _evict(self) -> None:
        old = self._entries.popleft()
        self._bytes -= old.nbytes
        self.floor_seq[old.parts] = old.seqs
        self.floor_epoch[old.parts] = old.epochs
        if old.request_id:
            same = self._by_request.get(old.request_id, [])
            same[:] = [x for x in same if x is not old]
            if not same:
                self._by_request.pop(old.request_id, None)

    def reset(self, partition: int, seq: int, epoch: int) -> None:
        """The partition's data was replaced (a snapshot installed, or dropped: 0, 0); forget its
        entries."""
        self.seq[partition] = self.floor_seq[partition] = seq
        self.epoch[partition] = self.floor_epoch[partition] = epoch
        keep = np.ones(len(self.seq), dtype=bool)
        keep[partition] = False
        entries, self._entries, self._bytes, self._by_request = self._entries, \
            collections.deque(), 0, {}
        for e in entries:
            r = e.restrict(keep)
            if r is not None:
                self._entries.append(r)
                self._bytes += r.nbytes
                if r.request_id:
                    self._by_request.setdefault(r.request_id, []).append(r)

    # ------------------------------------------------------------ history queries
    def epoch_at(self, partition: int, seq: int) -> int | None:
        """Epoch of this replica's entry ``seq`` of ``partition``; None if it is not known
        (older than the log, or beyond the last applied)."""
        if seq == self.seq[partition]:
            return int(self.epoch[partition])
        if seq == self.floor_seq[partition]:
            return int(self.floor_epoch[partition])
        if not self.floor_seq[partition] < seq < self.seq[partition]:
            return None
        for e in reversed(self._entries):
            i = np.searchsorted(e.parts, partition)
            if i < len(e.parts) and e.parts[i] == partition and e.seqs[i] == seq:
                return int(e.epochs[i])
        return None

    def since(self, after: np.ndarray, max_bytes: int = 0) -> tuple[list[Entry], bool] | None:
        """Entries past ``after`` (int64 by partition; ``NONE`` for partitions not wanted),
        restricted to the wanted partitions, oldest first, up to ``max_bytes`` (0: all).
        Returns (entries, complete) or None when the log no longer reaches back that far."""
        wanted = after != NONE
        if (after[wanted] < self.floor_seq[wanted]).any():
            return None
        out, size = [], 0
        for e in self._entries:
            k = np.zeros(len(after), dtype=bool)
            k[e.parts] = e.seqs > after[e.parts]
            r = e.restrict(k)
            if r is None:
                continue
            if max_bytes and out and size + r.nbytes > max_bytes:
                return out, False
            out.append(r)
            size += r.nbytes
        return out, True
