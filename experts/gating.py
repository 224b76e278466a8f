"""The gate: which ``top_k`` experts each token visits, and with what weight. Vectorised over
tokens (one matmul, one top-k); the variants are described in ``experts.specs``.

Logits are ``hidden @ gate.T`` in the hidden states' dtype, then scored in float32, as the
Hugging Face models do (``softmax(router_logits, dim=1, dtype=torch.float)``); weights come back
float32. ``sigmoid_group`` masks the experts of groups not kept with -inf, as DeepSeek-V3's own
inference code does (``inference/model.py``, ``Gate``).
"""
from __future__ import annotations

import torch

from experts.specs import ExpertLayerSpec
from shoal.errors import InvalidArgument


def route(spec: ExpertLayerSpec, gate: torch.Tensor, hidden: torch.Tensor,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids int64 [T, top_k], weights float32 [T, top_k]) for hidden states [T, d]."""
    logits = (hidden @ gate.t()).float()
    k = spec.top_k
    if spec.gating == "sigmoid_group":
        scores = logits.sigmoid()
        choice = scores + bias.float() if bias is not None else scores
        if spec.n_group > 1:
            T = choice.shape[0]
            grouped = choice.view(T, spec.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = group_scores.topk(spec.topk_group, dim=-1).indices
            mask = torch.ones(T, spec.n_group, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).view(T, -1)
        ids = choice.topk(k, dim=-1).indices
        weights = scores.gather(1, ids)
        if spec.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * spec.routed_scaling_factor
    probs = logits.softmax(dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if spec.gating == "softmax_renorm" or spec.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


def check_routing(spec: ExpertLayerSpec, expert_ids: torch.Tensor, weights: torch.Tensor,
                  num_tokens: int) -> None:
    """Precomputed routing (callers that gate themselves): shapes, ranges, finite weights."""
    shape = (num_tokens, expert_ids.shape[1] if expert_ids.dim() == 2 else -1)
    if expert_ids.dim() != 2 or expert_ids.shape[0] != num_tokens:
        raise InvalidArgument(f"expert_ids: shape {list(expert_ids.shape)} must be "
                              f"[{num_tokens}, k]")
    if expert_ids.shape[1] > spec.num_experts:
        raise InvalidArgument(f"expert_ids: top_k {expert_ids.shape[1]} (columns) exceeds the "
                              f"{spec.num_experts} experts of layer {spec.name!r}")
    if tuple(weights.shape) != shape:
        raise InvalidArgument(f"expert_weights: shape {list(weights.shape)} must be "
                              f"{list(shape)}, as expert_ids")
    if expert_ids.numel() and (int(expert_ids.min()) < 0
                               or int(expert_ids.max()) >= spec.num_experts):
        bad = expert_ids[(expert_ids < 0) | (expert_ids >= spec.num_experts)][0]
        raise InvalidArgument(f"expert_ids: expert {int(bad)} is out of range "
                              f"[0, {spec.num_experts}) of layer {spec.name!r}")
    if not torch.isfinite(weights).all():
        raise InvalidArgument("expert_weights: must be finite")
