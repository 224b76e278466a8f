"""Experts stored as partitions of a table, so placement, replication, failover, resizing,
versioned loads and the memory tier all serve expert layers unchanged.

A layer of E experts becomes a table of ``P`` partitions (``P`` the power of two >= E; the
partitions past E stay empty) and ``dim = d_model``. Expert e's weights are the rows of
partition e, in order: ``w1`` (``d_ff`` rows), then ``w3`` (``d_ff`` rows, gated experts
only), then ``w2`` transposed (``d_ff`` rows: ``w2.T`` is ``[d_ff, d_model]``). Row r of expert
e has id ``r * P + e``, so ``partition_of(id) = e`` and its local index is r: in the memory tier
an expert's rows are one contiguous block, and ``unpack_expert`` turns that block into the three
matrices as views, without a copy. Stored in the layer's dtype (float32 or bfloat16).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from embeddings.specs import TableSpec
from experts.specs import ExpertLayerSpec

if TYPE_CHECKING:        # torch is imported where used: the coordinator needs table_for only
    import torch


def num_partitions(spec: ExpertLayerSpec) -> int:
    return 1 << max(0, (spec.num_experts - 1).bit_length())


def rows_per_expert(spec: ExpertLayerSpec) -> int:
    return (3 if spec.gated else 2) * spec.d_ff


def table_for(spec: ExpertLayerSpec) -> TableSpec:
    """The table that holds the layer's routed experts, a partition each."""
    P = num_partitions(spec)
    return TableSpec(name=f"moe.{spec.name}", num_embeddings=P * rows_per_expert(spec),
                     dim=spec.d_model, dtype=spec.dtype, pooling="none", num_partitions=P)


def expert_row_ids(spec: ExpertLayerSpec, expert: int) -> np.ndarray:
    """The ids of expert ``expert``'s rows, in order."""
    return np.arange(rows_per_expert(spec), dtype=np.int64) * num_partitions(spec) + expert


def pack_expert(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """One expert's weights as its rows: [w1; w3; w2.T], [rows_per_expert, d_model], in
    ``dtype`` (the layer's; default float32)."""
    import torch
    dtype = dtype or torch.float32
    parts = [w1] + ([w3] if w3 is not None else []) + [w2.t()]
    return torch.cat([p.to(dtype) for p in parts]).contiguous()


def unpack_expert(spec: ExpertLayerSpec, rows: torch.Tensor):
    """(w1, w2, w3 or None) as views of an expert's rows (see the module doc): ``w2`` is the
    transposed view ``[d_model, d_ff]`` of its rows, so ``h @ w2.t()`` reads them in place."""
    return expert_views(rows, spec.d_ff, spec.gated)


def expert_views(rows: torch.Tensor, d_ff: int, gated: bool):
    w1 = rows[:d_ff]
    w3 = rows[d_ff:2 * d_ff] if gated else None
    w2 = rows[(2 if gated else 1) * d_ff:(3 if gated else 2) * d_ff].t()
    return w1, w2, w3
