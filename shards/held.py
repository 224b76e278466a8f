"""What a shard server keeps per table it holds (``HeldTable``): the map's view of its
partitions (epochs, roles, peers), its memory tier (arena, row cache) and replication log, and
the locks that order lookups, writes and map changes.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from embeddings.specs import TableSpec
from shards.memory import RWLock, TableArena
from shards.replog import ReplicationLog
from shards.rowcache import RowCache

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class HeldTable:
    spec: TableSpec
    epochs: np.ndarray                  # int64 [P]: epoch of each partition held here, 0 = not held
    arena: TableArena
    log: ReplicationLog
    lock: RWLock = field(default_factory=RWLock)          # arena readers vs. arena writers
    # The hottest rows, when the rows held here do not all fit in memory (shards.tiers); its
    # lock is taken inside ``lock`` and ``write_mutex``, never around them.
    cache: RowCache | None = None
    cache_lock: threading.Lock = field(default_factory=threading.Lock)
    write_mutex: threading.Lock = field(default_factory=threading.Lock)   # one writer of rows
    # From the map (replaced whole under write_mutex): the partitions this server leads, the
    # leader of each partition held, and per other server the partitions it follows or learns
    # of those this server leads.
    leads: np.ndarray = None
    serves: np.ndarray = None           # bool [P]: a replica here (not a learner): may be read
    leader_of: dict[int, str] = field(default_factory=dict)
    peers: dict[str, np.ndarray] = field(default_factory=dict)
    learners: dict[str, np.ndarray] = field(default_factory=dict)
    # Soft, changed under write_mutex: learners caught up with this leader, which get every write.
    attached: dict[str, np.ndarray] = field(default_factory=dict)
    looked_up: np.ndarray = None        # int64 [P]: ids looked up per partition (load), cumulative
    # bool [P]: this copy failed to store a leader's entry (a full disk): its rows may lack an
    # acknowledged write, so it refuses reads (UNAVAILABLE: the router asks another replica)
    # until a later entry applies after it (a catch-up filled the gap) or the copy is reset.
    missed: np.ndarray = None
    # int64 [P]: rows of the partition stored or dropped (a count): a partition scanned outside
    # the locks is rescanned under them if it changed meanwhile (``_scan_new``).
    written: np.ndarray = None
    frozen: bool = False                # being split: writes wait for the cut-over
    loading: bool = False               # of a model version being loaded: takes Ingest

    def __post_init__(self):
        self.all_partitions = np.arange(self.spec.num_partitions, dtype=np.int32)
        if self.looked_up is None:
            self.looked_up = np.zeros(self.spec.num_partitions, np.int64)
        if self.missed is None:
            self.missed = np.zeros(self.spec.num_partitions, bool)
        if self.written is None:
            self.written = np.zeros(self.spec.num_partitions, np.int64)

    @property
    def no_parts(self) -> np.ndarray:
        return np.zeros(self.spec.num_partitions, dtype=bool)

    def learner_mask(self, server: str) -> np.ndarray:
        return self.learners.get(server, self.no_parts)

    def attach(self, server: str, partition: int) -> None:
        self.attached.setdefault(server, self.no_parts)[partition] = True

    def detach(self, server: str, partition: int) -> None:
        if server in self.attached:
            self.attached[server][partition] = False
