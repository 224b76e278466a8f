"""The MoE expert library (experts/) against plain-PyTorch reference blocks.

The reference blocks below are written from the published model definitions and import nothing
from experts/; only the tests call the library and compare:

* ``RefMixtral``      transformers models/mixtral/modeling_mixtral.py, MixtralSparseMoeBlock and
                      MixtralBlockSparseTop2MLP (softmax in float32, top-k, renormalise, cast to the
                      hidden dtype, per-expert loop with index_add_ in the hidden dtype).
                      With activation="gelu" it is the same block with non-gated w2(gelu(w1 x)).
* ``RefQwen2Moe``     transformers models/qwen2_moe/modeling_qwen2_moe.py, Qwen2MoeSparseMoeBlock and
                      Qwen2MoeMLP (softmax top-k, renormalised only if norm_topk_prob; shared_expert
                      scaled by sigmoid(shared_expert_gate(x))).
* ``RefDeepseekV3``   transformers models/deepseek_v3/modeling_deepseek_v3.py, DeepseekV3TopkRouter /
                      DeepseekV3MoE / DeepseekV3MLP, and deepseek-ai/DeepSeek-V3 inference/model.py,
                      Gate / MoE (sigmoid scores, e_score_correction_bias used only for choosing,
                      group-limited top-k, weights = unbiased scores, optional renormalisation,
                      routed_scaling_factor, ungated shared experts).

Precision (bf16): gate logits are hidden @ gate.T in the hidden dtype, then float32 for
softmax/sigmoid; routing weights are cast to the hidden dtype before they scale expert outputs;
the weighted outputs are summed in the hidden dtype (index_add_ into a hidden-dtype buffer).
bf16 outputs are compared with a bf16 reference on every token of inputs built to route clearly
(``firm_hidden``: in bf16 a 1-ulp difference in a logit can legitimately flip the k-th choice of
a near tie, so the inputs have none), and also checked to be no further from a float32 reference
than the bf16 reference itself is; drawn inputs' near ties have a test of their own (the output
is the block under the library's own routing).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import grpc
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal.errors import InvalidArgument, ShoalError

pytestmark = pytest.mark.timeout(120)

D_MODEL, D_FF, E = 64, 128, 8
TOKEN_COUNTS = (1, 2, 7, 64, 513, 4096)
DTYPES = ("float32", "bfloat16")
TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# float32: library vs reference.
FP32_RTOL, FP32_ATOL = 1e-5, 1e-5
# bf16: library vs bf16 reference, relative to the output's RMS.
BF16_TOL = 2e-2
# bf16: the library's error against a float32 reference may exceed the bf16 reference's own
# error by at most this factor (a different but equally plain bf16 summation order).
BF16_NOT_WORSE = 1.25
# bf16: a token is "firm" when its top-k set survives a 1-ulp error in every gate logit with
# this safety factor (see _softmax_margin); other tokens are near ties and may route differently
# under a different (equally valid) matmul.
FIRM_MARGIN = 2.0


# ======================================================================== reference blocks
# Independent of experts/: nothing below this line up to "helpers" uses the library.

class GatedMLP(nn.Module):
    """MixtralBlockSparseTop2MLP / Qwen2MoeMLP / DeepseekV3MLP / DeepSeek inference Expert:
    w2(silu(w1 x) * w3 x), no biases. (w1 = gate_proj, w3 = up_proj, w2 = down_proj.)"""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """Non-gated expert: w2(gelu(w1 x)), exact (erf) GELU."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = None

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="none"))


