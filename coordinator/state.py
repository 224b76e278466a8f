"""The coordinator's durable state and the pure steps that change it.

Durable (survives a coordinator restart, through a StateStore): the members, the models, the
replica set and epoch of every partition, the map version. Soft (rebuilt from heartbeats after a
restart): liveness and per-server stats. Every change raises ``version`` by one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from embeddings.partition import choose_num_partitions
from embeddings.specs import TableSpec
from experts.layout import table_for
from experts.specs import ExpertLayerSpec
from shoal.config import CoordinatorConfig
from shoal.errors import InvalidArgument, NotFound, ShoalError
from shoal.proto import shoal_pb2 as pb

import grpc

from coordinator.placement import PartitionLoad, ServerLoad, place


@dataclass
class PartitionRecord:
    replicas: tuple[str, ...]
    epoch: int = 1
    learners: tuple[str, ...] = ()     # copies being built: they get writes, serve no reads


@dataclass
class ClusterState:
    version: int = 0
    next_table_uid: int = 1
    servers: dict[str, pb.ServerInfo] = field(default_factory=dict)     # durable part: id, address
    models: dict[tuple[str, int], pb.ModelSpec] = field(default_factory=dict)  # (name, version)
    partitions: dict[tuple[int, int], PartitionRecord] = field(default_factory=dict)
    moves: dict[tuple[int, int], pb.Move] = field(default_factory=dict)   # one per partition
    splits: dict[int, pb.Split] = field(default_factory=dict)     # by the table_uid being split
    autoscale: pb.AutoscaleStatus = field(default_factory=pb.AutoscaleStatus)

    # ------------------------------------------------------------ serialisation
    def to_map(self) -> pb.ShardMap:
        return pb.ShardMap(
            version=self.version,
            models=[md for _, md in sorted(self.models.items())],
            servers=[pb.ServerInfo(server_id=s.server_id, address=s.address,
                                   memory_budget_bytes=s.memory_budget_bytes,
                                   disk_capacity_bytes=s.disk_capacity_bytes,
                                   draining=s.draining, domain=s.domain)
                     for s in self.servers.values()],
            partitions=[pb.ReplicaSet(table_uid=uid, partition=p, replicas=list(r.replicas),
                                      epoch=r.epoch, learners=list(r.learners))
                        for (uid, p), r in sorted(self.partitions.items())],
            moves=[pb.Move(table_uid=m.table_uid, partition=m.partition, source=m.source,
                           target=m.target, bytes=m.bytes)
                   for _, m in sorted(self.moves.items())],
            splits=[sp for _, sp in sorted(self.splits.items())], autoscale=self.autoscale)

    @classmethod
    def from_map(cls, m: pb.ShardMap, next_table_uid: int) -> "ClusterState":
        return cls(version=m.version, next_table_uid=next_table_uid,
                   servers={s.server_id: s for s in m.servers},
                   models=_with_current({(md.name, md.version): md for md in m.models}),
                   partitions={(r.table_uid, r.partition): PartitionRecord(
                                   tuple(r.replicas), r.epoch, tuple(r.learners))
                               for r in m.partitions},
                   moves={(mv.table_uid, mv.partition): mv for mv in m.moves},
                   splits={sp.table_uid: sp for sp in m.splits}, autoscale=m.autoscale)

    def copy(self) -> "ClusterState":
        return copy.deepcopy(self)

    # ------------------------------------------------------------ steps (each returns a new state)
    def with_server(self, server_id: str, address: str, memory_budget: int,
                    domain: str = "", disk_capacity: int = 0) -> "ClusterState":
        old = self.servers.get(server_id)
        if old is not None and old.address == address and \
                old.memory_budget_bytes == memory_budget and old.domain == domain and \
                abs(old.disk_capacity_bytes - disk_capacity) <= \
                max(old.disk_capacity_bytes, disk_capacity) // 20:
            # (a measured capacity moves with the disk's free space: a restart within 5% of
            # the one known is no change of the map)
            return self
        new = self.copy()
        new.servers[server_id] = pb.ServerInfo(server_id=server_id, address=address,
                                               memory_budget_bytes=memory_budget,
                                               disk_capacity_bytes=disk_capacity,
                                               draining=bool(old and old.draining),
                                               domain=domain)
        new.version += 1
        return new

    def current(self, name: str) -> pb.ModelSpec | None:
        """The current version of model ``name`` (None if it has none)."""
        return next((md for (n, _), md in self.models.items() if n == name and md.current),
                    None)

    def versions(self, name: str) -> list[pb.ModelSpec]:
        return [md for (n, _), md in sorted(self.models.items()) if n == name]

    def with_model(self, spec: pb.ModelSpec, alive: list[str], cfg: CoordinatorConfig,
                   default_replication: int,
                   new_version: bool = False) -> tuple["ClusterState", pb.ModelSpec]:
        """Create model ``spec.name`` (version 1, ready, current), or with ``new_version`` its
        next version: loading, not current, with ``spec.tables`` (default: the current
        version's tables, same shapes and partition counts) placed under new table_uids."""
        if not spec.name:
            raise InvalidArgument("model.name: must not be empty")
        existing = self.versions(spec.name)
        base = self.current(spec.name) or (existing[-1] if existing else None)
        if existing and not new_version:
            raise ShoalError(grpc.StatusCode.ALREADY_EXISTS,
                             f"model {spec.name!r} already exists (versions "
                             f"{[md.version for md in existing]}); create_version adds one")
        if new_version and not existing:
            raise NotFound(f"model {spec.name!r} does not exist; create it first")
        if new_version:
            spec = _versioned(spec, base)
        loading = new_version or spec.state == "loading"   # a load fills it, then readies it
        if not spec.tables:
            raise InvalidArgument(f"model {spec.name!r}: tables must not be empty")
        tables = [TableSpec.from_proto(t).validate() for t in spec.tables]
        _check_unique([t.name for t in tables], f"model {spec.name!r}: table name")
        _check_unique([f for t in tables for f in (t.feature_names or (t.name,))],
                      f"model {spec.name!r}: feature name")
        layers = check_expert_layers(spec, tables)
        replication = spec.replication or default_replication or (2 if len(alive) >= 2 else 1)
        new = self.copy()
        placed_tables = []
        for t in tables:
            parts = t.num_partitions or choose_num_partitions(
                t.num_embeddings, t.row_bytes, cfg.target_partition_bytes,
                cfg.min_partitions, cfg.max_partitions)
            placed_tables.append(TableSpec(
                name=t.name, num_embeddings=t.num_embeddings, dim=t.dim, dtype=t.dtype,
                pooling=t.pooling, feature_names=t.feature_names or (t.name,),
                num_partitions=parts, table_uid=new.next_table_uid))
            new.next_table_uid += 1
        loads = [PartitionLoad(t.table_uid, p, -(-t.num_embeddings // t.num_partitions)
                               * t.row_bytes)
                 for t in placed_tables for p in range(t.num_partitions)]
        if spec.memory_quota_bytes < 0 or spec.server_quota_bytes < 0:
            raise InvalidArgument(f"model {spec.name!r}: memory_quota_bytes and "
                                  "server_quota_bytes must be >= 0 (0 = no quota)")
        total = sum(p.bytes for p in loads) * replication
        held = sum(self.model_bytes(md) for md in existing)
        if spec.memory_quota_bytes and total + held > spec.memory_quota_bytes:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"model {spec.name!r} needs {total / 2**20:,.1f} MiB ("
                             f"{replication} replicas of {len(loads)} partitions)"
                             + (f" beside the {held / 2**20:,.1f} MiB of its other versions"
                                if held else "")
                             + f" but its memory_quota_bytes is "
                             f"{spec.memory_quota_bytes / 2**20:,.1f} MiB"
                             + ("; drop an old version first" if held else ""))
        plan = place(loads, new.server_loads(alive), replication, spec.server_quota_bytes)
        for key, replicas in plan.items():
            new.partitions[key] = PartitionRecord(replicas, 1)
        version = existing[-1].version + 1 if existing else 1
        model = pb.ModelSpec(name=spec.name, version=version, replication=replication,
                             tables=[t.to_proto() for t in placed_tables],
                             memory_quota_bytes=spec.memory_quota_bytes,
                             server_quota_bytes=spec.server_quota_bytes,
                             state="loading" if loading else "ready",
                             current=not loading, expert_layers=layers)
        if model.memory_quota_bytes or model.server_quota_bytes:     # quotas are per model
            for md in new.versions(spec.name):
                md.memory_quota_bytes = model.memory_quota_bytes
                md.server_quota_bytes = model.server_quota_bytes
        new.models[(spec.name, version)] = model
        new.version += 1
        return new, model

    def model_bytes(self, md: pb.ModelSpec) -> int:
        """Bytes of every replica of one model version's partitions."""
        return sum(slot_bytes(t) * len(self.partitions[(t.table_uid, p)].replicas)
                   for t in md.tables for p in range(t.num_partitions)
                   if (t.table_uid, p) in self.partitions)

    def partition_bytes(self) -> dict[tuple[int, int], int]:
        """Bytes of one replica of each partition."""
        size = {t.table_uid: slot_bytes(t) for m in self.models.values() for t in m.tables}
        return {k: size.get(k[0], 0) for k in self.partitions}

    def with_replicas(self, table_uid: int, partition: int,
                      replicas: list[str]) -> "ClusterState":
        key = (table_uid, partition)
        if key not in self.partitions:
            raise NotFound(f"partition {partition} of table_uid {table_uid} does not exist")
        rec = self.partitions[key]
        if sorted(replicas) != sorted(rec.replicas) or len(set(replicas)) != len(replicas):
            raise InvalidArgument(
                f"replicas {list(replicas)} must be a reordering of the current set "
                f"{list(rec.replicas)}; moving data to other servers is the rebalancer's job")
        new = self.copy()
        new.partitions[key] = PartitionRecord(tuple(replicas), rec.epoch + 1, rec.learners)
        new.version += 1
        return new

    def with_learner(self, key: tuple[int, int], server_id: str) -> "ClusterState":
        """Start building a copy of a partition on ``server_id`` (epoch + 1, so every writer
        learns to send it writes)."""
        rec = self.partitions[key]
        if server_id in rec.replicas or server_id in rec.learners:
            return self
        new = self.copy()
        new.partitions[key] = PartitionRecord(rec.replicas, rec.epoch + 1,
                                              rec.learners + (server_id,))
        new.version += 1
        return new

    def with_promoted(self, key: tuple[int, int], server_id: str) -> "ClusterState":
        """A learner finished its copy: it becomes a replica (epoch + 1). No-op if it is no
        longer a learner of that partition (dropped meanwhile)."""
        rec = self.partitions.get(key)
        if rec is None or server_id not in rec.learners:
            return self
        new = self.copy()
        new.partitions[key] = PartitionRecord(rec.replicas + (server_id,), rec.epoch + 1,
                                              tuple(s for s in rec.learners if s != server_id))
        new.version += 1
        return new

    def replication_of(self, table_uid: int) -> int:
        for m in self.models.values():
            if any(t.table_uid == table_uid for t in m.tables):
                return m.replication
        return 0

    def without_replica(self, server_id: str,
                        keys: list[tuple[int, int]] | None = None) -> "ClusterState":
        """Drop ``server_id`` from the replica sets of ``keys`` (None: every partition it is in),
        raising each one's epoch; a dropped leader's place goes to the next in-sync replica.
        A partition whose only replica it is keeps it: the data lives nowhere else, so queries
        for that partition fail as unavailable until the server returns."""
        def droppable(rec: PartitionRecord) -> bool:
            return server_id in rec.learners or (server_id in rec.replicas
                                                 and len(rec.replicas) > 1)

        changed = [k for k in (self.partitions if keys is None else keys)
                   if k in self.partitions and droppable(self.partitions[k])]
        if not changed:
            return self
        new = self.copy()
        for k in changed:
            rec = new.partitions[k]
            replicas = rec.replicas if len(rec.replicas) == 1 else \
                tuple(s for s in rec.replicas if s != server_id)
            new.partitions[k] = PartitionRecord(
                replicas, rec.epoch + 1, tuple(s for s in rec.learners if s != server_id))
        new.version += 1
        return new

    # ------------------------------------------------------------ resizing
    def serving(self, alive: list[str]) -> list[str]:
        """Live servers that may take new partitions (not draining)."""
        return [s for s in alive if s in self.servers and not self.servers[s].draining]

    def holdings(self, server_id: str) -> tuple[int, int]:
        """(replicas, learners) this server has."""
        return (sum(server_id in r.replicas for r in self.partitions.values()),
                sum(server_id in r.learners for r in self.partitions.values()))

    def with_draining(self, server_id: str, draining: bool) -> "ClusterState":
        if server_id not in self.servers:
            raise NotFound(f"server {server_id!r} is not a member (members: "
                           f"{', '.join(sorted(self.servers))})")
        if self.servers[server_id].draining == draining:
            return self
        new = self.copy()
        new.servers[server_id].draining = draining
        new.version += 1
        return new

    def without_server(self, server_id: str) -> "ClusterState":
        if server_id not in self.servers:
            return self
        replicas, learners = self.holdings(server_id)
        if replicas or learners:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"server {server_id!r} still holds {replicas} replicas and builds "
                             f"{learners} copies; drain it first (shoal drain {server_id})")
        new = self.copy()
        del new.servers[server_id]
        for key in [k for k, mv in new.moves.items() if server_id in (mv.source, mv.target)]:
            del new.moves[key]                # queued moves onto it: no copy was begun yet
        new.version += 1
        return new

    def with_moves(self, moves: list) -> "ClusterState":
        """Record planned moves (``coordinator.rebalance.Move``); they start as the reconcile
        loop advances them."""
        if not moves:
            return self
        new = self.copy()
        for m in moves:
            rec = new.partitions.get(m.key)
            if rec is None or m.source not in rec.replicas or m.target in rec.replicas \
                    or m.key in new.moves:
                raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"move of partition {m.partition} of table_uid {m.table_uid} "
                                 f"from {m.source} to {m.target} no longer fits the map")
            new.moves[m.key] = pb.Move(table_uid=m.table_uid, partition=m.partition,
                                       source=m.source, target=m.target, bytes=m.bytes)
        new.version += 1
        return new

    def advance_moves(self, alive: set[str], max_per_server: int) -> "ClusterState":
        """One step of every move: start it (its target becomes a learner, at most
        ``max_per_server`` copies building per server), or, once the target is promoted, drop
        the source; moves made moot (source gone) or impossible (target dead) are removed,
        dropping the target's learner role."""
        if not self.moves:
            return self
        new = self.copy()
        building: dict[str, int] = {}
        for rec in new.partitions.values():
            for s in rec.learners:
                building[s] = building.get(s, 0) + 1
        for key, mv in sorted(self.moves.items()):
            rec = new.partitions.get(key)
            want = new.replication_of(key[0])
            if rec is None or mv.source not in rec.replicas:
                if rec is not None and mv.target in rec.learners and \
                        len(rec.replicas) + len(rec.learners) > want:
                    new = new.without_replica(mv.target, [key])
                del new.moves[key]
            elif mv.target not in alive:
                if mv.target in rec.learners:
                    new = new.without_replica(mv.target, [key])
                del new.moves[key]
            elif mv.target in rec.replicas:              # promoted: the source can go
                if len(rec.replicas) > want:
                    new = new.without_replica(mv.source, [key])
                del new.moves[key]
            elif mv.target not in rec.learners and building.get(mv.target, 0) < max_per_server:
                new = new.with_learner(key, mv.target)
                building[mv.target] = building.get(mv.target, 0) + 1
        if new.moves == self.moves and new.partitions == self.partitions:
            return self
        new.version = self.version + 1
        return new

    def without_moves(self) -> tuple["ClusterState", int]:
        """Cancel the moves not yet promoted: drop their learners. (cancelled count)"""
        if not self.moves:
            return self, 0
        new = self.copy()
        for key, mv in self.moves.items():
            rec = new.partitions.get(key)
            if rec is not None and mv.target in rec.learners:
                new = new.without_replica(mv.target, [key])
        n = len(new.moves)
        new.moves = {}
        new.version = self.version + 1
        return new, n

    def server_loads(self, alive: list[str]) -> list[ServerLoad]:
        sizes = self.partition_bytes()
        load = {s: 0 for s in alive}
        leaders = {s: 0 for s in alive}
        for key, rec in self.partitions.items():
            for i, s in enumerate(rec.replicas):
                if s in load:
                    load[s] += sizes[key]
                    leaders[s] += i == 0
        return [ServerLoad(s, load[s], leaders[s], self.domain_of(s),
                           self.servers[s].disk_capacity_bytes if s in self.servers else 0)
                for s in alive]

    def domain_of(self, server_id: str) -> str:
        """A server's failure domain (itself, unless it registered one)."""
        info = self.servers.get(server_id)
        return (info.domain if info is not None else "") or server_id


