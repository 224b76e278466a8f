"""The router's view of one shard-map version: models, tables, features, replica sets.

Built once per map version (``RoutingTable.build``) and never mutated, so request threads read
it without locks; a new map replaces the whole object.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np

from embeddings.specs import TableSpec
from experts.layout import table_for
from experts.specs import ExpertLayerSpec
from shoal.errors import InvalidArgument, NotFound, ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.wire import pack


@dataclass(frozen=True)
class TableRoute:
    spec: TableSpec
    replicas: np.ndarray     # int32 [P, R]: server index per replica slot, -1 = none
    epochs: np.ndarray       # int64 [P]
    writers: np.ndarray      # int32 [P, W]: replicas then learners (they get every write)
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def choose(self, rotation: int, exclude: frozenset[int] = frozenset()) -> np.ndarray:
        """One server index per partition (-1 when every replica is ``exclude``d); read-only.

        Each batch prefers one server, ``rotation`` (a batch counter) picking which, so over
        many batches every replica serves reads. Every partition that server holds reads from
        it; the rest take their replicas in turn. Fewer servers per batch means fewer calls
        (where every server holds every table, one per batch) and fewer partial sums to send
        back and add. The answer depends on the rotation only through which holder is
        preferred and ``rotation % R``, so each one is worked out once per routing table.
        """
        holders = self._memo.get(("holders", exclude))
        if holders is None:
            valid = self.replicas >= 0
            if exclude:
                valid &= ~np.isin(self.replicas, list(exclude))
            holders = self._memo[("holders", exclude)] = np.unique(self.replicas[valid])
        R = self.replicas.shape[1]
        key = (rotation % max(1, len(holders)), rotation % R, exclude)
        out = self._memo.get(key)
        if out is None:
            out = self._memo[key] = self._choose(rotation, exclude, holders)
            out.flags.writeable = False
        return out

    def holds_all(self, server: int) -> bool:
        """Whether ``server`` is a replica of every partition."""
        key = ("holds_all", server)
        got = self._memo.get(key)
        if got is None:
            got = self._memo[key] = bool((self.replicas == server).any(axis=1).all())
        return got

    def routed_all(self) -> pb.PartitionEpochs:
        """The PartitionEpochs of every partition (a request to a server that holds them all
        routes them all, whatever ids it sends)."""
        got = self._memo.get("routed_all")
        if got is None:
            P = len(self.epochs)
            got = self._memo["routed_all"] = pb.PartitionEpochs(
                partitions=pack(np.arange(P, dtype=np.int32)), epochs=pack(self.epochs))
        return got

    def _choose(self, rotation: int, exclude: frozenset[int], holders: np.ndarray):
        P, R = self.replicas.shape
        valid = self.replicas >= 0
        if exclude:
            valid &= ~np.isin(self.replicas, list(exclude))
        out = np.full(P, -1, dtype=np.int32)
        if not holders.size:
            return out
        preferred = holders[rotation % len(holders)]
        # Fallback: the first valid replica at or after slot (p + rotation) % R.
        slots = (np.arange(P)[:, None] + rotation + np.arange(R)[None, :]) % R
        ordered_valid = np.take_along_axis(valid, slots, axis=1)
        first = np.argmax(ordered_valid, axis=1)
        fallback = self.replicas[np.arange(P), slots[np.arange(P), first]]
        has_any = ordered_valid.any(axis=1)
        holds_preferred = ((self.replicas == preferred) & valid).any(axis=1)
        out[has_any] = fallback[has_any]
        out[holds_preferred] = preferred
        return out


@dataclass(frozen=True)
class KeyPlan:
    """What a request's feature keys (in its order) come to in one model version, worked out
    once per distinct key list (``ModelRoute.plan``) instead of per request."""
    keys: tuple[str, ...]
    tables: tuple[str, ...]          # the table each key reads
    limits: np.ndarray               # int64 per key: the table's num_embeddings
    min_limit: int                   # the smallest of them (ids below it need no per-key check)
    output_keys: list[str]           # the keys in the model's output order
    output_dims: list[int]
    output_index: list[int]          # position in ``keys`` of each output key
    distinct_tables: bool            # every key reads its own table


@dataclass(frozen=True)
class ModelRoute:
    name: str
    version: int
    tables: dict[str, TableRoute]            # by table name, in model order
    features: dict[str, tuple[str, int]]     # feature -> (table name, position in output order)
    state: str = "ready"                     # "ready" | "loading" (writable, not readable)
    expert_layers: dict[str, ExpertLayerSpec] = field(default_factory=dict)   # by layer name
    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    def plan(self, keys: tuple[str, ...]) -> KeyPlan:
        """The ``KeyPlan`` of a pooled request's keys; InvalidArgument for duplicate keys or
        a feature of an unpooled table, NotFound for an unknown one."""
        got = self._plans.get(keys)
        if got is not None:
            return got
        if len(set(keys)) != len(keys):
            raise InvalidArgument(f"keys: feature names must be unique, got {list(keys)}")
        for k in keys:
            if self.feature(k).spec.pooling == "none":
                raise InvalidArgument(f"keys: feature {k!r} reads table "
                                      f"{self.features[k][0]!r}, which has pooling 'none'; "
                                      "use lookup_rows for unpooled rows")
        tables = tuple(self.features[k][0] for k in keys)
        limits = np.array([self.tables[t].spec.num_embeddings for t in tables], dtype=np.int64)
        index = sorted(range(len(keys)), key=lambda i: self.features[keys[i]][1])
        plan = KeyPlan(keys, tables, limits, int(limits.min()) if len(keys) else 0,
                       [keys[i] for i in index],
                       [self.tables[tables[i]].spec.dim for i in index], index,
                       len(set(tables)) == len(tables))
        if len(self._plans) < 64:                # a handful of key lists per model, normally
            self._plans[keys] = plan
        return plan

    def readable(self) -> "ModelRoute":
        if self.state == "loading":
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"version {self.version} of model {self.name!r} is still loading; "
                             "it serves queries once it is ready")
        return self

    def table(self, name: str) -> TableRoute:
        try:
            return self.tables[name]
        except KeyError:
            raise NotFound(f"table {name!r} is not in model {self.name!r} (tables: "
                           f"{', '.join(self.tables)})") from None

    def expert_layer(self, name: str) -> tuple[ExpertLayerSpec, TableRoute]:
        """(the layer's spec, the table of its routed experts)."""
        if name not in self.expert_layers:
            raise NotFound(f"layer: {name!r} is not an expert layer of model {self.name!r} "
                           f"(expert layers: {', '.join(self.expert_layers) or 'none'})")
        return self.expert_layers[name], self.tables[table_for(self.expert_layers[name]).name]

    def feature(self, name: str) -> TableRoute:
        if name not in self.features:
            raise NotFound(f"feature {name!r} is not in model {self.name!r} (features: "
                           f"{', '.join(self.features)})")
        return self.tables[self.features[name][0]]


@dataclass(frozen=True)
class RoutingTable:
    version: int
    models: dict[str, ModelRoute]                    # the current version of each model
    server_ids: tuple[str, ...]
    addresses: tuple[str, ...]
    versions: dict[tuple[str, int], ModelRoute] = None   # every version, by (name, version)
    shares: dict[str, tuple[tuple[float, int], ...]] = None  # model -> ((cumulative share, v),)

    @classmethod
    def empty(cls) -> "RoutingTable":
        return cls(0, {}, (), (), {}, {})

    @classmethod
    def build(cls, m: pb.ShardMap) -> "RoutingTable":
        server_ids = tuple(s.server_id for s in m.servers)
        index = {s: i for i, s in enumerate(server_ids)}
        by_uid: dict[int, list[pb.ReplicaSet]] = {}
        for rs in m.partitions:
            by_uid.setdefault(rs.table_uid, []).append(rs)
        models, versions = {}, {}
        for md in m.models:
            tables, features = {}, {}
            for t in md.tables:
                spec = TableSpec.from_proto(t)
                sets = by_uid.get(spec.table_uid, [])
                R = max((len(rs.replicas) for rs in sets), default=0)
                W = max((len(rs.replicas) + len(rs.learners) for rs in sets), default=0)
                replicas = np.full((spec.num_partitions, max(R, 1)), -1, dtype=np.int32)
                writers = np.full((spec.num_partitions, max(W, 1)), -1, dtype=np.int32)
                epochs = np.zeros(spec.num_partitions, dtype=np.int64)
                for rs in sets:
                    replicas[rs.partition, :len(rs.replicas)] = [index[s] for s in rs.replicas]
                    both = list(rs.replicas) + list(rs.learners)
                    writers[rs.partition, :len(both)] = [index[s] for s in both]
                    epochs[rs.partition] = rs.epoch
                tables[spec.name] = TableRoute(spec, replicas, epochs, writers)
                for f in spec.feature_names:
                    features[f] = (spec.name, len(features))
            layers = {m.name: ExpertLayerSpec.from_proto(m) for m in md.expert_layers}
            route = ModelRoute(md.name, md.version, tables, features, md.state or "ready",
                               layers)
            versions[(md.name, md.version)] = route
            if md.current:
                models[md.name] = route
        flagged = set(models)
        for (name, _), route in sorted(versions.items()):   # a map without `current` flags:
            if name not in flagged and route.state == "ready":   # the newest ready version
                models[name] = route
        shares: dict[str, list] = {}
        for md in sorted(m.models, key=lambda md: (md.name, md.version)):
            if md.traffic_share > 0 and md.state == "ready" and not md.current:
                acc = shares.setdefault(md.name, [])
                acc.append((md.traffic_share + (acc[-1][0] if acc else 0.0), md.version))
        return cls(m.version, models, server_ids, tuple(s.address for s in m.servers), versions,
                   {k: tuple(v) for k, v in shares.items()})

    def pick_version(self, name: str, key: str) -> int:
        """The version that answers a request for model ``name`` naming none: a version
        given a traffic share takes the requests whose key hashes into its share (the same
        key always lands in the same place, on every router); 0 (the current one) for the
        rest and for requests without a key."""
        split = (self.shares or {}).get(name)
        if not split or not key:
            return 0
        import hashlib
        u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64
        return next((v for top, v in split if u < top), 0)

    def model(self, name: str, version: int = 0) -> ModelRoute:
        """Version ``version`` of model ``name``; 0: the current one."""
        if version:
            route = self.versions.get((name, version))
            if route is None:
                have = sorted(v for n, v in self.versions if n == name)
                raise NotFound(f"model {name!r} has no version {version}" +
                               (f" (versions: {have})" if have else " (no such model)"))
            return route
        if name not in self.models:
            if any(n == name for n, _ in self.versions):
                raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"model {name!r} has no ready version yet")
            raise NotFound(f"model {name!r} does not exist (models: "
                           f"{', '.join(self.models) or 'none'})")
        return self.models[name]


def routed(table: TableRoute, partitions: np.ndarray) -> pb.PartitionEpochs:
    """The PartitionEpochs message for the partitions of ``table`` a request sends a server
    (``partitions``: the partition of every id sent)."""
    parts = np.flatnonzero(np.bincount(partitions, minlength=len(table.epochs))).astype(np.int32)
    return pb.PartitionEpochs(partitions=pack(parts), epochs=pack(table.epochs[parts]))