def _hf_sparse_moe(hidden, experts, selected_experts, routing_weights, num_experts):
    """The expert loop of MixtralSparseMoeBlock.forward / Qwen2MoeSparseMoeBlock.forward:
    routing_weights already in the hidden dtype; accumulation by index_add_ in the hidden dtype."""
    final = torch.zeros_like(hidden)
    expert_mask = F.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0)
    hit = (expert_mask.sum(dim=(-1, -2)) > 0).nonzero(as_tuple=True)[0].tolist()
    for e in hit:
        idx, top_x = torch.where(expert_mask[e])
        current = hidden[None, top_x].reshape(-1, hidden.shape[-1])
        current = experts[e](current) * routing_weights[top_x, idx, None]
        final.index_add_(0, top_x, current.to(hidden.dtype))
    return final


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at |v| (float32 result)."""
    _, e = torch.frexp(v.float().abs().clamp_min(1e-30))
    return torch.finfo(dtype).eps * torch.pow(2.0, (e - 1).float())


def _pair_margin(scores: torch.Tensor, k: int, unc: torch.Tensor) -> torch.Tensor:
    """Per row: (k-th largest - (k+1)-th largest) / (the sum of those two entries' uncertainty
    ``unc``); inf where there is no (k+1)-th or it is -inf."""
    if k >= scores.shape[-1]:
        return torch.full(scores.shape[:1], math.inf)
    vals, order = scores.float().sort(dim=-1, descending=True)
    gap = vals[:, k - 1] - vals[:, k]
    both = unc.gather(1, order[:, k - 1:k + 1]).sum(-1).clamp_min(1e-30)
    m = gap / both
    return torch.where(torch.isfinite(gap), m, torch.full_like(m, math.inf))


def _softmax_margin(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """How robust the top-k set is to a 1-ulp (hidden dtype) error in every logit: the gap
    between the k-th and (k+1)-th logit over the largest change two such errors make. A token
    with margin > 1 routes the same under any such error (softmax preserves the logit order)."""
    l = router_logits.float()
    if k >= l.shape[-1]:
        return torch.full(l.shape[:1], math.inf)
    s = l.sort(dim=-1, descending=True).values
    a, b = s[:, k - 1], s[:, k]
    return (a - b) / (2 * _ulp(torch.maximum(a.abs(), b.abs()), router_logits.dtype))


class RefMixtral(nn.Module):
    """MixtralSparseMoeBlock (eval mode: no router jitter)."""

    def __init__(self, d_model, d_ff, num_experts, top_k, activation="silu_gated"):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        mlp = GatedMLP if activation == "silu_gated" else GeluMLP
        self.experts = nn.ModuleList([mlp(d_model, d_ff) for _ in range(num_experts)])

    @property
    def gate_weight(self):
        return self.gate.weight

    def route(self, hidden):
        """-> (selected_experts int64 [T,k], routing_weights float32 [T,k], margin [T])."""
        router_logits = self.gate(hidden)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        margin = _softmax_margin(router_logits, self.top_k)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        return selected_experts, routing_weights, margin

    def forward(self, hidden, selected_experts=None, routing_weights=None):
        if selected_experts is None:
            selected_experts, routing_weights, _ = self.route(hidden)
        # "we cast back to the input dtype"
        routing_weights = routing_weights.to(hidden.dtype)
        return _hf_sparse_moe(hidden, self.experts, selected_experts, routing_weights,
                              self.num_experts)


class RefQwen2Moe(nn.Module):
    """Qwen2MoeSparseMoeBlock: softmax top-k (renormalised iff norm_topk_prob) plus a shared
    expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, d_model, d_ff, num_experts, top_k, shared_d_ff, norm_topk_prob):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList([GatedMLP(d_model, d_ff) for _ in range(num_experts)])
        self.shared_expert = GatedMLP(d_model, shared_d_ff)
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)

    @property
    def gate_weight(self):
        return self.gate.weight

    def route(self, hidden):
        router_logits = self.gate(hidden)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        margin = _softmax_margin(router_logits, self.top_k)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        return selected_experts, routing_weights, margin

    def forward(self, hidden, selected_experts=None, routing_weights=None):
        if selected_experts is None:
            selected_experts, routing_weights, _ = self.route(hidden)
        routing_weights = routing_weights.to(hidden.dtype)
        final = _hf_sparse_moe(hidden, self.experts, selected_experts, routing_weights,
                               self.num_experts)
        shared = self.shared_expert(hidden)
        shared = F.sigmoid(self.shared_expert_gate(hidden)) * shared
        return final + shared


