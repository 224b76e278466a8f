from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("name", "num_embeddings", "dim", "dtype", "pooling", "feature_names", "num_partitions", "table_uid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_embeddings: int
    dim: int
    dtype: str
    pooling: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    num_partitions: int
    table_uid: int
    def __init__(self, name: _Optional[str] = ..., num_embeddings: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., pooling: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., num_partitions: _Optional[int] = ..., table_uid: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "version", "tables", "replication", "memory_quota_bytes", "server_quota_bytes", "state", "current", "dense_bytes", "dense_tensors", "expert_layers", "traffic_share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DENSE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    tables: _containers.RepeatedCompositeFieldContainer[TableSpec]
    replication: int
    memory_quota_bytes: int
    server_quota_bytes: int
    state: str
    current: bool
    dense_bytes: int
    dense_tensors: int
    expert_layers: _containers.RepeatedCompositeFieldContainer[ExpertLayer]
    traffic_share: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableSpec, _Mapping]]] = ..., replication: _Optional[int] = ..., memory_quota_bytes: _Optional[int] = ..., server_quota_bytes: _Optional[int] = ..., state: _Optional[str] = ..., current: _Optional[bool] = ..., dense_bytes: _Optional[int] = ..., dense_tensors: _Optional[int] = ..., expert_layers: _Optional[_Iterable[_Union[ExpertLayer, _Mapping]]] = ..., traffic_share: _Optional[float] = ...) -> None: ...

