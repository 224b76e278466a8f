"""Expert-layer specs and weights: what one MoE layer is, validated with clear errors.

A layer has ``num_experts`` FFN experts of shape ``d_model -> d_ff -> d_model`` and a gate that
sends each token to ``top_k`` of them. Activations: ``silu_gated`` (``w2(silu(w1 x) * w3 x)``,
Mixtral / Qwen / DeepSeek) or ``gelu`` (``w2(gelu(w1 x))``, non-gated). Gating variants:

* ``softmax_renorm`` — softmax over the experts, top-k, weights renormalised to sum 1 (Mixtral);
* ``softmax`` — softmax, top-k, renormalised only with ``norm_topk_prob`` (Qwen2-MoE, whose
  default is not to);
* ``sigmoid_group`` — sigmoid scores; experts chosen by score + a per-expert correction bias,
  within the ``topk_group`` best of ``n_group`` groups (a group's score: the sum of its two best);
  weights are the unbiased scores, renormalised with ``norm_topk_prob``, times
  ``routed_scaling_factor`` (DeepSeek-V3).

Shared experts, which every token visits, are one fused gated MLP of ``shared_d_ff`` (DeepSeek:
``moe_intermediate_size * n_shared_experts``), added to the routed output, optionally scaled by
``sigmoid(x @ shared_gate.T)`` (Qwen2-MoE's ``shared_expert_gate``).

Weights use ``nn.Linear`` layout ``[out, in]``: ``w1`` = gate_proj (or fc1), ``w3`` = up_proj,
``w2`` = down_proj, stacked over the experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.errors import InvalidArgument

if TYPE_CHECKING:        # torch is imported where used: the coordinator reads specs only
    import torch

ACTIVATIONS = ("silu_gated", "gelu")
GATINGS = ("softmax_renorm", "softmax", "sigmoid_group")
DTYPES = {"float32": 4, "bfloat16": 2}        # bytes per element
MAX_EXPERTS = 4096


@dataclass(frozen=True)
class ExpertLayerSpec:
    name: str
    num_experts: int
    d_model: int
    d_ff: int
    top_k: int
    activation: str = "silu_gated"
    gating: str = "softmax_renorm"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_d_ff: int = 0
    shared_gate: bool = False
    dtype: str = "float32"

    @property
    def gated(self) -> bool:
        return self.activation == "silu_gated"

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch
        return getattr(torch, self.dtype)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights."""
        return (3 if self.gated else 2) * self.d_model * self.d_ff * DTYPES[self.dtype]

    def validate(self) -> "ExpertLayerSpec":
        """``self`` if consistent, else InvalidArgument naming the field, value and limit."""
        where = f"expert layer {self.name!r}"
        if not self.name:
            raise InvalidArgument("name: an expert layer needs a name")
        for field in ("num_experts", "d_model", "d_ff"):
            if getattr(self, field) < 1:
                raise InvalidArgument(f"{field}: {getattr(self, field)} must be >= 1 ({where})")
        if self.num_experts > MAX_EXPERTS:
            raise InvalidArgument(f"num_experts: {self.num_experts} exceeds the limit of "
                                  f"{MAX_EXPERTS} ({where})")
        if not 1 <= self.top_k <= self.num_experts:
            raise InvalidArgument(f"top_k: {self.top_k} must be in [1, num_experts="
                                  f"{self.num_experts}] ({where})")
        for field, allowed in (("activation", ACTIVATIONS), ("gating", GATINGS),
                               ("dtype", tuple(DTYPES))):
            if getattr(self, field) not in allowed:
                raise InvalidArgument(f"{field}: {getattr(self, field)!r} is not one of "
                                      f"{', '.join(allowed)} ({where})")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise InvalidArgument(f"n_group: {self.n_group} must divide num_experts="
                                  f"{self.num_experts} ({where})")
        if not 1 <= self.topk_group <= self.n_group:
            raise InvalidArgument(f"topk_group: {self.topk_group} must be in [1, n_group="
                                  f"{self.n_group}] ({where})")
        if self.n_group > 1 and self.gating != "sigmoid_group":
            raise InvalidArgument(f"n_group: {self.n_group} groups need gating "
                                  f"'sigmoid_group', not {self.gating!r} ({where})")
        if self.gating == "sigmoid_group":
            per_group = self.num_experts // self.n_group
            if per_group < 2 and self.n_group > 1:
                raise InvalidArgument(f"n_group: {self.n_group} groups of {per_group} expert; "
                                      f"a group's score needs at least 2 ({where})")
            if self.top_k > self.topk_group * per_group:
                raise InvalidArgument(f"top_k: {self.top_k} exceeds the {self.topk_group} "
                                      f"groups of {per_group} experts kept ({where})")
        if not self.routed_scaling_factor > 0:
            raise InvalidArgument(f"routed_scaling_factor: {self.routed_scaling_factor} must "
                                  f"be > 0 ({where})")
        if self.shared_d_ff < 0:
            raise InvalidArgument(f"shared_d_ff: {self.shared_d_ff} must be >= 0 ({where})")
        if self.shared_gate and not self.shared_d_ff:
            raise InvalidArgument(f"shared_gate: set, but shared_d_ff is 0 (no shared expert "
                                  f"to gate) ({where})")
        return self

    FIELDS = ("name", "num_experts", "d_model", "d_ff", "top_k", "activation", "gating",
              "norm_topk_prob", "n_group", "topk_group", "routed_scaling_factor", "shared_d_ff",
              "shared_gate", "dtype")

    def to_proto(self, table: str):
        """The wire form (``pb.ExpertLayer``), naming the table of its routed experts."""
        from shoal.proto import shoal_pb2 as pb
        return pb.ExpertLayer(table=table, **{f: getattr(self, f) for f in self.FIELDS})

    @classmethod
    def from_proto(cls, m) -> "ExpertLayerSpec":
        """From ``pb.ExpertLayer`` (unset strings and counts take the defaults)."""
        d = cls.__dataclass_fields__
        kw = {f: getattr(m, f) for f in cls.FIELDS}
        for f in ("activation", "gating", "dtype", "n_group", "topk_group",
                  "routed_scaling_factor"):
            if not kw[f]:
                kw[f] = d[f].default
        return cls(**kw)