class RefDeepseekV3(nn.Module):
    """DeepseekV3MoE with DeepseekV3TopkRouter; the masking and the expert loop follow DeepSeek's
    inference/model.py (Gate, MoE)."""

    def __init__(self, d_model, moe_intermediate_size, num_experts, top_k, n_group, topk_group,
                 routed_scaling_factor, n_shared_experts, norm_topk_prob):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        # A plain attribute, not a buffer, so that .to(bfloat16) leaves it float32 (the library
        # keeps e_score_correction_bias in float32).
        self.e_score_correction_bias = torch.zeros(num_experts)
        self.experts = nn.ModuleList([GatedMLP(d_model, moe_intermediate_size)
                                      for _ in range(num_experts)])
        self.shared_experts = GatedMLP(d_model, moe_intermediate_size * n_shared_experts)

    @property
    def gate_weight(self):
        return self.weight

    def route(self, hidden):
        T = hidden.shape[0]
        # Logits in the hidden dtype, then float32 (the library's stated semantics). HF's router
        # computes F.linear(hidden.float(), weight.float()); DeepSeek's Gate computes
        # linear(x, weight) and the sigmoid in the model dtype. All three agree in float32.
        router_logits = F.linear(hidden, self.weight).float()
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias.float().unsqueeze(0)
        grouped = scores_for_choice.view(T, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1)[1]
        # inference/model.py: mask = ones.scatter_(1, indices, False); masked_fill_(-inf).
        # (HF's get_topk_indices fills 0.0 instead; the two differ only when a masked expert's
        # 0.0 beats a kept expert's negative biased score. The main tests draw biases >= 0 so
        # both agree; test_deepseek_masked_groups_never_chosen pins -inf.)
        mask = torch.ones(T, self.n_group, dtype=torch.bool).scatter_(1, group_idx, False)
        masked = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        topk_indices = torch.topk(masked, k=self.top_k, dim=-1)[1]
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weights = topk_weights * self.routed_scaling_factor
        # Test-side robustness margin (see _softmax_margin): a 1-ulp error in logit l moves
        # sigmoid(l) by about ulp(l) * s * (1 - s); a group score by the sum over its top two.
        u = _ulp(router_logits, hidden.dtype) * scores * (1 - scores)
        margin = torch.minimum(
            _pair_margin(group_scores, self.topk_group,
                         u.view(grouped.shape).gather(2, grouped.topk(2, dim=-1)[1]).sum(-1)),
            _pair_margin(masked, self.top_k, u))
        return topk_indices, topk_weights, margin

    def forward(self, x, indices=None, weights=None):
        if indices is None:
            indices, weights, _ = self.route(x)
        weights = weights.type_as(x)                     # Gate: `weights.type_as(x)`
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.num_experts).tolist()
        for i in range(self.num_experts):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None]
        z = self.shared_experts(x)
        return y + z


# ======================================================================== helpers (test side)

from experts.compute import combine, dispatch, expert_ffn, moe_forward_local  # noqa: E402
from experts.gating import route  # noqa: E402
from experts.specs import ExpertLayerSpec, ExpertLayerWeights  # noqa: E402


