"""Expert compute on a shard server (``ExpertForward``): the tokens for several of the experts
this server holds, each expert's rows run as one matrix chain over its weights. An expert
layer is a table whose partition e holds expert e's ``[w1; w3; w2.T]`` rows
(``experts.layout``), so a resident expert's matrices are views of the memory tier (no copy);
a cold one's rows are read from RocksDB first.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from experts.compute import mlp
from experts.layout import expert_views
from shoal.errors import InvalidArgument, ResourceExhausted
from shoal.proto import shoal_pb2 as pb
from shoal.wire import pack, to_torch, unpack



class ExpertPath:
    """Needs from the host: ``_cfg``, ``_enter``, ``_table``, ``_check``, ``_gather``,
    ``_count``."""

    def expert_forward(self, request: pb.ExpertForwardRequest) -> pb.ExpertForwardReply:
        self._enter(request.map_version, refresh=False)
        table = self._table(request.table_uid)
        spec = table.spec
        experts = unpack(request.experts, "experts", "int32", 1).astype(np.int64)
        counts = unpack(request.counts, "counts", "int64", 1)
        if spec.dtype not in ("float32", "bfloat16"):
            raise InvalidArgument(f"table_uid: table {spec.name!r} is {spec.dtype}; expert "
                                  "layers are stored in float32 or bfloat16")
        # The layer's dtype, as a read-only view of the request's bytes (read once: protobuf
        # copies a bytes field on every access).
        x = to_torch(request.hidden, "hidden", spec.dtype, 2)
        if counts.shape != experts.shape:
            raise InvalidArgument(f"counts: {len(counts)} values for {len(experts)} experts")
        if len(np.unique(experts)) != len(experts) or (experts.size and experts.min() < 0):
            raise InvalidArgument("experts: must be distinct, each >= 0")
        if experts.size and experts.max() >= spec.num_partitions:
            raise InvalidArgument(f"experts: expert {int(experts.max())} is not in [0, "
                                  f"{spec.num_partitions}) of table {spec.name!r}")
        if (counts < 0).any() or int(counts.sum()) != x.shape[0]:
            raise InvalidArgument(f"counts: must be >= 0 and sum to the {x.shape[0]} rows "
                                  f"of hidden (they sum to {int(counts.sum())})")
        if x.shape[0] > self._cfg.max_expert_tokens:
            raise ResourceExhausted(f"hidden: {x.shape[0]} token rows exceed max_expert_tokens "
                                    f"{self._cfg.max_expert_tokens}")
        if x.shape[1] != spec.dim:
            raise InvalidArgument(f"hidden: {x.shape[1]} columns, but layer table "
                                  f"{spec.name!r} has d_model {spec.dim}")
        rows_per = (3 if request.gated else 2) * request.d_ff
        rpp = table.arena.rows_per_partition
        if request.d_ff < 1 or rows_per > rpp:
            raise InvalidArgument(f"d_ff: {request.d_ff} ({'gated' if request.gated else 'GELU'}"
                                  f" experts: {rows_per} rows) does not fit the {rpp} rows per "
                                  f"expert of table {spec.name!r}")
        if not torch.isfinite(x).all():
            raise InvalidArgument("hidden: must be finite (found NaN or inf)")
        out = torch.empty_like(x)
        t0 = time.perf_counter()
        with table.lock.read():            # views of the arena stay valid meanwhile
            # Row 0 of expert e has id e: the experts, as ids, are held at a good epoch.
            self._check(table, experts, request.routed, read=True)
            start = 0
            for e, n in zip(experts.tolist(), counts.tolist()):
                if n:
                    w1, w2, w3 = expert_views(self._expert_rows(table, e, rows_per),
                                              request.d_ff, request.gated)
                    mlp(x[start:start + n], w1, w2, w3, out=out[start:start + n])
                start += n
        compute_s = time.perf_counter() - t0
        table.looked_up[experts] += counts
        self._count(int(counts.sum()))
        return pb.ExpertForwardReply(out=pack(out), compute_s=compute_s)

    def _expert_rows(self, table, expert: int, rows: int) -> torch.Tensor:
        """Expert ``expert``'s first ``rows`` rows: a view of the memory tier if resident."""
        arena = table.arena
        if arena.resident(expert):
            base = int(arena.slot[expert]) * arena.rows_per_partition
            return arena.weight[base:base + rows]
        P = table.spec.num_partitions
        ids = np.arange(rows, dtype=np.int64) * P + expert
        weight, _ = self._gather(table, ids, np.full(rows, expert, np.int64))
        return weight           # not resident: every row is cold, read into a buffer in order