@dataclass
class ExpertLayerWeights:
    """One layer's tensors, ``nn.Linear`` layout, in the spec's dtype (``bias`` float32)."""
    gate: torch.Tensor                      # [E, d_model]
    w1: torch.Tensor                        # [E, d_ff, d_model]  gate_proj (or fc1)
    w2: torch.Tensor                        # [E, d_model, d_ff]  down_proj
    w3: torch.Tensor | None = None          # [E, d_ff, d_model]  up_proj (gated only)
    bias: torch.Tensor | None = None        # [E] score correction (sigmoid_group)
    shared_w1: torch.Tensor | None = None   # [shared_d_ff, d_model]
    shared_w3: torch.Tensor | None = None   # [shared_d_ff, d_model]
    shared_w2: torch.Tensor | None = None   # [d_model, shared_d_ff]
    shared_gate: torch.Tensor | None = None  # [1, d_model]

    DENSE = ("gate", "bias", "shared_w1", "shared_w3", "shared_w2", "shared_gate")

    def dense(self, spec: ExpertLayerSpec) -> dict[str, torch.Tensor]:
        """The tensors the router keeps (all but the routed experts), as dense parameters of
        the model version: ``moe.<layer>.<field>``."""
        return {dense_name(spec.name, f): getattr(self, f) for f in self.DENSE
                if getattr(self, f) is not None}

    @classmethod
    def from_dense(cls, spec: ExpertLayerSpec, params: dict) -> "ExpertLayerWeights":
        """The router's part of a layer (routed experts left empty) from a version's dense
        parameters, in the layer's dtype; a missing tensor is reported by ``check_dense``."""
        kw = {f: params.get(dense_name(spec.name, f)) for f in cls.DENSE}
        for f, t in kw.items():                     # stored as float32 (bf16 exactly)
            if t is not None and f != "bias":
                kw[f] = t.to(spec.torch_dtype)
        import torch
        empty = torch.empty(0)
        return cls(w1=empty, w2=empty, **kw)

    def check_dense(self, spec: ExpertLayerSpec) -> "ExpertLayerWeights":
        """As ``check``, for the dense part only (the routed experts live on the servers)."""
        import torch
        E = spec.num_experts
        shell = ExpertLayerWeights(
            gate=self.gate if self.gate is not None else torch.empty(0),
            w1=torch.empty(E, spec.d_ff, spec.d_model, device="meta"),
            w2=torch.empty(E, spec.d_model, spec.d_ff, device="meta"),
            w3=torch.empty(E, spec.d_ff, spec.d_model, device="meta") if spec.gated else None,
            **{f: getattr(self, f) for f in self.DENSE if f != "gate"})
        if self.gate is None:
            raise InvalidArgument(f"gate: missing for layer {spec.name!r} (dense parameter "
                                  f"{dense_name(spec.name, 'gate')!r})")
        shell.check(spec)
        return self

    def check(self, spec: ExpertLayerSpec) -> "ExpertLayerWeights":
        """``self`` if every tensor has the spec's shape, else InvalidArgument naming it."""
        E, d, f, s = spec.num_experts, spec.d_model, spec.d_ff, spec.shared_d_ff
        want = {"gate": (E, d), "w1": (E, f, d), "w2": (E, d, f),
                "w3": (E, f, d) if spec.gated else None,
                "bias": (E,) if spec.gating == "sigmoid_group" else None,
                "shared_w1": (s, d) if s else None,
                "shared_w3": (s, d) if s and spec.gated else None,
                "shared_w2": (d, s) if s else None,
                "shared_gate": (1, d) if spec.shared_gate else None}
        for field, shape in want.items():
            t = getattr(self, field)
            if shape is None:
                if t is not None and field != "bias":
                    raise InvalidArgument(f"{field}: given, but layer {spec.name!r} "
                                          f"({spec.activation}, shared_d_ff {s}) has none")
                continue
            if t is None:
                if field == "bias":          # optional: no correction
                    continue
                raise InvalidArgument(f"{field}: missing for layer {spec.name!r}, expected "
                                      f"shape {list(shape)}")
            if tuple(t.shape) != shape:
                raise InvalidArgument(f"{field}: shape {list(t.shape)} must be {list(shape)} "
                                      f"for layer {spec.name!r}")
        return self


def dense_name(layer: str, field: str) -> str:
    """The dense parameter holding ``field`` of expert layer ``layer``."""
    return f"moe.{layer}.{field}"