def _init_(module: nn.Module, gen: torch.Generator) -> None:
    """Every Linear weight ~ N(0, 1/in_features) so activations stay O(1)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                               / math.sqrt(m.in_features))


VARIANTS = {
    # name: (spec kwargs, reference factory)
    "mixtral": (dict(top_k=2, gating="softmax_renorm"),
                lambda: RefMixtral(D_MODEL, D_FF, E, 2)),
    "qwen2_moe": (dict(top_k=4, gating="softmax", norm_topk_prob=False,
                       shared_d_ff=160, shared_gate=True),
                  lambda: RefQwen2Moe(D_MODEL, D_FF, E, 4, 160, norm_topk_prob=False)),
    "qwen2_moe_norm": (dict(top_k=4, gating="softmax", norm_topk_prob=True,
                            shared_d_ff=160, shared_gate=True),
                       lambda: RefQwen2Moe(D_MODEL, D_FF, E, 4, 160, norm_topk_prob=True)),
    "deepseek_v3": (dict(top_k=3, gating="sigmoid_group", norm_topk_prob=True, n_group=4,
                         topk_group=2, routed_scaling_factor=2.5, shared_d_ff=2 * D_FF),
                    lambda: RefDeepseekV3(D_MODEL, D_FF, E, 3, 4, 2, 2.5, 2, True)),
    "deepseek_v3_nonorm": (dict(top_k=3, gating="sigmoid_group", norm_topk_prob=False,
                                n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                shared_d_ff=D_FF),
                           lambda: RefDeepseekV3(D_MODEL, D_FF, E, 3, 4, 2, 2.5, 1, False)),
    "gelu": (dict(top_k=2, gating="softmax_renorm", activation="gelu"),
             lambda: RefMixtral(D_MODEL, D_FF, E, 2, activation="gelu")),
}


def make_spec(variant: str, dtype: str) -> ExpertLayerSpec:
    kw = VARIANTS[variant][0]
    return ExpertLayerSpec(name=variant, num_experts=E, d_model=D_MODEL, d_ff=D_FF,
                           dtype=dtype, **kw)


_REFS: dict = {}


def make_refs(variant: str):
    """(fp32 reference, bf16 reference, fp32 reference with the bf16-rounded weights)."""
    if variant not in _REFS:
        gen = torch.Generator().manual_seed(1000 + sorted(VARIANTS).index(variant))
        ref = VARIANTS[variant][1]()
        _init_(ref, gen)
        if isinstance(ref, RefDeepseekV3):
            with torch.no_grad():
                ref.weight.copy_(torch.randn(ref.weight.shape, generator=gen)
                                 / math.sqrt(D_MODEL))
            # >= 0 so that HF's 0.0 fill and DeepSeek's -inf fill choose the same experts.
            ref.e_score_correction_bias = torch.rand(E, generator=gen) * 0.2
        ref.eval()
        ref16 = copy.deepcopy(ref).to(torch.bfloat16)
        ref32r = copy.deepcopy(ref16).float()
        _REFS[variant] = (ref, ref16, ref32r)
    return _REFS[variant]


def lib_weights(ref: nn.Module) -> ExpertLayerWeights:
    """Copy a reference block's parameters into the library's layout (nn.Linear [out, in])."""
    def stack(name):
        ws = [getattr(e, name) for e in ref.experts]
        return None if ws[0] is None else torch.stack([w.weight.detach() for w in ws]).clone()

    shared = getattr(ref, "shared_expert", None)
    if shared is None:
        shared = getattr(ref, "shared_experts", None)
    sgate = getattr(ref, "shared_expert_gate", None)
    bias = getattr(ref, "e_score_correction_bias", None)
    return ExpertLayerWeights(
        gate=ref.gate_weight.detach().clone(),
        w1=stack("w1"), w2=stack("w2"), w3=stack("w3"),
        bias=None if bias is None else bias.detach().clone().float(),
        shared_w1=None if shared is None else shared.w1.weight.detach().clone(),
        shared_w3=None if shared is None else shared.w3.weight.detach().clone(),
        shared_w2=None if shared is None else shared.w2.weight.detach().clone(),
        shared_gate=None if sgate is None else sgate.weight.detach().clone(),
    )


def make_hidden(T: int, seed: int) -> torch.Tensor:
    return torch.randn(T, D_MODEL, generator=torch.Generator().manual_seed(seed))


FIRM_PUSH = 0.5        # logit units a firm input's chosen experts stand above the others


def firm_hidden(ref: nn.Module, T: int, seed: int, prep=None) -> torch.Tensor:
    """``make_hidden(T, seed)`` (after ``prep(x)``, if given) made into T tokens whose routing
    under ``ref`` (a bf16 reference) is clear for every token, by construction rather than by
    leaving near ties out: each token is moved within the gate's row space (the rest of it stays
    as drawn), so that the logits of the experts ``ref`` chooses for it rise by FIRM_PUSH and
    every other expert's fall by FIRM_PUSH (W @ dx = d, dx = pinv(W) d). Group-limited choices
    may move when pushed, so the push is repeated (at most 4 times) until every token's margin
    is over twice FIRM_MARGIN. bf16 tests compare every token of such inputs."""
    x = make_hidden(T, seed)
    if prep is not None:
        prep(x)
    dtype = ref.gate_weight.dtype
    w = ref.gate_weight.detach().float()
    lift = torch.linalg.pinv(w).T                       # [E, d_model]: logit offsets -> dx
    with torch.no_grad():
        for _ in range(4):
            ids, _, margin = ref.route(x.to(dtype))
            if (margin > 2 * FIRM_MARGIN).all():
                return x
            d = torch.full((T, w.shape[0]), -FIRM_PUSH).scatter_(1, ids, FIRM_PUSH)
            x = x + d @ lift
    raise AssertionError(f"{int((margin <= 2 * FIRM_MARGIN).sum())} of {T} tokens still near "
                         "a tie after 4 pushes")


def sorted_routing(ids: torch.Tensor, w: torch.Tensor):
    """Sort each token's k choices by expert id (the order of the k is not part of the contract)."""
    s, perm = ids.sort(dim=-1)
    return s, w.gather(1, perm)


def rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).norm().item() / max(b.float().norm().item(), 1e-30)


def assert_bf16_close(lib: torch.Tensor, ref: torch.Tensor, what: str, min_rows: int = 1):
    """Close to a bf16 reference, on at least ``min_rows`` rows (a comparison of nothing is
    a failure, not a pass)."""
    assert ref.shape[0] >= min_rows and lib.shape == ref.shape, \
        f"{what}: {ref.shape[0]} rows compared, at least {min_rows} wanted"
    scale = max(rms(ref), 1e-6)
    torch.testing.assert_close(lib.float(), ref.float(), rtol=BF16_TOL, atol=BF16_TOL * scale,
                               msg=lambda m: f"{what}: {m}")


def assert_not_worse(lib16, ref16, ref32, what: str):
    """The bf16 library is no further from the fp32 reference than a plain bf16 implementation
    (on at least one row)."""
    assert lib16.shape[0] > 0 and lib16.shape == ref16.shape == ref32.shape, \
        f"{what}: nothing compared"
    e_lib, e_ref = rel_err(lib16, ref32), rel_err(ref16, ref32)
    assert e_lib <= BF16_NOT_WORSE * e_ref + 1e-4, (
        f"{what}: bf16 library rel. error vs fp32 reference {e_lib:.3e} > "
        f"{BF16_NOT_WORSE} x the bf16 reference's {e_ref:.3e}")