class ExpertLayer(_message.Message):
    __slots__ = ("name", "table", "num_experts", "d_model", "d_ff", "top_k", "activation", "gating", "norm_topk_prob", "n_group", "topk_group", "routed_scaling_factor", "shared_d_ff", "shared_gate", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    D_FF_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    GATING_FIELD_NUMBER: _ClassVar[int]
    NORM_TOPK_PROB_FIELD_NUMBER: _ClassVar[int]
    N_GROUP_FIELD_NUMBER: _ClassVar[int]
    TOPK_GROUP_FIELD_NUMBER: _ClassVar[int]
    ROUTED_SCALING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SHARED_D_FF_FIELD_NUMBER: _ClassVar[int]
    SHARED_GATE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    table: str
    num_experts: int
    d_model: int
    d_ff: int
    top_k: int
    activation: str
    gating: str
    norm_topk_prob: bool
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    shared_d_ff: int
    shared_gate: bool
    dtype: str
    def __init__(self, name: _Optional[str] = ..., table: _Optional[str] = ..., num_experts: _Optional[int] = ..., d_model: _Optional[int] = ..., d_ff: _Optional[int] = ..., top_k: _Optional[int] = ..., activation: _Optional[str] = ..., gating: _Optional[str] = ..., norm_topk_prob: _Optional[bool] = ..., n_group: _Optional[int] = ..., topk_group: _Optional[int] = ..., routed_scaling_factor: _Optional[float] = ..., shared_d_ff: _Optional[int] = ..., shared_gate: _Optional[bool] = ..., dtype: _Optional[str] = ...) -> None: ...

class DenseParams(_message.Message):
    __slots__ = ("model", "version", "names", "tensors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    names: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class PutDenseReply(_message.Message):
    __slots__ = ("bytes", "map_version")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    map_version: int
    def __init__(self, bytes: _Optional[int] = ..., map_version: _Optional[int] = ...) -> None: ...

class GetDenseRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ReplicaSet(_message.Message):
    __slots__ = ("table_uid", "partition", "replicas", "epoch", "learners")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    learners: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ..., learners: _Optional[_Iterable[str]] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("server_id", "address", "state", "last_heartbeat_age_s", "memory_budget_bytes", "stats", "draining", "domain", "metrics_address", "disk_capacity_bytes")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    address: str
    state: str
    last_heartbeat_age_s: float
    memory_budget_bytes: int
    stats: ServerStats
    draining: bool
    domain: str
    metrics_address: str
    disk_capacity_bytes: int
    def __init__(self, server_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., last_heartbeat_age_s: _Optional[float] = ..., memory_budget_bytes: _Optional[int] = ..., stats: _Optional[_Union[ServerStats, _Mapping]] = ..., draining: _Optional[bool] = ..., domain: _Optional[str] = ..., metrics_address: _Optional[str] = ..., disk_capacity_bytes: _Optional[int] = ...) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("rows", "raw_bytes", "resident_bytes", "rss_bytes", "partitions", "resident_partitions", "map_version", "lookups", "ids_looked_up", "cold_ids", "redirects", "cpu_seconds", "pid", "dropped_partitions", "replication_log_bytes", "builds_from_snapshot", "builds_caught_up", "builds", "stored_partitions", "table_loads", "splits", "rocksdb_reads", "host_id", "spool_dir", "disk_bytes", "disk_capacity_bytes", "cache_bytes", "store_memory_bytes", "memory_budget_bytes", "cache_evictions", "cache_rejected", "admissions_dropped", "miss_read_seconds")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    IDS_LOOKED_UP_FIELD_NUMBER: _ClassVar[int]
    COLD_IDS_FIELD_NUMBER: _ClassVar[int]
    REDIRECTS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUILDS_FROM_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BUILDS_CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    BUILDS_FIELD_NUMBER: _ClassVar[int]
    STORED_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    TABLE_LOADS_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    ROCKSDB_READS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DIR_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_REJECTED_FIELD_NUMBER: _ClassVar[int]
    ADMISSIONS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MISS_READ_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    raw_bytes: int
    resident_bytes: int
    rss_bytes: int
    partitions: int
    resident_partitions: int
    map_version: int
    lookups: int
    ids_looked_up: int
    cold_ids: int
    redirects: int
    cpu_seconds: float
    pid: int
    dropped_partitions: int
    replication_log_bytes: int
    builds_from_snapshot: int
    builds_caught_up: int
    builds: _containers.RepeatedCompositeFieldContainer[BuildProgress]
    stored_partitions: int
    table_loads: _containers.RepeatedCompositeFieldContainer[TableLoad]
    splits: _containers.RepeatedCompositeFieldContainer[SplitProgress]
    rocksdb_reads: int
    host_id: str
    spool_dir: str
    disk_bytes: int
    disk_capacity_bytes: int
    cache_bytes: int
    store_memory_bytes: int
    memory_budget_bytes: int
    cache_evictions: int
    cache_rejected: int
    admissions_dropped: int
    miss_read_seconds: float
    def __init__(self, rows: _Optional[int] = ..., raw_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., partitions: _Optional[int] = ..., resident_partitions: _Optional[int] = ..., map_version: _Optional[int] = ..., lookups: _Optional[int] = ..., ids_looked_up: _Optional[int] = ..., cold_ids: _Optional[int] = ..., redirects: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., pid: _Optional[int] = ..., dropped_partitions: _Optional[int] = ..., replication_log_bytes: _Optional[int] = ..., builds_from_snapshot: _Optional[int] = ..., builds_caught_up: _Optional[int] = ..., builds: _Optional[_Iterable[_Union[BuildProgress, _Mapping]]] = ..., stored_partitions: _Optional[int] = ..., table_loads: _Optional[_Iterable[_Union[TableLoad, _Mapping]]] = ..., splits: _Optional[_Iterable[_Union[SplitProgress, _Mapping]]] = ..., rocksdb_reads: _Optional[int] = ..., host_id: _Optional[str] = ..., spool_dir: _Optional[str] = ..., disk_bytes: _Optional[int] = ..., disk_capacity_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., store_memory_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., cache_evictions: _Optional[int] = ..., cache_rejected: _Optional[int] = ..., admissions_dropped: _Optional[int] = ..., miss_read_seconds: _Optional[float] = ...) -> None: ...

class TableLoad(_message.Message):
    __slots__ = ("table_uid", "ids_looked_up", "ids", "misses", "miss_reads", "miss_seconds", "cache_bytes", "cache_rows", "held_bytes", "evictions")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    IDS_LOOKED_UP_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    MISS_READS_FIELD_NUMBER: _ClassVar[int]
    MISS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_ROWS_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    ids_looked_up: Tensor
    ids: int
    misses: int
    miss_reads: int
    miss_seconds: float
    cache_bytes: int
    cache_rows: int
    held_bytes: int
    evictions: int
    def __init__(self, table_uid: _Optional[int] = ..., ids_looked_up: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[int] = ..., misses: _Optional[int] = ..., miss_reads: _Optional[int] = ..., miss_seconds: _Optional[float] = ..., cache_bytes: _Optional[int] = ..., cache_rows: _Optional[int] = ..., held_bytes: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class SplitProgress(_message.Message):
    __slots__ = ("table_uid", "partition", "built_seq", "seq", "map_version")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    BUILT_SEQ_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    built_seq: int
    seq: int
    map_version: int
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., built_seq: _Optional[int] = ..., seq: _Optional[int] = ..., map_version: _Optional[int] = ...) -> None: ...

class BuildProgress(_message.Message):
    __slots__ = ("table_uid", "partition", "bytes_done", "bytes_total")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    bytes_done: int
    bytes_total: int
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class Move(_message.Message):
    __slots__ = ("table_uid", "partition", "source", "target", "bytes", "bytes_done", "seconds", "phase")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    source: str
    target: str
    bytes: int
    bytes_done: int
    seconds: float
    phase: str
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., source: _Optional[str] = ..., target: _Optional[str] = ..., bytes: _Optional[int] = ..., bytes_done: _Optional[int] = ..., seconds: _Optional[float] = ..., phase: _Optional[str] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("version", "models", "servers", "partitions", "default_replication", "moves", "splits", "autoscale", "coordinator_metrics_address")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_REPLICATION_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    version: int
    models: _containers.RepeatedCompositeFieldContainer[ModelSpec]
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    partitions: _containers.RepeatedCompositeFieldContainer[ReplicaSet]
    default_replication: int
    moves: _containers.RepeatedCompositeFieldContainer[Move]
    splits: _containers.RepeatedCompositeFieldContainer[Split]
    autoscale: AutoscaleStatus
    coordinator_metrics_address: str
    def __init__(self, version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelSpec, _Mapping]]] = ..., servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ..., partitions: _Optional[_Iterable[_Union[ReplicaSet, _Mapping]]] = ..., default_replication: _Optional[int] = ..., moves: _Optional[_Iterable[_Union[Move, _Mapping]]] = ..., splits: _Optional[_Iterable[_Union[Split, _Mapping]]] = ..., autoscale: _Optional[_Union[AutoscaleStatus, _Mapping]] = ..., coordinator_metrics_address: _Optional[str] = ...) -> None: ...

