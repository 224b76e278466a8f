"""Applying the shard map on a shard server: which partitions it holds and in which role,
how its memory budget is spent on them (``shards.tiers``: arenas and row caches), reading
partitions that become resident, and deleting copies no longer needed. A mixin of
``ShardService``; ``refresh_map`` is the entry point (the heartbeat's map applier, a request
routed at a newer version, a replica build).
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from embeddings.partition import rows_in_partition
from embeddings.specs import TableSpec
from shoal.proto import shoal_pb2 as pb

from shards import tiers, warm
from shards.held import TORCH_DTYPES, HeldTable
from shards.memory import TableArena
from shards.replog import ReplicationLog
from shards.rowcache import RowCache

log = logging.getLogger("shard")


class MapApplier:
    """Needs from the host: ``server_id``, ``_store``, ``_cfg``, ``_tables``, ``_addresses``,
    ``_map_lock``, ``_map_version``, ``_fetch_map``, ``_rows_budget``, ``store_memory``,
    ``_on_disk``, ``_shadow``, ``_split_work``, ``_counters``, ``failpoints``."""

    def refresh_map(self, at_least: int = 0) -> None:
        """Fetch and apply the coordinator's map unless ours is already at ``at_least``."""
        with self._map_lock:
            if at_least and self._map_version >= at_least:
                return
            self.failpoints.hit("map.apply")
            m = self._fetch_map(self._map_version)
            if m is not None:
                t0 = time.perf_counter()
                self._apply(m)
                log.info("applied map version %d in %.1f ms", m.version,
                         (time.perf_counter() - t0) * 1e3)
        self._ready = True

    def _apply(self, m: pb.ShardMap) -> None:
        specs = {t.table_uid: TableSpec.from_proto(t) for md in m.models for t in md.tables}
        replication = {t.table_uid: md.replication for md in m.models for t in md.tables}
        sets = {(rs.table_uid, rs.partition): rs for rs in m.partitions}
        held: dict[int, dict[int, pb.ReplicaSet]] = {}
        for rs in m.partitions:
            if self.server_id in rs.replicas or self.server_id in rs.learners:
                held.setdefault(rs.table_uid, {})[rs.partition] = rs
        self._addresses = {s.server_id: s.address for s in m.servers}
        log_bytes = self.store_memory.log // max(1, len(held))
        splits = {sp.table_uid: sp for sp in m.splits}
        loading = {t.table_uid for md in m.models if md.state == "loading" for t in md.tables}
        shadows = self._shadows(splits, held)
        experts = {t.table_uid for md in m.models for t in md.tables
                   if t.name in {el.table for el in md.expert_layers}}
        layout, loaded = {}, []
        for uid in sorted(held) + sorted(shadows):
            spec = specs[uid] if uid in held else TableSpec.from_proto(shadows[uid][0])
            parts = held[uid] if uid in held else {q: None for q in shadows[uid][1]}
            layout[uid] = (spec, parts)
        plans = tiers.plan(self._rows_budget, self._needs(layout, experts))
        for uid, (spec, parts) in layout.items():
            table = self._tables.get(uid)
            if table is None:
                arena = TableArena(spec.num_embeddings, spec.dim, TORCH_DTYPES[spec.dtype],
                                   spec.num_partitions, self._cfg.arena_huge_pages)
                seq, epoch = self._store.read_positions(uid, spec.num_partitions)
                table = HeldTable(spec, np.zeros(spec.num_partitions, np.int64), arena,
                                  ReplicationLog(seq, epoch, log_bytes))
            plan = plans[uid]
            resident = sorted(parts) if plan.resident_all else plan.resident
            cache = self._sized_cache(table, plan.cache_rows)
            roles = self._roles(spec.num_partitions, held.get(uid, {}))
            left = np.flatnonzero((table.epochs > 0) & (roles[0] == 0))
            old, carried = table.cache, None
            if cache is not None and old is not None and cache is not old:
                with table.cache_lock:            # a new share: keep the hottest rows
                    carried = old.generation.copy()
                old.carry_to(cache, table.cache_lock)
            scans = self._scan_new(table, [p for p in resident if not table.arena.resident(p)])
            if scans:
                self.failpoints.hit("map.fill")
            # A map's epochs and the arena's slots change together under the write lock, and
            # lookups check epochs and gather under the read lock: a lookup never passes the
            # check against one map and then reads a slot the next map released.
            with table.write_mutex, table.lock.write():
                for p in table.arena.set_partitions(resident):
                    seen = scans.get(p)
                    if seen is None or seen[0] != table.written[p]:   # changed since: again
                        log.info("partition %d of table %r changed while it was read into "
                                 "memory: read again under the lock", p, spec.name)
                        seen = (0, *self._store.scan_partition(uid, p))
                    if seen[2]:
                        table.arena.fill(p, seen[1], torch.frombuffer(
                            bytearray(seen[2]), dtype=table.arena.dtype).view(-1, spec.dim))
                with table.cache_lock:
                    changed = np.flatnonzero(old.generation != carried) if carried is not None \
                        else ()
                    if len(changed):              # written or dropped since the carry
                        cache.drop_partitions(changed)
                    if cache is not None and left.size:
                        cache.drop_partitions(left)   # their copies may change before they return
                    table.cache = cache
                (table.epochs, table.leads, table.serves, table.leader_of, table.peers,
                 table.learners) = roles
                table.attached = {s: a & table.learner_mask(s)
                                  for s, a in table.attached.items() if s in table.learners}
                table.log.set_budget(log_bytes)
                table.frozen = uid in splits and splits[uid].frozen
                was_loading, table.loading = table.loading, uid in loading
            if was_loading and not table.loading:
                loaded.append(uid)
            self._tables[uid] = table
        self._split_work = [(uid, p, sp.new_table.table_uid) for uid, sp in sorted(splits.items())
                            for p in sorted(held.get(uid, {}))
                            if self.server_id in held[uid][p].replicas]
        self._shadow = {(uid, q) for uid, (_, qs) in shadows.items() for q in qs}
        for uid in set(self._tables) - set(held) - set(shadows):
            gone = self._tables.pop(uid)
            with gone.write_mutex, gone.lock.write():   # a request holding it is redirected
                gone.epochs = np.zeros_like(gone.epochs)
                gone.serves = np.zeros_like(gone.epochs, dtype=bool)
                gone.leads = np.zeros_like(gone.epochs, dtype=bool)
        self._collect_garbage(specs, replication, sets, held)
        self._map_version = m.version
        self._inherit_hot_sets(m, loaded)

    def _inherit_hot_sets(self, m: pb.ShardMap, loaded: list[int]) -> None:
        """A version just loaded starts its row caches from the hot set of the same table in
        the newest older version held here (``shards.warm``), in a thread of its own."""
        owner = {t.table_uid: (md.name, md.version, t.name) for md in m.models for t in md.tables}
        for uid in loaded:
            name, version, table = owner[uid]
            older = sorted((v, u) for u, (n, v, t) in owner.items()
                           if n == name and t == table and v < version and u in self._tables)
            if older and self._tables[uid].cache is not None:
                threading.Thread(target=warm.inherit, daemon=True, name="warmer",
                                 args=(self, self._tables[uid], self._tables[older[-1][1]])
                                 ).start()

    def _scan_new(self, table: HeldTable, partitions: list[int]) -> dict[int, tuple]:
        """{partition: (its ``written`` count, ids, row bytes)}: the stored rows of partitions
        about to become resident, read outside the table's locks (a RocksDB iterator, taken
        between two writes, is a consistent view); reads and writes go on meanwhile."""
        out = {}
        for p in partitions:
            with table.write_mutex:
                seen = int(table.written[p])
                snap = self._store.snapshot_partition(table.spec.table_uid, p)
            try:
                out[p] = (seen, *snap.read(None))
            finally:
                snap.close()
        return out

    def _needs(self, layout, experts: set[int]) -> dict[int, tiers.TableNeed]:
        """What each table holds here, for ``tiers.plan``: an expert layer's partitions most
        used first."""
        needs = {}
        for uid, (spec, parts) in layout.items():
            ps = sorted(parts)
            sizes = [rows_in_partition(spec.num_embeddings, spec.num_partitions, p) *
                     spec.row_bytes for p in ps]
            if uid in experts:
                old = self._tables.get(uid)
                used = old.looked_up if old is not None else np.zeros(spec.num_partitions)
                order = sorted(range(len(ps)), key=lambda i: (-int(used[ps[i]]), ps[i]))
                by_use = [(ps[i], sizes[i]) for i in order]
            else:
                by_use = []
            needs[uid] = tiers.TableNeed(sum(sizes), spec.row_bytes, uid in experts, by_use)
        return needs

    def _sized_cache(self, table: HeldTable, rows: int) -> RowCache | None:
        """The table's row cache for ``rows`` slots: the one it has if within 25% of that
        (a cache is not rebuilt, and emptied, for a small change of share), else a new one."""
        if rows < self._cfg.cache_ways:
            return None
        old = table.cache
        if old is not None and abs(old.capacity - rows) <= rows // 4:
            return old
        spec = table.spec
        return RowCache(spec.num_partitions, spec.dim, TORCH_DTYPES[spec.dtype], rows,
                        ways=self._cfg.cache_ways, policy=self._cfg.cache_policy)

    def _shadows(self, splits: dict[int, pb.Split], held) -> dict[int, tuple[pb.TableSpec,
                                                                           list[int]]]:
        """The doubled tables of splits this server builds: new uid -> (spec, the partitions p
        and p + P for every old partition p it holds a replica of)."""
        out = {}
        for uid, sp in splits.items():
            half = sp.new_table.num_partitions // 2
            mine = [p for p, rs in held.get(uid, {}).items() if self.server_id in rs.replicas]
            if mine:
                out[sp.new_table.table_uid] = (sp.new_table,
                                               sorted(mine + [p + half for p in mine]))
        return out

    def _roles(self, num_partitions: int, held: dict[int, pb.ReplicaSet]):
        epochs = np.zeros(num_partitions, np.int64)
        leads = np.zeros(num_partitions, bool)
        serves = np.zeros(num_partitions, bool)
        leader_of, peers, learners = {}, {}, {}
        for p, rs in held.items():
            epochs[p] = rs.epoch
            serves[p] = self.server_id in rs.replicas
            leader_of[p] = rs.replicas[0] if rs.replicas else ""
            if leader_of[p] != self.server_id:
                continue
            leads[p] = True
            for s in rs.replicas[1:]:
                peers.setdefault(s, np.zeros(num_partitions, bool))[p] = True
            for s in rs.learners:
                learners.setdefault(s, np.zeros(num_partitions, bool))[p] = True
        return epochs, leads, serves, leader_of, peers, learners

    def _collect_garbage(self, specs, replication, sets, held) -> None:
        """Delete the copies of partitions this server no longer holds once they are not
        needed: the table is gone, or the partition has its full replica set elsewhere. (A copy
        is kept until then: if this server is asked to rebuild it, it may only need to catch
        up.)"""
        for uid, p in sorted(self._on_disk):
            if p in held.get(uid, {}) or (uid, p) in self._shadow:
                continue
            rs = sets.get((uid, p))
            if uid in specs and (rs is None or len(rs.replicas) < replication[uid]):
                continue
            self._store.drop_partition(uid, p)
            self._on_disk.discard((uid, p))
            self._counters["dropped_partitions"] += 1
            table = self._tables.get(uid)
            if table is not None:
                with table.write_mutex:
                    table.log.reset(p, 0, 0)