def random_routing(T: int, k: int, num_experts: int, seed: int):
    """Distinct expert ids per token and positive float32 weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, num_experts, generator=g).argsort(dim=-1)[:, :k].contiguous()
    w = torch.rand(T, k, generator=g) + 0.05
    return ids, w


# ======================================================================== specs

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_spec_valid_and_frozen(variant, dtype):
    spec = make_spec(variant, dtype)
    spec.validate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.top_k = 1


BAD_SPECS = [
    # (overrides, field the message must name, value the message must name)
    (dict(top_k=9), "top_k", "9"),
    (dict(top_k=0), "top_k", "0"),
    (dict(top_k=-1), "top_k", "-1"),
    (dict(d_model=0), "d_model", "0"),
    (dict(d_model=-4), "d_model", "-4"),
    (dict(activation="relu"), "activation", "relu"),
    (dict(gating="sparsemixer"), "gating", "sparsemixer"),
    (dict(dtype="float16"), "dtype", "float16"),
    (dict(dtype="int8"), "dtype", "int8"),
    (dict(gating="sigmoid_group", n_group=3, topk_group=1), "n_group", "3"),
    (dict(gating="sigmoid_group", n_group=4, topk_group=5), "topk_group", "5"),
    (dict(shared_gate=True, shared_d_ff=0), "shared_gate", None),
]


@pytest.mark.parametrize("overrides,field,value", BAD_SPECS,
                         ids=[f"{f}={v}" for _, f, v in BAD_SPECS])
def test_spec_invalid(overrides, field, value):
    kw = dict(name="bad", num_experts=8, d_model=64, d_ff=128, top_k=2)
    kw.update(overrides)
    with pytest.raises(InvalidArgument) as ei:
        ExpertLayerSpec(**kw).validate()
    err = ei.value
    assert isinstance(err, ShoalError)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.message, f"message does not name {field!r}: {err.message!r}"
    if value is not None:
        assert value in err.message, f"message does not name value {value!r}: {err.message!r}"
    else:  # shared_gate without a shared expert: must mention the missing shared_d_ff
        assert "shared_d_ff" in err.message, err.message


# ======================================================================== route

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_route_matches_reference(variant, dtype, T):
    spec = make_spec(variant, dtype)
    ref32, ref16, _ = make_refs(variant)
    ref = ref32 if dtype == "float32" else ref16
    x = (make_hidden(T, seed=T) if dtype == "float32" else firm_hidden(ref16, T, seed=T)) \
        .to(TORCH_DTYPE[dtype])
    bias = getattr(ref, "e_score_correction_bias", None)
    with torch.no_grad():
        ids_r, w_r, margin = ref.route(x)
        ids, w = route(spec, ref.gate_weight.detach(), x, bias=bias)
    assert ids.dtype == torch.int64 and ids.shape == (T, spec.top_k)
    assert w.dtype == torch.float32 and w.shape == (T, spec.top_k)
    ids_r, w_r = sorted_routing(ids_r, w_r)
    ids, w = sorted_routing(ids, w)
    if dtype == "float32":
        assert torch.equal(ids, ids_r), (
            f"{variant}: expert sets differ on {(ids != ids_r).any(-1).sum().item()} of {T} tokens")
        torch.testing.assert_close(w, w_r, rtol=1e-5, atol=1e-6)
    else:                                    # every token: the input has no near tie
        assert (margin > FIRM_MARGIN).all()
        assert torch.equal(ids, ids_r), (
            f"{variant} bf16: expert sets differ on {(ids != ids_r).any(-1).sum().item()} of "
            f"{T} tokens")
        torch.testing.assert_close(w, w_r, rtol=BF16_TOL,
                                   atol=BF16_TOL * spec.routed_scaling_factor)


# ======================================================================== moe_forward_local

@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_forward_matches_reference(variant, dtype, T):
    spec = make_spec(variant, dtype)
    ref32, ref16, ref32r = make_refs(variant)
    x = make_hidden(T, seed=10_000 + T)
    if dtype == "float32":
        with torch.no_grad():
            want = ref32(x)
            got = moe_forward_local(spec, lib_weights(ref32), x)
        assert got.dtype == torch.float32 and got.shape == (T, D_MODEL)
        torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL)
        return
    x16 = firm_hidden(ref16, T, seed=10_000 + T).to(torch.bfloat16)
    with torch.no_grad():
        got = moe_forward_local(spec, lib_weights(ref16), x16)
        want16 = ref16(x16)
        want32 = ref32r(x16.float())
        assert (ref16.route(x16)[2] > FIRM_MARGIN).all()
    assert got.dtype == torch.bfloat16 and got.shape == (T, D_MODEL)
    assert_bf16_close(got, want16, f"{variant} bf16 T={T}", min_rows=T)
    assert_not_worse(got, want16, want32, f"{variant} bf16 T={T}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_near_ties_follow_the_librarys_own_routing(variant):
    """Drawn inputs have near ties (a 1-ulp logit error could flip the k-th choice): there the
    output must be the bf16 block under the library's own routing."""
    T = 4096
    spec = make_spec(variant, "bfloat16")
    _, ref16, _ = make_refs(variant)
    x16 = make_hidden(T, seed=10_000 + T).to(torch.bfloat16)
    bias = getattr(ref16, "e_score_correction_bias", None)
    with torch.no_grad():
        near = ref16.route(x16)[2] <= FIRM_MARGIN
        got = moe_forward_local(spec, lib_weights(ref16), x16)
        ids, w = route(spec, ref16.gate_weight.detach(), x16, bias=bias)
        alt = ref16(x16, ids, w)
    assert_bf16_close(got[near], alt[near], f"{variant} bf16 near-tie tokens", min_rows=10)