class Split(_message.Message):
    __slots__ = ("model", "table", "table_uid", "new_table", "frozen", "frozen_version", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    NEW_TABLE_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    FROZEN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    table: str
    table_uid: int
    new_table: TableSpec
    frozen: bool
    frozen_version: int
    model_version: int
    def __init__(self, model: _Optional[str] = ..., table: _Optional[str] = ..., table_uid: _Optional[int] = ..., new_table: _Optional[_Union[TableSpec, _Mapping]] = ..., frozen: _Optional[bool] = ..., frozen_version: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class AutoscalePolicy(_message.Message):
    __slots__ = ("enabled", "min_servers", "max_servers", "memory_target", "load_target", "band", "window_s", "cooldown_s")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIN_SERVERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SERVERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TARGET_FIELD_NUMBER: _ClassVar[int]
    LOAD_TARGET_FIELD_NUMBER: _ClassVar[int]
    BAND_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_S_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    min_servers: int
    max_servers: int
    memory_target: float
    load_target: float
    band: float
    window_s: float
    cooldown_s: float
    def __init__(self, enabled: _Optional[bool] = ..., min_servers: _Optional[int] = ..., max_servers: _Optional[int] = ..., memory_target: _Optional[float] = ..., load_target: _Optional[float] = ..., band: _Optional[float] = ..., window_s: _Optional[float] = ..., cooldown_s: _Optional[float] = ...) -> None: ...

class AutoscaleDecision(_message.Message):
    __slots__ = ("at_unix_s", "from_servers", "to_servers", "reason", "drained")
    AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    FROM_SERVERS_FIELD_NUMBER: _ClassVar[int]
    TO_SERVERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    at_unix_s: float
    from_servers: int
    to_servers: int
    reason: str
    drained: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, at_unix_s: _Optional[float] = ..., from_servers: _Optional[int] = ..., to_servers: _Optional[int] = ..., reason: _Optional[str] = ..., drained: _Optional[_Iterable[str]] = ...) -> None: ...

class AutoscaleStatus(_message.Message):
    __slots__ = ("policy", "desired_servers", "decisions", "utilisation")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DESIRED_SERVERS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    UTILISATION_FIELD_NUMBER: _ClassVar[int]
    policy: AutoscalePolicy
    desired_servers: int
    decisions: _containers.RepeatedCompositeFieldContainer[AutoscaleDecision]
    utilisation: float
    def __init__(self, policy: _Optional[_Union[AutoscalePolicy, _Mapping]] = ..., desired_servers: _Optional[int] = ..., decisions: _Optional[_Iterable[_Union[AutoscaleDecision, _Mapping]]] = ..., utilisation: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("server_id", "address", "memory_budget_bytes", "domain", "metrics_address", "disk_capacity_bytes")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    address: str
    memory_budget_bytes: int
    domain: str
    metrics_address: str
    disk_capacity_bytes: int
    def __init__(self, server_id: _Optional[str] = ..., address: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., domain: _Optional[str] = ..., metrics_address: _Optional[str] = ..., disk_capacity_bytes: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("map_version",)
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    def __init__(self, map_version: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("server_id", "stats")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    stats: ServerStats
    def __init__(self, server_id: _Optional[str] = ..., stats: _Optional[_Union[ServerStats, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("map_version",)
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    def __init__(self, map_version: _Optional[int] = ...) -> None: ...

class GetShardMapRequest(_message.Message):
    __slots__ = ("known_version",)
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    known_version: int
    def __init__(self, known_version: _Optional[int] = ...) -> None: ...

class GetShardMapReply(_message.Message):
    __slots__ = ("unchanged", "map")
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    unchanged: bool
    map: ShardMap
    def __init__(self, unchanged: _Optional[bool] = ..., map: _Optional[_Union[ShardMap, _Mapping]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("spec", "new_version")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    new_version: bool
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., new_version: _Optional[bool] = ...) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("model", "version", "ready", "make_current", "drop", "set_traffic_share", "traffic_share")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MAKE_CURRENT_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    SET_TRAFFIC_SHARE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SHARE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    ready: bool
    make_current: bool
    drop: bool
    set_traffic_share: bool
    traffic_share: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., ready: _Optional[bool] = ..., make_current: _Optional[bool] = ..., drop: _Optional[bool] = ..., set_traffic_share: _Optional[bool] = ..., traffic_share: _Optional[float] = ...) -> None: ...

class UpdateModelReply(_message.Message):
    __slots__ = ("model", "map_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    map_version: int
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., map_version: _Optional[int] = ...) -> None: ...

class CreateModelReply(_message.Message):
    __slots__ = ("map", "model")
    MAP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    map: ShardMap
    model: ModelSpec
    def __init__(self, map: _Optional[_Union[ShardMap, _Mapping]] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class SetReplicasRequest(_message.Message):
    __slots__ = ("table_uid", "partition", "replicas")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class SetReplicasReply(_message.Message):
    __slots__ = ("partition", "map_version")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    partition: ReplicaSet
    map_version: int
    def __init__(self, partition: _Optional[_Union[ReplicaSet, _Mapping]] = ..., map_version: _Optional[int] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("server_id", "reporter", "table_uid", "partitions", "reason")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    reporter: str
    table_uid: int
    partitions: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    def __init__(self, server_id: _Optional[str] = ..., reporter: _Optional[str] = ..., table_uid: _Optional[int] = ..., partitions: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportFailureReply(_message.Message):
    __slots__ = ("map_version",)
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    def __init__(self, map_version: _Optional[int] = ...) -> None: ...

class ReplicaReadyRequest(_message.Message):
    __slots__ = ("server_id", "table_uid", "partition", "epoch", "rows", "leader", "entries")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    table_uid: int
    partition: int
    epoch: int
    rows: int
    leader: str
    entries: int
    def __init__(self, server_id: _Optional[str] = ..., table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., epoch: _Optional[int] = ..., rows: _Optional[int] = ..., leader: _Optional[str] = ..., entries: _Optional[int] = ...) -> None: ...

class ReplicaReadyReply(_message.Message):
    __slots__ = ("map_version",)
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    def __init__(self, map_version: _Optional[int] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("dry_run", "tolerance")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    tolerance: float
    def __init__(self, dry_run: _Optional[bool] = ..., tolerance: _Optional[float] = ...) -> None: ...

class RebalanceReply(_message.Message):
    __slots__ = ("moves", "bytes_before", "bytes_after", "map_version")
    class BytesBeforeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BytesAfterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MOVES_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    moves: _containers.RepeatedCompositeFieldContainer[Move]
    bytes_before: _containers.ScalarMap[str, int]
    bytes_after: _containers.ScalarMap[str, int]
    map_version: int
    def __init__(self, moves: _Optional[_Iterable[_Union[Move, _Mapping]]] = ..., bytes_before: _Optional[_Mapping[str, int]] = ..., bytes_after: _Optional[_Mapping[str, int]] = ..., map_version: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("server_id", "undrain", "dry_run")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    UNDRAIN_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    undrain: bool
    dry_run: bool
    def __init__(self, server_id: _Optional[str] = ..., undrain: _Optional[bool] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RemoveServerRequest(_message.Message):
    __slots__ = ("server_id",)
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    def __init__(self, server_id: _Optional[str] = ...) -> None: ...

class RemoveServerReply(_message.Message):
    __slots__ = ("map_version",)
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    def __init__(self, map_version: _Optional[int] = ...) -> None: ...

class CancelMovesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelMovesReply(_message.Message):
    __slots__ = ("cancelled", "map_version")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    cancelled: int
    map_version: int
    def __init__(self, cancelled: _Optional[int] = ..., map_version: _Optional[int] = ...) -> None: ...

class SplitTableRequest(_message.Message):
    __slots__ = ("model", "table", "cancel")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    table: str
    cancel: bool
    def __init__(self, model: _Optional[str] = ..., table: _Optional[str] = ..., cancel: _Optional[bool] = ...) -> None: ...

class SplitTableReply(_message.Message):
    __slots__ = ("split", "map_version")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    split: Split
    map_version: int
    def __init__(self, split: _Optional[_Union[Split, _Mapping]] = ..., map_version: _Optional[int] = ...) -> None: ...

class SetAutoscaleRequest(_message.Message):
    __slots__ = ("policy", "status_only")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STATUS_ONLY_FIELD_NUMBER: _ClassVar[int]
    policy: AutoscalePolicy
    status_only: bool
    def __init__(self, policy: _Optional[_Union[AutoscalePolicy, _Mapping]] = ..., status_only: _Optional[bool] = ...) -> None: ...

class RebalanceExpertsRequest(_message.Message):
    __slots__ = ("model", "layer", "dry_run")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: str
    dry_run: bool
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ExpertReplicaChange(_message.Message):
    __slots__ = ("kind", "expert", "server")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    expert: int
    server: str
    def __init__(self, kind: _Optional[str] = ..., expert: _Optional[int] = ..., server: _Optional[str] = ...) -> None: ...

class ExpertLayerBalance(_message.Message):
    __slots__ = ("model", "version", "layer", "imbalance_before", "imbalance_after", "changes", "tokens_per_s", "note")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    layer: str
    imbalance_before: float
    imbalance_after: float
    changes: _containers.RepeatedCompositeFieldContainer[ExpertReplicaChange]
    tokens_per_s: _containers.RepeatedScalarFieldContainer[float]
    note: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., layer: _Optional[str] = ..., imbalance_before: _Optional[float] = ..., imbalance_after: _Optional[float] = ..., changes: _Optional[_Iterable[_Union[ExpertReplicaChange, _Mapping]]] = ..., tokens_per_s: _Optional[_Iterable[float]] = ..., note: _Optional[str] = ...) -> None: ...

class RebalanceExpertsReply(_message.Message):
    __slots__ = ("layers", "map_version")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[ExpertLayerBalance]
    map_version: int
    def __init__(self, layers: _Optional[_Iterable[_Union[ExpertLayerBalance, _Mapping]]] = ..., map_version: _Optional[int] = ...) -> None: ...

class PartitionEpochs(_message.Message):
    __slots__ = ("partitions", "epochs")
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    partitions: Tensor
    epochs: Tensor
    def __init__(self, partitions: _Optional[_Union[Tensor, _Mapping]] = ..., epochs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class WriteRowsRequest(_message.Message):
    __slots__ = ("map_version", "table_uid", "ids", "rows", "routed", "request_id")
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    table_uid: int
    ids: Tensor
    rows: Tensor
    routed: PartitionEpochs
    request_id: str
    def __init__(self, map_version: _Optional[int] = ..., table_uid: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., routed: _Optional[_Union[PartitionEpochs, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class WriteRowsReply(_message.Message):
    __slots__ = ("written",)
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    written: int
    def __init__(self, written: _Optional[int] = ...) -> None: ...

class RowsSegment(_message.Message):
    __slots__ = ("table_uid", "ids", "routed")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    ids: Tensor
    routed: PartitionEpochs
    def __init__(self, table_uid: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., routed: _Optional[_Union[PartitionEpochs, _Mapping]] = ...) -> None: ...

class LookupRowsRequest(_message.Message):
    __slots__ = ("map_version", "segments", "with_positions")
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    WITH_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    segments: _containers.RepeatedCompositeFieldContainer[RowsSegment]
    with_positions: bool
    def __init__(self, map_version: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[RowsSegment, _Mapping]]] = ..., with_positions: _Optional[bool] = ...) -> None: ...

class PartitionPositions(_message.Message):
    __slots__ = ("seqs", "epochs")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    seqs: Tensor
    epochs: Tensor
    def __init__(self, seqs: _Optional[_Union[Tensor, _Mapping]] = ..., epochs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LookupRowsReply(_message.Message):
    __slots__ = ("rows", "positions")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[Tensor]
    positions: _containers.RepeatedCompositeFieldContainer[PartitionPositions]
    def __init__(self, rows: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., positions: _Optional[_Iterable[_Union[PartitionPositions, _Mapping]]] = ...) -> None: ...

class PooledSegment(_message.Message):
    __slots__ = ("table_uid", "ids", "inverse", "lengths", "weights", "routed")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    INVERSE_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    ids: Tensor
    inverse: Tensor
    lengths: Tensor
    weights: Tensor
    routed: PartitionEpochs
    def __init__(self, table_uid: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., inverse: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., routed: _Optional[_Union[PartitionEpochs, _Mapping]] = ...) -> None: ...

class LookupPooledRequest(_message.Message):
    __slots__ = ("map_version", "segments", "concat_sums")
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    CONCAT_SUMS_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    segments: _containers.RepeatedCompositeFieldContainer[PooledSegment]
    concat_sums: bool
    def __init__(self, map_version: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[PooledSegment, _Mapping]]] = ..., concat_sums: _Optional[bool] = ...) -> None: ...

class LookupPooledReply(_message.Message):
    __slots__ = ("sums", "all_sums")
    SUMS_FIELD_NUMBER: _ClassVar[int]
    ALL_SUMS_FIELD_NUMBER: _ClassVar[int]
    sums: _containers.RepeatedCompositeFieldContainer[Tensor]
    all_sums: Tensor
    def __init__(self, sums: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., all_sums: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("map_version", "table_uid", "ids", "rows", "routed", "lo", "hi", "files")
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    table_uid: int
    ids: Tensor
    rows: Tensor
    routed: PartitionEpochs
    lo: int
    hi: int
    files: _containers.RepeatedCompositeFieldContainer[IngestFile]
    def __init__(self, map_version: _Optional[int] = ..., table_uid: _Optional[int] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., routed: _Optional[_Union[PartitionEpochs, _Mapping]] = ..., lo: _Optional[int] = ..., hi: _Optional[int] = ..., files: _Optional[_Iterable[_Union[IngestFile, _Mapping]]] = ...) -> None: ...

class IngestFile(_message.Message):
    __slots__ = ("partition", "path")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    partition: int
    path: str
    def __init__(self, partition: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class IngestReply(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class ExpertForwardRequest(_message.Message):
    __slots__ = ("map_version", "table_uid", "routed", "experts", "counts", "hidden", "d_ff", "gated")
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    D_FF_FIELD_NUMBER: _ClassVar[int]
    GATED_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    table_uid: int
    routed: PartitionEpochs
    experts: Tensor
    counts: Tensor
    hidden: Tensor
    d_ff: int
    gated: bool
    def __init__(self, map_version: _Optional[int] = ..., table_uid: _Optional[int] = ..., routed: _Optional[_Union[PartitionEpochs, _Mapping]] = ..., experts: _Optional[_Union[Tensor, _Mapping]] = ..., counts: _Optional[_Union[Tensor, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., d_ff: _Optional[int] = ..., gated: _Optional[bool] = ...) -> None: ...

class ExpertForwardReply(_message.Message):
    __slots__ = ("out", "compute_s")
    OUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    out: Tensor
    compute_s: float
    def __init__(self, out: _Optional[_Union[Tensor, _Mapping]] = ..., compute_s: _Optional[float] = ...) -> None: ...

class ChecksumsRequest(_message.Message):
    __slots__ = ("table_uid", "partitions", "recorded")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partitions: _containers.RepeatedScalarFieldContainer[int]
    recorded: bool
    def __init__(self, table_uid: _Optional[int] = ..., partitions: _Optional[_Iterable[int]] = ..., recorded: _Optional[bool] = ...) -> None: ...

class ChecksumsReply(_message.Message):
    __slots__ = ("checksums", "rows", "scanned")
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SCANNED_FIELD_NUMBER: _ClassVar[int]
    checksums: Tensor
    rows: Tensor
    scanned: Tensor
    def __init__(self, checksums: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., scanned: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("request_id", "partitions", "seqs", "write_epochs", "ids", "rows", "prev_epochs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    WRITE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PREV_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    partitions: Tensor
    seqs: Tensor
    write_epochs: Tensor
    ids: Tensor
    rows: Tensor
    prev_epochs: Tensor
    def __init__(self, request_id: _Optional[str] = ..., partitions: _Optional[_Union[Tensor, _Mapping]] = ..., seqs: _Optional[_Union[Tensor, _Mapping]] = ..., write_epochs: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., prev_epochs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("map_version", "table_uid", "leader", "routed", "entries")
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    map_version: int
    table_uid: int
    leader: str
    routed: PartitionEpochs
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    def __init__(self, map_version: _Optional[int] = ..., table_uid: _Optional[int] = ..., leader: _Optional[str] = ..., routed: _Optional[_Union[PartitionEpochs, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ...) -> None: ...

class ReplicateReply(_message.Message):
    __slots__ = ("applied_rows", "behind_partitions", "behind_seqs", "diverged_partitions")
    APPLIED_ROWS_FIELD_NUMBER: _ClassVar[int]
    BEHIND_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    BEHIND_SEQS_FIELD_NUMBER: _ClassVar[int]
    DIVERGED_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    applied_rows: int
    behind_partitions: Tensor
    behind_seqs: Tensor
    diverged_partitions: Tensor
    def __init__(self, applied_rows: _Optional[int] = ..., behind_partitions: _Optional[_Union[Tensor, _Mapping]] = ..., behind_seqs: _Optional[_Union[Tensor, _Mapping]] = ..., diverged_partitions: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CatchUpRequest(_message.Message):
    __slots__ = ("table_uid", "partition", "after_seq", "after_epoch", "learner", "map_version", "max_bytes")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    AFTER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    after_seq: int
    after_epoch: int
    learner: str
    map_version: int
    max_bytes: int
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., after_seq: _Optional[int] = ..., after_epoch: _Optional[int] = ..., learner: _Optional[str] = ..., map_version: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class CatchUpReply(_message.Message):
    __slots__ = ("entries", "attached", "unavailable", "head_seq")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    attached: bool
    unavailable: bool
    head_seq: int
    def __init__(self, entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., attached: _Optional[bool] = ..., unavailable: _Optional[bool] = ..., head_seq: _Optional[int] = ...) -> None: ...

class HotIdsRequest(_message.Message):
    __slots__ = ("table_uid", "partition", "max_ids", "map_version")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    MAX_IDS_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    max_ids: int
    map_version: int
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., max_ids: _Optional[int] = ..., map_version: _Optional[int] = ...) -> None: ...

class HotIdsReply(_message.Message):
    __slots__ = ("ids", "scores")
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    scores: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BuildReplicaRequest(_message.Message):
    __slots__ = ("table_uid", "partition", "epoch", "source_address", "map_version", "source_id")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    epoch: int
    source_address: str
    map_version: int
    source_id: str
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., epoch: _Optional[int] = ..., source_address: _Optional[str] = ..., map_version: _Optional[int] = ..., source_id: _Optional[str] = ...) -> None: ...

class BuildReplicaReply(_message.Message):
    __slots__ = ("started",)
    STARTED_FIELD_NUMBER: _ClassVar[int]
    started: bool
    def __init__(self, started: _Optional[bool] = ...) -> None: ...

class ReadPartitionRequest(_message.Message):
    __slots__ = ("table_uid", "partition", "chunk_rows", "map_version", "learner")
    TABLE_UID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    table_uid: int
    partition: int
    chunk_rows: int
    map_version: int
    learner: str
    def __init__(self, table_uid: _Optional[int] = ..., partition: _Optional[int] = ..., chunk_rows: _Optional[int] = ..., map_version: _Optional[int] = ..., learner: _Optional[str] = ...) -> None: ...

class PartitionChunk(_message.Message):
    __slots__ = ("ids", "rows", "snapshot_seq", "snapshot_epoch")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    rows: Tensor
    snapshot_seq: int
    snapshot_epoch: int
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., snapshot_seq: _Optional[int] = ..., snapshot_epoch: _Optional[int] = ...) -> None: ...

class FeatureBatch(_message.Message):
    __slots__ = ("model", "version", "keys", "values", "lengths", "weights", "batch_size", "trace", "request_key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    values: Tensor
    lengths: Tensor
    weights: Tensor
    batch_size: int
    trace: bool
    request_key: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., batch_size: _Optional[int] = ..., trace: _Optional[bool] = ..., request_key: _Optional[str] = ...) -> None: ...

class PooledReply(_message.Message):
    __slots__ = ("keys", "length_per_key", "values", "timings", "version")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PER_KEY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    length_per_key: _containers.RepeatedScalarFieldContainer[int]
    values: Tensor
    timings: _containers.ScalarMap[str, float]
    version: int
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., length_per_key: _Optional[_Iterable[int]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., timings: _Optional[_Mapping[str, float]] = ..., version: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("sparse", "dense", "top_k", "trace")
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    sparse: FeatureBatch
    dense: Tensor
    top_k: int
    trace: bool
    def __init__(self, sparse: _Optional[_Union[FeatureBatch, _Mapping]] = ..., dense: _Optional[_Union[Tensor, _Mapping]] = ..., top_k: _Optional[int] = ..., trace: _Optional[bool] = ...) -> None: ...

class PredictReply(_message.Message):
    __slots__ = ("scores", "indices", "version", "timings")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCORES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    scores: Tensor
    indices: Tensor
    version: int
    timings: _containers.ScalarMap[str, float]
    def __init__(self, scores: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ..., timings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PredictCall(_message.Message):
    __slots__ = ("id", "request", "timeout_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    id: int
    request: PredictRequest
    timeout_s: float
    def __init__(self, id: _Optional[int] = ..., request: _Optional[_Union[PredictRequest, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class PredictAnswer(_message.Message):
    __slots__ = ("id", "reply", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    reply: PredictReply
    code: int
    message: str
    def __init__(self, id: _Optional[int] = ..., reply: _Optional[_Union[PredictReply, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RouterWriteRowsRequest(_message.Message):
    __slots__ = ("model", "version", "table", "ids", "rows", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    table: str
    ids: Tensor
    rows: Tensor
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., table: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RouterLookupRowsRequest(_message.Message):
    __slots__ = ("model", "version", "table", "ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    table: str
    ids: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., table: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RouterLookupRowsReply(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: Tensor
    def __init__(self, rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class MoeForwardRequest(_message.Message):
    __slots__ = ("model", "version", "layer", "hidden", "expert_ids", "expert_weights")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    layer: str
    hidden: Tensor
    expert_ids: Tensor
    expert_weights: Tensor
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., layer: _Optional[str] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[Tensor, _Mapping]] = ..., expert_weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class MoeForwardReply(_message.Message):
    __slots__ = ("out", "version", "expert_tokens", "timings")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    out: Tensor
    version: int
    expert_tokens: Tensor
    timings: _containers.ScalarMap[str, float]
    def __init__(self, out: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ..., expert_tokens: _Optional[_Union[Tensor, _Mapping]] = ..., timings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class MoeCall(_message.Message):
    __slots__ = ("id", "request", "timeout_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    id: int
    request: MoeForwardRequest
    timeout_s: float
    def __init__(self, id: _Optional[int] = ..., request: _Optional[_Union[MoeForwardRequest, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class MoeAnswer(_message.Message):
    __slots__ = ("id", "reply", "code", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: int
    reply: MoeForwardReply
    code: int
    message: str
    def __init__(self, id: _Optional[int] = ..., reply: _Optional[_Union[MoeForwardReply, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterStats(_message.Message):
    __slots__ = ("requests", "batches", "redirects", "map_refreshes", "replica_retries", "map_version", "cpu_seconds", "pid", "hedges", "hedge_wins", "metrics_address", "cache_hits", "cache_misses", "cache_invalidated", "cache_bytes", "moe_requests", "moe_batches", "moe_merged")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    REDIRECTS_FIELD_NUMBER: _ClassVar[int]
    MAP_REFRESHES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HEDGES_FIELD_NUMBER: _ClassVar[int]
    HEDGE_WINS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CACHE_INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MOE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MOE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    MOE_MERGED_FIELD_NUMBER: _ClassVar[int]
    requests: int
    batches: int
    redirects: int
    map_refreshes: int
    replica_retries: int
    map_version: int
    cpu_seconds: float
    pid: int
    hedges: int
    hedge_wins: int
    metrics_address: str
    cache_hits: int
    cache_misses: int
    cache_invalidated: int
    cache_bytes: int
    moe_requests: int
    moe_batches: int
    moe_merged: int
    def __init__(self, requests: _Optional[int] = ..., batches: _Optional[int] = ..., redirects: _Optional[int] = ..., map_refreshes: _Optional[int] = ..., replica_retries: _Optional[int] = ..., map_version: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., pid: _Optional[int] = ..., hedges: _Optional[int] = ..., hedge_wins: _Optional[int] = ..., metrics_address: _Optional[str] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., cache_invalidated: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., moe_requests: _Optional[int] = ..., moe_batches: _Optional[int] = ..., moe_merged: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("map", "router")
    MAP_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    map: ShardMap
    router: RouterStats
    def __init__(self, map: _Optional[_Union[ShardMap, _Mapping]] = ..., router: _Optional[_Union[RouterStats, _Mapping]] = ...) -> None: ...
