"""How a shard server divides its memory budget: the fixed part (RocksDB's block cache and
memtables, the replication log), then the rows it holds.

Disk is the capacity; memory is a cache. Every held row is in RocksDB. If the rows a server
holds fit in what the budget leaves after RocksDB's share, every held partition is resident in
its table's arena (``shards.memory``): the cache holds everything and a lookup indexes it
directly. Otherwise each table gets a share of that memory in proportion to the bytes it holds
here, and

- an embedding table keeps its hottest rows in a row cache (``shards.rowcache``) of that size;
- an expert layer (whose rows are read a whole expert at a time, as matrices) keeps its most
  used experts resident, whole, in its arena, and reads the others from RocksDB.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# A cache slot's bookkeeping beside its row: its key (8 bytes), score (4) and 8 count-sketch
# counters (32) (``RowCache.nbytes``).
SLOT_OVERHEAD = 8 + 4 + 32
MIN_MEMTABLE = 1 << 20
MAX_MEMTABLE = 32 << 20
MEMTABLES = 3


@dataclass(frozen=True)
class StoreMemory:
    """The fixed part of a server's budget."""
    block_cache: int
    memtable: int              # one write buffer; RocksDB keeps up to MEMTABLES of them
    log: int = 0               # the replication log's cap (recent writes, for catch-up)

    @property
    def total(self) -> int:
        return self.block_cache + MEMTABLES * self.memtable + self.log


def store_memory(budget: int, block_cache: int, log: int = 0) -> StoreMemory:
    """RocksDB's block cache (as configured, at most 1/8 of the budget), write buffers (1/16
    of the budget, within [1, 32] MiB) and the replication log (as configured, at most 1/8)."""
    return StoreMemory(block_cache=max(1 << 16, min(block_cache, budget // 8)),
                       memtable=max(MIN_MEMTABLE, min(MAX_MEMTABLE, budget // 16)),
                       log=max(1 << 20, min(log, budget // 8)) if log else 0)


def rows_budget(budget: int, store: StoreMemory) -> int:
    """What the budget leaves for rows (0 if RocksDB's share takes it all)."""
    return max(0, budget - store.total)


def budget_for_rows(rows_bytes: int, block_cache: int = 64 << 20, log: int = 64 << 20) -> int:
    """The smallest budget (to 4 KiB) whose rows share is at least ``rows_bytes`` (with the
    server config's block cache and replication log, by default the defaults)."""
    lo, hi = rows_bytes, 2 * rows_bytes + MEMTABLES * MAX_MEMTABLE + block_cache + log
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if rows_budget(mid, store_memory(mid, block_cache, log)) >= rows_bytes:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass
class TableNeed:
    held_bytes: int                         # bytes of the partitions held here
    row_bytes: int
    expert: bool = False
    # Expert layers: (partition, bytes) of each held partition, most used first.
    partitions: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class TablePlan:
    resident_all: bool = False              # every held partition resident in the arena
    resident: list[int] = field(default_factory=list)   # expert layers: experts made resident
    cache_rows: int = 0                     # embedding tables: row cache slots
    share: int = 0                          # bytes given to this table


def plan(budget: int, needs: dict[int, TableNeed]) -> dict[int, TablePlan]:
    """Each table's part of ``budget`` (the rows budget) and how it uses it."""
    total = sum(n.held_bytes for n in needs.values())
    if total <= budget:
        return {uid: TablePlan(resident_all=True, share=n.held_bytes)
                for uid, n in needs.items()}
    out = {}
    for uid, n in needs.items():
        share = budget * n.held_bytes // total if total else 0
        if n.expert:
            left, resident = share, []
            for p, size in n.partitions:
                if size <= left:
                    resident.append(p)
                    left -= size
            out[uid] = TablePlan(resident=sorted(resident), share=share)
        else:
            out[uid] = TablePlan(cache_rows=share // (n.row_bytes + SLOT_OVERHEAD), share=share)
    return out