def _starve_low_experts(ref: nn.Module) -> nn.Module:
    """A copy whose gate never picks experts 0..3 for hidden with hidden[:, 0] = 3."""
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        ref.gate_weight[:4, 0] = -20.0
        ref.gate_weight[4:, 0] = 1.0
    return ref


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", (1, 7, 513))
def test_forward_with_idle_experts(variant, dtype, T):
    spec = make_spec(variant, dtype)
    ref32, ref16, ref32r = make_refs(variant)
    tdt = TORCH_DTYPE[dtype]
    ref = _starve_low_experts(ref32 if dtype == "float32" else ref16)

    def prep(x):
        x[:, 0] = 3.0

    if dtype == "float32":
        x = make_hidden(T, seed=20_000 + T)
        prep(x)
    else:
        x = firm_hidden(ref, T, seed=20_000 + T, prep=prep)
    x = x.to(tdt)
    bias = getattr(ref, "e_score_correction_bias", None)
    with torch.no_grad():
        ids_r, _, _ = ref.route(x)
        assert (ids_r >= 4).all()                            # the case is what it claims
        ids, _ = route(spec, ref.gate_weight.detach(), x, bias=bias)
        _, counts = dispatch(ids, E)
        want = ref(x)
        got = moe_forward_local(spec, lib_weights(ref), x)
    assert (counts[:4] == 0).all() and counts.sum().item() == T * spec.top_k
    assert got.dtype == tdt and got.shape == (T, D_MODEL)
    if dtype == "float32":
        torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL)
    else:
        with torch.no_grad():
            assert (ref.route(x)[2] > FIRM_MARGIN).all()
        assert_bf16_close(got, want, f"{variant} bf16 idle experts T={T}", min_rows=T)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("routing", ("reference", "random"))
def test_forward_precomputed_routing(variant, dtype, routing):
    """moe_forward_local(..., expert_ids=, expert_weights=) uses the given routing as is."""
    T = 513
    spec = make_spec(variant, dtype)
    ref32, ref16, ref32r = make_refs(variant)
    x = make_hidden(T, seed=30_000)
    with torch.no_grad():
        if routing == "reference":
            ids, w, _ = ref32.route(x)
        else:
            ids, w = random_routing(T, spec.top_k, E, seed=31)
        if dtype == "float32":
            want = ref32(x, ids, w)
            got = moe_forward_local(spec, lib_weights(ref32), x, expert_ids=ids,
                                    expert_weights=w)
            torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL)
            return
        x16 = x.to(torch.bfloat16)
        got = moe_forward_local(spec, lib_weights(ref16), x16, expert_ids=ids, expert_weights=w)
        want16 = ref16(x16, ids, w)
        want32 = ref32r(x16.float(), ids, w)
    assert got.dtype == torch.bfloat16 and got.shape == (T, D_MODEL)
    assert_bf16_close(got, want16, f"{variant} bf16 {routing} routing")
    assert_not_worse(got, want16, want32, f"{variant} bf16 {routing} routing")