def slot_bytes(t: pb.TableSpec) -> int:
    """Bytes of one partition of table ``t`` (its rows per partition, rounded up)."""
    return -(-t.num_embeddings // t.num_partitions) * TableSpec.from_proto(t).row_bytes


def check_expert_layers(spec: pb.ModelSpec, tables: list[TableSpec]) -> list[pb.ExpertLayer]:
    """The model's expert layers, each valid and backed by the table ``experts.layout`` makes
    for it (InvalidArgument naming the layer and the field otherwise)."""
    by_name = {t.name: t for t in tables}
    _check_unique([m.name for m in spec.expert_layers], f"model {spec.name!r}: expert layer")
    for m in spec.expert_layers:
        layer = ExpertLayerSpec.from_proto(m).validate()
        want = table_for(layer)
        have = by_name.get(m.table)
        if m.table != want.name or have is None:
            raise InvalidArgument(f"expert_layers: layer {m.name!r} needs its experts' table "
                                  f"{want.name!r} in the model (table given: {m.table!r})")
        for f in ("num_embeddings", "dim", "dtype", "pooling", "num_partitions"):
            if getattr(have, f) != getattr(want, f):
                raise InvalidArgument(f"expert_layers: table {want.name!r} of layer "
                                      f"{m.name!r} has {f} {getattr(have, f)!r}, expected "
                                      f"{getattr(want, f)!r} (experts.layout.table_for)")
    return list(spec.expert_layers)


def _versioned(spec: pb.ModelSpec, base: pb.ModelSpec) -> pb.ModelSpec:
    """A new version's spec: the given tables (else the base version's, re-placed, with its
    expert layers), the base's replication and quotas unless given."""
    out = pb.ModelSpec()
    out.CopyFrom(spec)
    if not out.tables:
        for t in base.tables:
            c = out.tables.add()
            c.CopyFrom(t)
            c.table_uid = 0
        if not out.expert_layers:
            out.expert_layers.extend(base.expert_layers)
    out.replication = out.replication or base.replication
    out.memory_quota_bytes = out.memory_quota_bytes or base.memory_quota_bytes
    out.server_quota_bytes = out.server_quota_bytes or base.server_quota_bytes
    return out


def _with_current(models: dict[tuple[str, int], pb.ModelSpec]):
    """Maps saved before versions existed: every version ready, the newest current."""
    names = {n for n, _ in models}
    for n in names:
        mine = sorted(v for (m, v) in models if m == n)
        for v in mine:
            models[(n, v)].state = models[(n, v)].state or "ready"
        if not any(models[(n, v)].current for v in mine):
            ready = [v for v in mine if models[(n, v)].state == "ready"]
            if ready:
                models[(n, ready[-1])].current = True
    return models


def _check_unique(names: list[str], what: str) -> None:
    seen = set()
    for n in names:
        if not n:
            raise InvalidArgument(f"{what}: must not be empty")
        if n in seen:
            raise InvalidArgument(f"{what} {n!r} appears twice; names must be unique")
        seen.add(n)
