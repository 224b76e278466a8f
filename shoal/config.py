"""Shoal's one typed config tree. Processes get it as JSON on their command line; the
environment is read in exactly one place (``shoal_home``)."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from dataclasses import dataclass, field

MAX_MESSAGE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ShardServerConfig:
    # Memory for rows and RocksDB together (shards.tiers): RocksDB's block cache and write
    # buffers first, the rest holds rows; if the rows held here do not fit, the hottest are
    # cached and the others read from RocksDB.
    memory_budget_bytes: int = 8 << 30
    block_cache_bytes: int = 64 << 20       # RocksDB block cache, at most 1/8 of the budget
    cache_policy: str = "lfu"               # row cache eviction: "lfu" (TinyLFU) or "lru"
    cache_ways: int = 8                     # row cache associativity (slots per set)
    mmap_reads: bool = False                # RocksDB reads files through memory maps: less CPU
                                            # a cold row than pread, but RSS holds the file pages
                                            # read (shards.storage)
    read_chunks: int = 8                    # a request's misses: most multi-gets at once (disk-bound)
                                            # (shards.reads: disk reads overlap)
    # Disk is the capacity (what placement counts): 0 = the file system's free space plus
    # what the store holds, measured at start.
    disk_capacity_bytes: int = 0
    arena_huge_pages: bool = False          # memory tier on transparent huge pages (see
                                            # shards.memory.allocate)
    heartbeat_interval_s: float = 0.5
    # Each row cache's hot set is saved this often (and at a clean stop), and a restarted
    # server's caches start from it (shards.warm); 0: never saved.
    hot_save_interval_s: float = 30.0
    sst_threshold_rows: int = 50_000        # writes at least this large go through SST + ingest
    max_ids_per_request: int = 4_000_000    # per request; more is RESOURCE_EXHAUSTED
    max_expert_tokens: int = 1 << 20        # token rows per ExpertForward; more likewise
    # Copying a partition to build a replica, at most (per copy; a server builds
    # max_builds_per_server at once). Copies cost CPU (~2.7 us a row in rocksdict's per-key API)
    # that serving needs: 8 keeps the p99 of lookups within ~3x of steady on 2 busy cores.
    rebuild_mib_per_s: float = 8.0
    replication_log_bytes: int = 64 << 20   # per server, shared by its tables: recent writes
                                            # kept for catch-up and deduplication
    replicate_timeout_s: float = 2.0        # a peer slower than this to take a write is reported
    # How a leader takes the consistent snapshot it streams to a learner: "iterator" (a RocksDB
    # iterator: a point-in-time view, free) or "checkpoint" (a RocksDB checkpoint opened
    # read-only; flushes the memtable and fsyncs while holding the GIL: up to ~200 ms here).
    snapshot: str = "iterator"
    # Copies and writes run in threads beside the event loop that answers lookups: a thread
    # hands the GIL back after this long (Python's default is 5 ms).
    gil_switch_interval_s: float = 0.001
    # The server's failure domain (a host, a Ray node): the coordinator keeps a partition's
    # replicas in distinct domains while there are enough. "": the server alone.
    domain: str = ""
    # Where a loader on this host leaves SST files for the servers to link in (shards.spool):
    # "": "spool" beside the server's data directory, shared by a local cluster's servers.
    spool_dir: str = ""
    # Tests only: named points where a test holds this server (shards.failpoints), read from
    # failpoints.json in its data directory. Off: the points cost nothing.
    failpoints: bool = False


@dataclass(frozen=True)
class RouterConfig:
    batch_window_ms: float = 1.0            # merge concurrent lookups arriving within this window
    max_batch_ids: int = 400_000            # stop merging once a batch has this many ids
    max_ids_per_request: int = 1_000_000    # per client request; more is RESOURCE_EXHAUSTED
    max_moe_tokens: int = 65_536            # tokens per moe_forward request; more is RESOURCE_EXHAUSTED
    # moe_forward calls of a layer are merged (router.batcher.StepBatcher): a batch goes when the
    # callers of the last one are back, when calls stop coming for 3 ms, or at the latest this
    # long after its first call. bench/moe.py --decode, 32 callers x 4 tokens: 5 ms split
    # each step's calls into two batches (15.8 calls a batch); 20 ms: 32 at the median.
    moe_window_ms: float = 20.0
    moe_batch_lanes: int = 1                # merged batches of a layer running at once (StepBatcher)
    max_moe_batch_tokens: int = 4_096       # tokens per merged moe_forward batch (a request alone may exceed)
    predict_window_ms: float = 5.0          # merge concurrent predict requests within this window
                                            # (bench/predict.py, 8 clients: 1 ms 0.58x Redis, 5 ms 1.0x;
                                            # at 32 clients 3, 5 and 8 ms gave the same throughput)
    max_predict_batch: int = 8_192          # candidates per merged predict batch (and per request)
    default_deadline_s: float = 30.0        # a lookup / predict whose caller set no deadline
    dedup_pooled: bool = False              # send unique ids + inverse for pooled lookups
    row_cache_rows: int = 0                 # hot-row cache: rows kept per table (0: off);
                                            # see router/rowcache.py
    map_poll_interval_s: float = 1.0        # how often to poll the coordinator for a new map
    hedge: bool = True                      # send a slow read to a second replica too
    hedge_factor: float = 1.5               # ... after this times the fastest server's p95
    hedge_min_delay_ms: float = 2.0         # ... but never sooner than this
    hedge_min_samples: int = 20             # no hedging until a server has this many samples
    retry_budget_ratio: float = 0.1         # hedges + retries allowed per request served
    retry_budget_min_per_s: float = 10.0    # ... plus this many per second
    rpc_timeout_s: float = 30.0
    write_attempt_timeout_s: float = 5.0
    slow_request_ms: float = 200.0          # a request slower than this is logged with its stages    # one try at a leader; then refresh the map, retry


@dataclass(frozen=True)
class CoordinatorConfig:
    lease_s: float = 5.0                    # a server silent this long is reported dead
    target_partition_bytes: int = 64 << 20  # partitions are sized near this
    min_partitions: int = 4
    max_partitions: int = 1024
    default_replication: int = 0            # 0 = 2 when there are >= 2 servers, else 1
    max_builds_per_server: int = 2          # replica copies one server builds at once
    max_moves_per_server: int = 1           # ... of which a rebalance's moves may start: moves
                                            # are not urgent, so they leave CPU to queries
    build_resend_s: float = 10.0            # re-ask a learner that has not reported by then
    split_freeze_s: float = 10.0            # a split's cut-over pauses writes at most this long
    expert_rebalance_s: float = 30.0        # how often hot experts get replicas (0: only on demand)
    hot_expert_bytes: int = 1 << 30         # redundant expert replicas one server may hold, per
                                            # layer, beyond its even share of the layer's experts
    expert_min_gain: float = 0.05           # a copy must lower the busiest server by this share
                                            # of the mean


@dataclass(frozen=True)
class SecurityConfig:
    """TLS, authentication and limits, the same for every process of a cluster (see
    ``shoal.security``). All empty: plaintext and no authentication, loopback only."""
    tls_ca_file: str = ""                   # the CA that signs every certificate of the cluster
    tls_cert_file: str = ""                 # this process's certificate (OU=cluster) ...
    tls_key_file: str = ""                  # ... and its private key
    client_certs: bool = True               # the router requires client certificates (False:
                                            # TLS for the server only; callers bring a token)
    token_key_file: str = ""                # hex HMAC key that signs bearer tokens ("": none)
    max_message_bytes: int = MAX_MESSAGE_BYTES   # largest request a process accepts
    max_concurrent_requests: int = 4096     # calls in flight per process; more: RESOURCE_EXHAUSTED
    require_deadline: bool = False          # refuse calls that set no deadline


@dataclass(frozen=True)
class ShoalConfig:
    server: ShardServerConfig = field(default_factory=ShardServerConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ShoalConfig":
        raw = json.loads(text) if text else {}
        unknown = set(raw) - {"server", "router", "coordinator", "security"}
        if unknown:
            raise ValueError(f"config: unknown sections {sorted(unknown)} "
                             "(allowed: server, router, coordinator, security)")
        return cls(server=_build(ShardServerConfig, raw.get("server", {}), "server"),
                   router=_build(RouterConfig, raw.get("router", {}), "router"),
                   coordinator=_build(CoordinatorConfig, raw.get("coordinator", {}), "coordinator"),
                   security=_build(SecurityConfig, raw.get("security", {}), "security"))

    def replace(self, **sections) -> "ShoalConfig":
        """Return a copy with whole sections or ``section__field`` values replaced."""
        cfg = self
        for key, value in sections.items():
            if "__" in key:
                section, name = key.split("__", 1)
                cfg = dataclasses.replace(
                    cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
            else:
                cfg = dataclasses.replace(cfg, **{key: value})
        return cfg


def _build(cls, raw: dict, section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ValueError(f"config.{section}: unknown keys {sorted(unknown)} "
                         f"(allowed: {sorted(names)})")
    return cls(**raw)


def shoal_home() -> pathlib.Path:
    """Where the CLI remembers running clusters: $SHOAL_HOME, else ~/.shoal."""
    return pathlib.Path(os.environ.get("SHOAL_HOME", pathlib.Path.home() / ".shoal"))
