"""Experts as table partitions: the ids of an expert's rows fall in its own partition, at local
indices 0.., so an expert is one contiguous block of the table, and unpacking that block gives
back its matrices as views that compute the same FFN."""
from __future__ import annotations

import torch

from embeddings.partition import local_index, partition_of
from experts.compute import expert_ffn
from experts.layout import (expert_row_ids, num_partitions, pack_expert, rows_per_expert,
                            table_for, unpack_expert)
from experts.specs import ExpertLayerSpec


def test_experts_are_contiguous_partitions_and_unpack_to_views():
    for activation in ("silu_gated", "gelu"):
        spec = ExpertLayerSpec("l", num_experts=60, d_model=16, d_ff=24, top_k=4,
                               activation=activation, gating="softmax").validate()
        P = num_partitions(spec)
        t = table_for(spec).validate()
        assert (P, t.num_partitions, t.dim) == (64, 64, 16)
        assert t.num_embeddings == 64 * rows_per_expert(spec)
        g = torch.Generator().manual_seed(0)
        w1 = torch.randn(60, 24, 16, generator=g)
        w2 = torch.randn(60, 16, 24, generator=g)
        w3 = torch.randn(60, 24, 16, generator=g) if spec.gated else None
        table = torch.zeros(t.num_embeddings, 16)
        for e in range(60):
            ids = torch.from_numpy(expert_row_ids(spec, e))
            assert (partition_of(ids.numpy(), P) == e).all()
            assert (local_index(ids.numpy(), P) == range(rows_per_expert(spec))).all()
            table[ids] = pack_expert(w1[e], w2[e], w3[e] if w3 is not None else None)
        # The memory tier keeps partition e at slot e: its rows are one block.
        arena = torch.empty(P, rows_per_expert(spec), 16)
        for e in range(60):
            arena[e] = table[torch.from_numpy(expert_row_ids(spec, e))]
        x = torch.randn(10, 16, generator=g)
        counts = torch.zeros(60, dtype=torch.int64)
        counts[7], counts[59] = 4, 6
        views = [unpack_expert(spec, arena[e]) for e in range(60)]
        v1, v2, v3 = views[7]
        assert v1.data_ptr() == arena[7].data_ptr()                  # a view, not a copy
        torch.testing.assert_close(v2, w2[7], rtol=0, atol=0)
        stack = lambda i: torch.stack([v[i] for v in views])         # noqa: E731
        got = expert_ffn(spec, stack(0), stack(1), stack(2) if spec.gated else None, x, counts)
        want = expert_ffn(spec, w1, w2, w3, x, counts)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
