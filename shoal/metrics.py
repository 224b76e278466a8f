"""Prometheus metrics: every Shoal process serves its own on one /metrics port.

``serve_metrics(host)`` starts the endpoint (a free port unless given); the process puts the
address in its ready.json and its registration, so ``shoal status`` lists every endpoint. RPCs
are counted and timed in one place, the servers' interceptors (``MetricsInterceptor``,
``AsyncMetricsInterceptor``), by method and status code; the router counts requests per model
and version (``MODEL_REQUESTS``). Names follow Prometheus conventions: ``shoal_`` prefix,
``_total`` counters, ``_seconds`` histograms.
"""
from __future__ import annotations

import time

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
           30.0)

RPC_REQUESTS = Counter("shoal_rpc_requests", "RPCs served, by method and status code",
                       ["role", "method", "code"], registry=REGISTRY)
RPC_SECONDS = Histogram("shoal_rpc_seconds", "Time to answer an RPC, by method",
                        ["role", "method"], buckets=BUCKETS, registry=REGISTRY)
MODEL_REQUESTS = Counter("shoal_model_requests",
                         "Client requests a router answered, by model, version and RPC",
                         ["model", "version", "rpc", "code"], registry=REGISTRY)

RPC_IN_FLIGHT = Gauge("shoal_rpc_in_flight", "Calls admitted and not yet answered",
                      ["role"], registry=REGISTRY)
RPC_DENIED = Counter("shoal_rpc_denied", "Calls refused by the access check, by method and "
                     "code (UNAUTHENTICATED, PERMISSION_DENIED)", ["method", "code"],
                     registry=REGISTRY)
RPC_BYTES = Counter("shoal_rpc_bytes", "Serialized bytes of RPC requests received (in) and "
                    "replies sent (out), by method", ["role", "method", "direction"],
                    registry=REGISTRY)
REPLICATION_SECONDS = Histogram("shoal_replication_seconds", "A leader's wait for one peer to "
                                "have a write durable (replication is synchronous: this is its "
                                "lag), by peer", ["peer"], buckets=BUCKETS, registry=REGISTRY)
REPLICATION_CATCH_UPS = Counter("shoal_replication_catch_ups", "Writes a peer was behind on, "
                                "resent from the leader's log", ["peer"], registry=REGISTRY)
REPLICATION_LAG_ENTRIES = Gauge("shoal_replication_lag_entries", "Entries a copy being built "
                                "here is behind its leader, as of its last catch-up call",
                                ["table_uid", "partition"], registry=REGISTRY)

_role = "process"


def role() -> str:
    return _role


def set_role(role: str) -> None:
    """Name this process's role in the RPC metrics' ``role`` label."""
    global _role
    _role = role


