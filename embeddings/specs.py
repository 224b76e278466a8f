"""Table specs: what a Shoal embedding table is, and conversion from torchrec configs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal.errors import InvalidArgument
from shoal.proto import shoal_pb2 as pb

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
POOLINGS = ("sum", "mean", "none")
MAX_DIM = 65_536
MAX_ROWS = 1 << 40


@dataclass(frozen=True)
class TableSpec:
    name: str
    num_embeddings: int
    dim: int
    dtype: str = "float32"
    pooling: str = "sum"
    feature_names: tuple[str, ...] = ()
    num_partitions: int = 0          # 0: the coordinator chooses
    table_uid: int = 0               # assigned by the coordinator

    @property
    def row_bytes(self) -> int:
        return self.dim * DTYPES[self.dtype]

    @property
    def np_dtype(self) -> np.dtype:
        """The rows' numpy dtype; bfloat16 rows are their 16-bit patterns (uint16), as numpy
        has no bfloat16 (``shoal.wire`` labels uint16 arrays bfloat16)."""
        return np.dtype("uint16" if self.dtype == "bfloat16" else self.dtype)

    def validate(self) -> "TableSpec":
        where = f"table {self.name!r}"
        if not self.name:
            raise InvalidArgument("table.name: must not be empty")
        if not 0 < self.num_embeddings <= MAX_ROWS:
            raise InvalidArgument(f"{where}: num_embeddings {self.num_embeddings} must be in "
                                  f"[1, {MAX_ROWS}]")
        if not 0 < self.dim <= MAX_DIM:
            raise InvalidArgument(f"{where}: dim {self.dim} must be in [1, {MAX_DIM}]")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"{where}: dtype {self.dtype!r} is not supported "
                                  f"(allowed: {', '.join(DTYPES)})")
        if self.pooling not in POOLINGS:
            raise InvalidArgument(f"{where}: pooling {self.pooling!r} is not supported "
                                  f"(allowed: {', '.join(POOLINGS)})")
        p = self.num_partitions
        if p < 0 or (p and p & (p - 1)):
            raise InvalidArgument(f"{where}: num_partitions {p} must be a power of two (or 0)")
        return self

    def to_proto(self) -> pb.TableSpec:
        return pb.TableSpec(name=self.name, num_embeddings=self.num_embeddings, dim=self.dim,
                            dtype=self.dtype, pooling=self.pooling,
                            feature_names=list(self.feature_names),
                            num_partitions=self.num_partitions, table_uid=self.table_uid)

    @classmethod
    def from_proto(cls, t: pb.TableSpec) -> "TableSpec":
        return cls(name=t.name, num_embeddings=t.num_embeddings, dim=t.dim, dtype=t.dtype,
                   pooling=t.pooling, feature_names=tuple(t.feature_names),
                   num_partitions=t.num_partitions, table_uid=t.table_uid)


def from_torchrec(config) -> TableSpec:
    """A Shoal TableSpec from a torchrec ``EmbeddingBagConfig`` or ``EmbeddingConfig``."""
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

    dtypes = {DataType.FP32: "float32", DataType.FP16: "float16", DataType.BF16: "bfloat16"}
    if config.data_type not in dtypes:
        raise InvalidArgument(f"table {config.name!r}: data_type {config.data_type} is not "
                              "supported (allowed: FP32, FP16, BF16)")
    if isinstance(config, EmbeddingBagConfig):
        pooling = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean",
                   PoolingType.NONE: "none"}[config.pooling]
    else:
        pooling = "none"
    features = tuple(config.feature_names) or (config.name,)
    return TableSpec(name=config.name, num_embeddings=int(config.num_embeddings),
                     dim=int(config.embedding_dim), dtype=dtypes[config.data_type],
                     pooling=pooling, feature_names=features).validate()


def to_spec(table) -> TableSpec:
    """Accept a TableSpec or a torchrec embedding config."""
    if isinstance(table, TableSpec):
        return table.validate()
    if hasattr(table, "embedding_dim") and hasattr(table, "num_embeddings"):
        return from_torchrec(table)
    raise InvalidArgument(f"tables: {type(table).__name__} is not a TableSpec or a torchrec "
                          "EmbeddingBagConfig / EmbeddingConfig")


def check_ids(ids: np.ndarray, spec: TableSpec, field: str) -> None:
    """InvalidArgument naming ``field``, the first bad id and the table's range, if any id is
    outside [0, num_embeddings). One min and one max over the ids."""
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= spec.num_embeddings:
            bad = lo if lo < 0 else hi
            raise InvalidArgument(f"{field}: id {bad} is out of range [0, {spec.num_embeddings}) "
                                  f"of table {spec.name!r}")