def test_deepseek_masked_groups_never_chosen():
    """With negative biased scores in the kept groups, experts of masked groups must still never
    be chosen: DeepSeek inference/model.py masks with -inf
    (`scores.masked_fill_(mask.unsqueeze(-1), float("-inf"))`). HF's get_topk_indices fills 0.0,
    which would pick a masked expert here."""
    T = 257
    spec = ExpertLayerSpec(name="ds_mask", num_experts=E, d_model=D_MODEL, d_ff=D_FF, top_k=3,
                           gating="sigmoid_group", norm_topk_prob=True, n_group=4, topk_group=2,
                           routed_scaling_factor=2.5, shared_d_ff=D_FF)
    spec.validate()
    ref = RefDeepseekV3(D_MODEL, D_FF, E, 3, 4, 2, 2.5, 1, True)
    gen = torch.Generator().manual_seed(77)
    _init_(ref, gen)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, D_MODEL, generator=gen) / math.sqrt(D_MODEL))
    # Groups 0 and 1 always win (group score >= 1.05 > 0.8); inside them experts 1 and 3 have
    # biased scores sigmoid - 0.95, negative unless the logit exceeds ~2.9.
    ref.e_score_correction_bias = torch.tensor([2.0, -0.95, 2.0, -0.95, -0.6, -0.6, -0.6, -0.6])
    x = make_hidden(T, seed=40_000)
    with torch.no_grad():
        ids_r, w_r, _ = ref.route(x)
        assert (ids_r < 4).all()
        ids, w = route(spec, ref.weight.detach(), x, bias=ref.e_score_correction_bias)
        want = ref(x)
        got = moe_forward_local(spec, lib_weights(ref), x)
    ids_r, w_r = sorted_routing(ids_r, w_r)
    ids, w = sorted_routing(ids, w)
    assert (ids < 4).all(), f"masked-group experts chosen on {(ids >= 4).any(-1).sum()} tokens"
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(w, w_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_deepseek_weights_are_unbiased_scores():
    """Weights are the sigmoid scores at the chosen experts, not scores + bias (both
    DeepseekV3TopkRouter `scores.gather(1, topk_indices)` and Gate `original_scores.gather`)."""
    spec = make_spec("deepseek_v3_nonorm", "float32")
    ref32, _, _ = make_refs("deepseek_v3_nonorm")
    x = make_hidden(64, seed=50_000)
    bias = ref32.e_score_correction_bias
    with torch.no_grad():
        ids, w = route(spec, ref32.weight.detach(), x, bias=bias)
        scores = (x @ ref32.weight.T).float().sigmoid()
    torch.testing.assert_close(w, 2.5 * scores.gather(1, ids), rtol=1e-5, atol=1e-6)


# ======================================================================== dispatch / ffn / combine

@pytest.mark.parametrize("T,k,num_experts", [(1, 1, 4), (7, 2, 8), (513, 3, 8), (4096, 2, 16)])
def test_dispatch_order_and_counts(T, k, num_experts):
    ids, _ = random_routing(T, k, num_experts, seed=T * 31 + k)
    order, counts = dispatch(ids, num_experts)
    assert order.dtype == torch.int64 and order.shape == (T * k,)
    assert counts.dtype == torch.int64 and counts.shape == (num_experts,)
    flat = ids.flatten()
    assert torch.equal(counts, torch.bincount(flat, minlength=num_experts))
    assert torch.equal(order, torch.sort(flat, stable=True).indices)  # grouped by expert, stable
    assert torch.equal(flat[order], flat.sort().values)


@pytest.mark.parametrize("T,k,num_experts", [(1, 1, 4), (7, 2, 8), (513, 3, 8), (4096, 2, 16)])
def test_dispatch_combine_round_trip(T, k, num_experts):
    """Identity experts: combine gives back sum_j w[t, j] * x[t]; an expert that scales by
    (1 + its id) checks that each row goes back to its own token and choice."""
    g = torch.Generator().manual_seed(T + k)
    x = torch.randn(T, D_MODEL, generator=g)
    ids, w = random_routing(T, k, num_experts, seed=T * 7 + k)
    order, counts = dispatch(ids, num_experts)
    x_sorted = x[order // k]
    got = combine(x_sorted, order, w, T)
    torch.testing.assert_close(got, w.sum(-1, keepdim=True) * x, rtol=1e-6, atol=1e-6)
    scale = (1.0 + ids.flatten()[order].float()).unsqueeze(-1)
    got = combine(x_sorted * scale, order, w, T)
    want = (w * (1.0 + ids.float())).sum(-1, keepdim=True) * x
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("activation", ("silu_gated", "gelu"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_ffn_groups(activation, dtype):
    """Rows grouped by expert (some groups empty), each group through its own expert."""
    e_local = 5
    counts = torch.tensor([3, 0, 17, 1, 0], dtype=torch.int64)
    tdt = TORCH_DTYPE[dtype]
    spec = ExpertLayerSpec(name="ffn", num_experts=E, d_model=D_MODEL, d_ff=D_FF, top_k=2,
                           activation=activation, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    mlp = GatedMLP if activation == "silu_gated" else GeluMLP
    experts = nn.ModuleList([mlp(D_MODEL, D_FF) for _ in range(e_local)])
    _init_(experts, gen)
    experts = experts.to(tdt)
    x = torch.randn(int(counts.sum()), D_MODEL, generator=gen).to(tdt)
    w1 = torch.stack([e.w1.weight.detach() for e in experts])
    w2 = torch.stack([e.w2.weight.detach() for e in experts])
    w3 = None if activation == "gelu" else torch.stack([e.w3.weight.detach() for e in experts])
    with torch.no_grad():
        got = expert_ffn(spec, w1, w2, w3, x, counts)
        bounds = [0] + torch.cumsum(counts, 0).tolist()
        want = torch.cat([experts[e](x[bounds[e]:bounds[e + 1]]) for e in range(e_local)])
    assert got.dtype == tdt and got.shape == x.shape
    if dtype == "float32":
        torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL)
    else:
        assert_bf16_close(got, want, f"expert_ffn {activation} bf16")