def serve_metrics(role: str, host: str = "127.0.0.1", port: int = 0) -> str:
    """Start this process's /metrics endpoint; its address (host:port). (The coordinator serves
    its metrics beside its status page instead: ``coordinator.status.StatusServer``.)"""
    set_role(role)
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return f"{host}:{server.server_port}"


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _record(method: str, t0: float, context, failed: bool, request, reply) -> None:
    """Count one RPC under its status code (an exception with no code set: UNKNOWN), and its
    bytes (``ByteSize`` is a walk of the message's fields, not a copy of its bytes)."""
    code = context.code() if hasattr(context, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "OK"
    if failed and name == "OK":
        name = "UNKNOWN"
    record_rpc(method, time.perf_counter() - t0, name, request, reply)


def record_rpc(method: str, seconds: float, code: str, request, reply) -> None:
    """Count one call (an RPC, or a call on a stream such as ``PredictStream``)."""
    RPC_REQUESTS.labels(_role, method, code).inc()
    RPC_SECONDS.labels(_role, method).observe(seconds)
    if hasattr(request, "ByteSize"):
        RPC_BYTES.labels(_role, method, "in").inc(request.ByteSize())
    if hasattr(reply, "ByteSize"):
        RPC_BYTES.labels(_role, method, "out").inc(reply.ByteSize())
    elif isinstance(reply, bytes):                      # a reply serialised by its handler
        RPC_BYTES.labels(_role, method, "out").inc(len(reply))


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times the unary RPCs of a threaded gRPC server."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, _short(details.method)

        def behavior(request, context):
            t0 = time.perf_counter()
            try:
                out = inner(request, context)
            except BaseException:
                _record(method, t0, context, True, request, None)
                raise
            _record(method, t0, context, False, request, out)
            return out

        return handler._replace(unary_unary=behavior)


class AsyncMetricsInterceptor(grpc.aio.ServerInterceptor):
    """``MetricsInterceptor`` for asyncio servers (the router, the shard servers)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, _short(details.method)

        async def behavior(request, context):
            t0 = time.perf_counter()
            try:
                out = await inner(request, context)
            except BaseException:
                _record(method, t0, context, True, request, None)
                raise
            _record(method, t0, context, False, request, out)
            return out

        return handler._replace(unary_unary=behavior)


class ServerCollector:
    """A shard server's figures, read from its ``ServerStats`` when scraped: rows and bytes
    held, memory split into fixed (the memory tier's resident partitions, expert weights
    included) and variable (the replication log; the rest of the RSS is buffers and caches),
    ids served and how many came from RocksDB, and the ids served per partition."""

    def __init__(self, stats):
        self._stats = stats                  # () -> pb.ServerStats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self._stats()
        g = lambda name, doc, v: GaugeMetricFamily(name, doc, value=v)   # noqa: E731
        c = lambda name, doc, v: CounterMetricFamily(name, doc, value=v)  # noqa: E731
        yield g("shoal_server_rows", "Rows held, over the partitions this server serves", s.rows)
        yield g("shoal_server_raw_bytes", "Bytes of the rows held (rows x row bytes)",
                s.raw_bytes)
        mem = GaugeMetricFamily("shoal_server_memory_bytes", "Memory by kind: fixed "
                                "(memory_tier) and variable (replication_log, rss)",
                                labels=["kind"])
        mem.add_metric(["memory_tier"], s.resident_bytes)
        mem.add_metric(["replication_log"], s.replication_log_bytes)
        mem.add_metric(["rss"], s.rss_bytes)
        yield mem
        yield g("shoal_server_partitions", "Partitions served", s.partitions)
        yield g("shoal_server_resident_partitions", "Partitions in the memory tier",
                s.resident_partitions)
        yield g("shoal_server_stored_partitions", "Partitions with rows on disk",
                s.stored_partitions)
        yield g("shoal_server_builds", "Replica copies being built here", len(s.builds))
        yield c("shoal_server_lookups", "Lookup requests served", s.lookups)
        yield c("shoal_server_ids", "Ids (or expert tokens) served", s.ids_looked_up)
        yield c("shoal_server_cold_ids", "Ids served from RocksDB, not the memory tier",
                s.cold_ids)
        yield c("shoal_server_rocksdb_reads", "Batched reads of cold rows from RocksDB",
                s.rocksdb_reads)
        yield g("shoal_server_memory_tier_hit_ratio", "Share of the ids served that the "
                "memory tier held, since the server started",
                1.0 - s.cold_ids / s.ids_looked_up if s.ids_looked_up else 1.0)
        for make, name, doc, value in (
                (g, "memory_budget_bytes", "The server's memory budget", s.memory_budget_bytes),
                (g, "store_memory_bytes", "RocksDB's block cache and write buffers and the "
                 "replication log's cap, as sized from the budget", s.store_memory_bytes),
                (g, "row_cache_bytes", "Row caches (slots, keys, scores, sketches)",
                 s.cache_bytes),
                (g, "disk_bytes", "RocksDB's files on disk", s.disk_bytes),
                (g, "disk_capacity_bytes", "What this server may hold on disk",
                 s.disk_capacity_bytes),
                (c, "cache_evictions", "Rows evicted from row caches", s.cache_evictions),
                (c, "cache_rejected", "Misses the row caches' policy did not admit",
                 s.cache_rejected),
                (c, "admissions_dropped", "Batches of misses not offered to a row cache "
                 "(admission behind)", s.admissions_dropped),
                (c, "miss_read_seconds", "Time in batched RocksDB reads of misses",
                 s.miss_read_seconds)):
            yield make(f"shoal_server_{name}", doc, value)
        per_table = {name: kind(f"shoal_table_{name}", doc, labels=["table_uid"])
                     for kind, name, doc in (
                         (GaugeMetricFamily, "cache_bytes", "Memory for a table's rows here"),
                         (GaugeMetricFamily, "cache_rows", "Rows its row cache holds at most"),
                         (GaugeMetricFamily, "held_bytes", "Bytes of its rows held here (disk)"),
                         (CounterMetricFamily, "ids", "Ids read, as requests name them"),
                         (CounterMetricFamily, "misses", "Of those, read from RocksDB"),
                         (CounterMetricFamily, "miss_reads", "Batched RocksDB reads of misses"),
                         (CounterMetricFamily, "miss_seconds", "Time in them"),
                         (CounterMetricFamily, "evictions", "Rows evicted from its row cache"))}
        for tl in s.table_loads:
            for name, fam in per_table.items():
                fam.add_metric([str(tl.table_uid)], float(getattr(tl, name)))
        yield from per_table.values()
        yield c("shoal_server_redirects", "Requests refused for a stale map", s.redirects)
        yield c("shoal_server_cpu_seconds", "CPU seconds used", s.cpu_seconds)
        per = CounterMetricFamily("shoal_partition_ids", "Ids (expert tokens) served per "
                                  "partition", labels=["table_uid", "partition"])
        from shoal.wire import unpack
        for tl in s.table_loads:
            counts = unpack(tl.ids_looked_up, "ids_looked_up", "int64", 1)
            for p in np.flatnonzero(counts).tolist():   # control plane: a line per partition
                per.add_metric([str(tl.table_uid), str(p)], float(counts[p]))
        yield per


class MapCollector:
    """The coordinator's view, read from its shard map when scraped: servers by state,
    partitions, moves and splits in flight, bytes held per server, and the load of every
    partition and expert of the models' tables (the rates the servers' heartbeats imply)."""

    def __init__(self, shard_map, partition_load=None):
        self._map = shard_map                # () -> pb.ShardMap
        self._load = partition_load          # () -> {(table_uid, partition): ids/s}

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        m = self._map()
        servers = GaugeMetricFamily("shoal_cluster_servers", "Servers by state",
                                    labels=["state"])
        for state in ("alive", "dead"):
            servers.add_metric([state], sum(s.state == state for s in m.servers))
        yield servers
        yield GaugeMetricFamily("shoal_cluster_partitions", "Replica sets in the map",
                                value=len(m.partitions))
        yield GaugeMetricFamily("shoal_cluster_moves", "Partition moves in flight",
                                value=len(m.moves))
        yield GaugeMetricFamily("shoal_cluster_splits", "Table splits in flight",
                                value=len(m.splits))
        yield GaugeMetricFamily("shoal_cluster_map_version", "Shard map version",
                                value=m.version)
        held = GaugeMetricFamily("shoal_cluster_server_raw_bytes", "Bytes of rows each "
                                 "server holds, as it last reported", labels=["server"])
        for s in m.servers:
            held.add_metric([s.server_id], s.stats.raw_bytes)
        yield held
        if self._load is None:
            return
        rates = self._load()
        tables = GaugeMetricFamily("shoal_partition_load", "Ids looked up per second per "
                                   "partition", labels=["model", "version", "table", "partition"])
        experts = GaugeMetricFamily("shoal_expert_load", "Tokens per second per routed expert",
                                    labels=["model", "version", "layer", "expert"])
        for md in m.models:
            layer_of = {x.table: x for x in md.expert_layers}
            for t in md.tables:                 # control plane: a line per partition
                x = layer_of.get(t.name)
                n = x.num_experts if x is not None else t.num_partitions
                fam, name = (experts, x.name) if x is not None else (tables, t.name)
                for p in range(n):
                    fam.add_metric([md.name, str(md.version), name, str(p)],
                                   rates.get((t.table_uid, p), 0.0))
        yield tables
        yield experts


class RowCacheCollector:
    """The router's hot-row cache (``router.rowcache.RowCache``), read when scraped."""

    def __init__(self, cache):
        self._cache = cache

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        st = self._cache.stats
        ids = CounterMetricFamily("shoal_router_row_cache_ids", "Unique ids of pooled batches "
                                  "found in the router's row cache (hit) or fetched (miss)",
                                  labels=["result"])
        ids.add_metric(["hit"], st.hits)
        ids.add_metric(["miss"], st.misses)
        yield ids
        yield CounterMetricFamily("shoal_router_row_cache_invalidations", "Partitions whose "
                                  "cached rows were dropped because their write position "
                                  "moved (an update)", value=st.invalidated)
        yield GaugeMetricFamily("shoal_router_row_cache_bytes", "Memory the row cache holds",
                                value=self._cache.nbytes)


STAGE_SECONDS = Histogram("shoal_router_stage_seconds", "Time in each stage of a router "
                          "request (moe: gate, dispatch, servers, expert_compute, combine)",
                          ["path", "stage"], buckets=BUCKETS, registry=REGISTRY)
