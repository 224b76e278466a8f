"""Expert compute, vectorised: tokens sorted by expert, each expert's rows run as one grouped
matrix product (a loop over experts, never over tokens), outputs combined back per token with
the gate weights. ``moe_forward_local`` is the whole block in one process; shard servers run
``expert_ffn`` on the experts they hold and the router does the rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from experts.gating import check_routing, route
from experts.specs import ExpertLayerSpec, ExpertLayerWeights
from shoal.errors import InvalidArgument


def dispatch(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): the positions of ``expert_ids.flatten()`` sorted by expert (stable:
    a token's slots keep token order within an expert), and tokens per expert."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, torch.bincount(flat, minlength=num_experts)


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert: ``w2(silu(w1 x) * w3 x)``, or ``w2(gelu(w1 x))`` when ``w3`` is None."""
    h = x @ w1.t()
    h = F.silu(h) * (x @ w3.t()) if w3 is not None else F.gelu(h)
    return torch.matmul(h, w2.t(), out=out)


def expert_ffn(spec: ExpertLayerSpec, w1: torch.Tensor, w2: torch.Tensor,
               w3: torch.Tensor | None, x_sorted: torch.Tensor,
               counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_sorted`` grouped by expert (``counts[e]`` rows for expert e of ``w1`` /
    ``w2`` / ``w3``, in order) through their experts; experts with no rows cost nothing."""
    out = torch.empty_like(x_sorted)
    ends = torch.cumsum(counts, 0).tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            mlp(x_sorted[start:end], w1[e], w2[e], w3[e] if w3 is not None else None,
                 out=out[start:end])
        start = end
    return out


def combine(out_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
            num_tokens: int) -> torch.Tensor:
    """Per token, the sum over its slots of weight * expert output ([T, d], the outputs'
    dtype; weights are cast to it first, as the Hugging Face blocks do)."""
    k = weights.shape[1]
    w = weights.reshape(-1)[order].to(out_sorted.dtype)
    y = torch.zeros(num_tokens, out_sorted.shape[1], dtype=out_sorted.dtype)
    return y.index_add_(0, order // k, out_sorted * w.unsqueeze(1))


def shared_expert(spec: ExpertLayerSpec, w: ExpertLayerWeights,
                  hidden: torch.Tensor) -> torch.Tensor:
    out = mlp(hidden, w.shared_w1, w.shared_w2, w.shared_w3)
    if spec.shared_gate:
        out = torch.sigmoid(hidden @ w.shared_gate.t()) * out
    return out


def check_hidden(spec: ExpertLayerSpec, hidden: torch.Tensor, field: str = "hidden_states"):
    if hidden.dim() != 2 or hidden.shape[1] != spec.d_model:
        raise InvalidArgument(f"{field}: shape {list(hidden.shape)} must be [tokens, d_model="
                              f"{spec.d_model}] for layer {spec.name!r}")
    if not torch.isfinite(hidden).all():
        raise InvalidArgument(f"{field}: must be finite (found NaN or inf)")


def moe_forward_local(spec: ExpertLayerSpec, weights: ExpertLayerWeights, hidden: torch.Tensor,
                      expert_ids: torch.Tensor | None = None,
                      expert_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The layer on hidden states [T, d_model] in this process: route (or take the caller's
    ``expert_ids`` / ``expert_weights``), dispatch, run the experts, combine, add the shared
    expert. Output [T, d_model] in the hidden states' dtype."""
    check_hidden(spec, hidden)
    T = hidden.shape[0]
    if expert_ids is None:
        expert_ids, expert_weights = route(spec, weights.gate, hidden, weights.bias)
    else:
        check_routing(spec, expert_ids, expert_weights, T)
    order, counts = dispatch(expert_ids, spec.num_experts)
    k = expert_ids.shape[1]
    out = expert_ffn(spec, weights.w1, weights.w2, weights.w3, hidden[order // k], counts)
    y = combine(out, order, expert_weights, T)
    if spec.shared_d_ff:
        y = y + shared_expert(spec, weights, hidden)
    return y
