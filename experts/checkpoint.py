"""MoE layers in Hugging Face checkpoints: safetensors shards (with
``model.safetensors.index.json``) and the ``config.json`` beside them, in the Mixtral, Qwen2-MoE
and DeepSeek-V3 layouts. ``moe_layers`` finds every MoE layer and its spec (gating
hyper-parameters from the config) and lists the layers that are not MoE; ``read_expert`` reads
one expert's weights, so a loader can stream a layer expert by expert; ``read_layer`` stacks a
whole layer (for tests and small models).

Key layouts (``P`` = ``model.layers.{i}.``):

* Mixtral: ``P block_sparse_moe.gate.weight``, ``P block_sparse_moe.experts.{e}.w1/w2/w3.weight``
  (w1 gate_proj, w3 up_proj, w2 down_proj); softmax, top-k, renormalised.
* Qwen2-MoE: ``P mlp.gate.weight``, ``P mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``,
  ``P mlp.shared_expert.*``, ``P mlp.shared_expert_gate.weight``; softmax top-k, renormalised
  only with ``norm_topk_prob``; layers in ``mlp_only_layers`` or off ``decoder_sparse_step`` are
  dense.
* Qwen3-MoE: as Qwen2-MoE without the shared expert.
* OLMoE: ``P mlp.gate.weight``, ``P mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``;
  softmax top-k, renormalised only with ``norm_topk_prob``; every layer MoE.
* DeepSeek-V3: ``P mlp.gate.weight``, ``P mlp.gate.e_score_correction_bias``,
  ``P mlp.experts.{e}.*``, ``P mlp.shared_experts.*``; sigmoid scores, group-limited top-k,
  ``routed_scaling_factor``; the first ``first_k_dense_replace`` layers are dense, and of the
  rest those off ``moe_layer_freq``.

Which layers are MoE comes from the config's own fields (``first_k_dense_replace`` /
``moe_layer_freq``, ``mlp_only_layers`` / ``decoder_sparse_step``), as the model's code reads
them, and is checked against the tensors present: a layer the config makes MoE without a gate
tensor, or one it makes dense with one, is an error naming the field and the layer.

FP8 checkpoints (DeepSeek-V3/R1 as published: ``quantization_config`` ``{"quant_method":
"fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}``, each quantised ``weight`` in
``float8_e4m3fn`` beside a float32 ``weight_scale_inv`` per 128 x 128 block) are dequantised
as read (``weight * weight_scale_inv``, block by block, in float32) into the layer's serving
dtype, bfloat16 by default.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import grpc
import torch

from embeddings.checkpoint import CheckpointError, CheckpointReader
from experts.specs import ExpertLayerSpec, ExpertLayerWeights


@dataclass(frozen=True)
class Layout:
    moe: str                      # the MoE block under "model.layers.{i}."
    gate: str                     # its router weight
    experts: str                  # expert e's prefix, "{e}" in it
    proj: tuple[str, str, str]    # (w1 gate_proj, w3 up_proj, w2 down_proj) names in an expert
    shared: str = ""              # the shared expert(s)' prefix
    shared_gate: str = ""
    bias: str = ""                # e_score_correction_bias


LAYOUTS = {
    "mixtral": Layout("block_sparse_moe", "gate.weight", "experts.{e}", ("w1", "w3", "w2")),
    "qwen2_moe": Layout("mlp", "gate.weight", "experts.{e}",
                        ("gate_proj", "up_proj", "down_proj"), shared="shared_expert",
                        shared_gate="shared_expert_gate.weight"),
    "qwen3_moe": Layout("mlp", "gate.weight", "experts.{e}",
                        ("gate_proj", "up_proj", "down_proj")),
    "olmoe": Layout("mlp", "gate.weight", "experts.{e}", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": Layout("mlp", "gate.weight", "experts.{e}",
                          ("gate_proj", "up_proj", "down_proj"), shared="shared_experts",
                          bias="gate.e_score_correction_bias"),
}
ACTIVATIONS = ("silu",)           # config hidden_act values Shoal's gated experts compute
FP8_BLOCK = (128, 128)


@dataclass(frozen=True)
class MoeLayer:
    spec: ExpertLayerSpec
    prefix: str                   # "model.layers.{i}.<moe>."
    layout: Layout


def read_config(path: str) -> dict:
    """The ``config.json`` beside (or in) the checkpoint at ``path``."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    f = os.path.join(folder, "config.json")
    try:
        with open(f, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json beside the checkpoint; an MoE "
                              "checkpoint needs one for its gating hyper-parameters",
                              grpc.StatusCode.INVALID_ARGUMENT) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable JSON config: {e}",
                              grpc.StatusCode.INVALID_ARGUMENT) from None


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise CheckpointError(f"{where}: config.json has no {key!r}",
                              grpc.StatusCode.INVALID_ARGUMENT)
    return cfg[key]


def moe_layers(cfg: dict, infos: dict, where: str = "config.json",
               dtype: str | None = None) -> tuple[list[MoeLayer], list[str]]:
    """(the MoE layers, the layers that are not MoE) of a checkpoint with tensors ``infos``
    (``CheckpointReader.tensors()``) and config ``cfg``. ``dtype``: the specs' dtype; default
    bfloat16 if the experts are stored so, else float32."""
    kind = cfg.get("model_type", "")
    if kind not in LAYOUTS:
        raise CheckpointError(f"{where}: model_type {kind!r} is not an MoE layout Shoal reads "
                              f"({', '.join(LAYOUTS)})", grpc.StatusCode.INVALID_ARGUMENT)
    act = cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {act!r}; Shoal's {kind} experts compute "
                              f"{', '.join(ACTIVATIONS)} (gated)",
                              grpc.StatusCode.INVALID_ARGUMENT)
    check_quantization(cfg, where)
    lay = LAYOUTS[kind]
    n_layers = int(_need(cfg, "num_hidden_layers", where))
    d_model = int(_need(cfg, "hidden_size", where))
    if kind == "mixtral":
        common = dict(num_experts=_need(cfg, "num_local_experts", where),
                      d_ff=_need(cfg, "intermediate_size", where), gating="softmax_renorm")
    elif kind in ("qwen2_moe", "qwen3_moe", "olmoe"):
        shared = int(cfg.get("shared_expert_intermediate_size", 0)) if kind == "qwen2_moe" else 0
        d_ff_key = "intermediate_size" if kind == "olmoe" else "moe_intermediate_size"
        common = dict(num_experts=_need(cfg, "num_experts", where),
                      d_ff=_need(cfg, d_ff_key, where), gating="softmax",
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                      shared_d_ff=shared, shared_gate=bool(shared))
    else:
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise CheckpointError(f"{where}: scoring_func {cfg['scoring_func']!r}; Shoal's "
                                  "DeepSeek-V3 gate scores with sigmoid",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        d_ff = int(_need(cfg, "moe_intermediate_size", where))
        common = dict(num_experts=_need(cfg, "n_routed_experts", where), d_ff=d_ff,
                      gating="sigmoid_group", norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                      n_group=int(cfg.get("n_group", 1)), topk_group=int(cfg.get("topk_group", 1)),
                      routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
                      shared_d_ff=d_ff * int(cfg.get("n_shared_experts", 0) or 0))
    top_k = int(_need(cfg, "num_experts_per_tok", where))
    is_moe, fields = moe_layer_rule(kind, cfg, where)
    layers, skipped = [], []
    for i in range(n_layers):
        prefix = f"model.layers.{i}.{lay.moe}."
        has_gate = prefix + lay.gate in infos
        if is_moe(i) != has_gate:
            raise CheckpointError(
                f"{where}: layer {i}: config.json's {fields} make it "
                + (f"an MoE layer, but the checkpoint has no {prefix + lay.gate!r}" if is_moe(i)
                   else f"a dense layer, but the checkpoint has {prefix + lay.gate!r}"),
                grpc.StatusCode.INVALID_ARGUMENT)
        if not has_gate:
            skipped.append(f"model.layers.{i}")
            continue
        w1 = prefix + lay.experts.format(e=0) + f".{lay.proj[0]}.weight"
        stored = infos[w1].dtype if w1 in infos else torch.float32
        spec = ExpertLayerSpec(name=f"layers.{i}", d_model=d_model, top_k=top_k,
                               dtype=dtype or ("bfloat16" if stored in (torch.bfloat16,
                                                                        torch.float8_e4m3fn)
                                               else "float32"), **common)
        try:
            spec.validate()
        except Exception as e:
            raise CheckpointError(f"{where}: layer {i}: {e}",
                                  grpc.StatusCode.INVALID_ARGUMENT) from None
        layers.append(MoeLayer(spec, prefix, lay))
    return layers, skipped


def moe_layer_rule(kind: str, cfg: dict, where: str):
    """(``is_moe(i)``, the config fields it reads, as text) for ``kind``, as its model code
    decides which decoder layers are MoE."""
    def ints(key, default):
        v = cfg.get(key)
        v = default if v is None else v
        try:
            return [int(x) for x in v] if isinstance(v, list) else int(v)
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: {key} {v!r} is not an integer"
                                  + (" list" if isinstance(default, list) else ""),
                                  grpc.StatusCode.INVALID_ARGUMENT) from None
    if kind == "deepseek_v3":               # DeepseekV3Config's defaults: 3 and 1
        k, freq = ints("first_k_dense_replace", 3), ints("moe_layer_freq", 1)
        if freq < 1:
            raise CheckpointError(f"{where}: moe_layer_freq {freq} must be >= 1",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        return (lambda i: i >= k and i % freq == 0,
                f"first_k_dense_replace={k}, moe_layer_freq={freq}")
    if kind in ("qwen2_moe", "qwen3_moe"):
        only, step = set(ints("mlp_only_layers", [])), ints("decoder_sparse_step", 1)
        if step < 1:
            raise CheckpointError(f"{where}: decoder_sparse_step {step} must be >= 1",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        n = ints("num_experts", 0)
        return (lambda i: i not in only and n > 0 and (i + 1) % step == 0,
                f"mlp_only_layers={sorted(only)}, decoder_sparse_step={step}")
    return (lambda i: True), f"model_type={kind!r} (every layer MoE)"


def check_quantization(cfg: dict, where: str) -> None:
    """Only unquantised checkpoints and DeepSeek's FP8 block quantisation are read."""
    q = cfg.get("quantization_config")
    if not q:
        return
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: quantization_config {q!r} is not an object",
                              grpc.StatusCode.INVALID_ARGUMENT)
    method = q.get("quant_method")
    block = list(q.get("weight_block_size") or [])
    if method != "fp8" or q.get("fmt", "e4m3") != "e4m3" or block != list(FP8_BLOCK):
        raise CheckpointError(
            f"{where}: quantization_config {json.dumps(q, sort_keys=True)}: Shoal reads "
            "unquantised checkpoints and FP8 block quantisation (quant_method 'fp8', fmt "
            f"'e4m3', weight_block_size {list(FP8_BLOCK)}, as DeepSeek-V3/R1 publish)",
            grpc.StatusCode.INVALID_ARGUMENT)


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, key: str) -> torch.Tensor:
    """float32 ``w * scale_inv``, each ``scale_inv[i, j]`` applied to its 128 x 128 block."""
    bo, bi = FP8_BLOCK
    rows, cols = w.shape
    want = (-(-rows // bo), -(-cols // bi))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"tensor {key + '_scale_inv'!r} has shape "
                              f"{list(scale_inv.shape)}; a {list(w.shape)} weight in "
                              f"{bo}x{bi} blocks needs {list(want)}",
                              grpc.StatusCode.INVALID_ARGUMENT)
    s = scale_inv.float().repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
    return w.float() * s


def _read(reader: CheckpointReader, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    infos = reader.tensors()
    if key not in infos:
        raise CheckpointError(f"tensor {key!r} is missing from the checkpoint",
                              grpc.StatusCode.INVALID_ARGUMENT)
    if tuple(infos[key].shape) != tuple(shape):
        raise CheckpointError(f"{', '.join(infos[key].files)}: tensor {key!r} has shape "
                              f"{list(infos[key].shape)}, expected {list(shape)}",
                              grpc.StatusCode.INVALID_ARGUMENT)
    w = reader.read(key)
    if w.dtype == torch.float8_e4m3fn:
        scale = key + "_scale_inv"
        if scale not in infos:
            raise CheckpointError(f"tensor {key!r} is float8_e4m3fn but the checkpoint has no "
                                  f"{scale!r} to dequantise it with",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        w = dequantize_fp8(w, reader.read(scale), key)
    return w.to(dtype)


def read_expert(reader: CheckpointReader, layer: MoeLayer,
                e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(w1 [d_ff, d], w2 [d, d_ff], w3 [d_ff, d] or None) of expert ``e``: one expert in
    memory at a time."""
    s, lay = layer.spec, layer.layout
    base = layer.prefix + lay.experts.format(e=e) + "."
    w1 = _read(reader, f"{base}{lay.proj[0]}.weight", (s.d_ff, s.d_model), s.torch_dtype)
    w2 = _read(reader, f"{base}{lay.proj[2]}.weight", (s.d_model, s.d_ff), s.torch_dtype)
    w3 = _read(reader, f"{base}{lay.proj[1]}.weight", (s.d_ff, s.d_model), s.torch_dtype) \
        if s.gated else None
    return w1, w2, w3


def read_gate(reader: CheckpointReader, layer: MoeLayer) -> ExpertLayerWeights:
    """A layer's weights other than its routed experts (gate, bias, shared expert, its gate);
    the expert tensors are left empty ([0, ...]) for ``read_layer`` or a loader to fill."""
    s, lay, p = layer.spec, layer.layout, layer.prefix
    dt = s.torch_dtype
    w = ExpertLayerWeights(gate=_read(reader, p + lay.gate, (s.num_experts, s.d_model), dt),
                           w1=torch.empty(0), w2=torch.empty(0))
    if lay.bias and p + lay.bias in reader.tensors():
        w.bias = _read(reader, p + lay.bias, (s.num_experts,), torch.float32)
    if s.shared_d_ff:
        sh = f"{p}{lay.shared}."
        w.shared_w1 = _read(reader, f"{sh}{lay.proj[0]}.weight", (s.shared_d_ff, s.d_model), dt)
        w.shared_w3 = _read(reader, f"{sh}{lay.proj[1]}.weight", (s.shared_d_ff, s.d_model), dt)
        w.shared_w2 = _read(reader, f"{sh}{lay.proj[2]}.weight", (s.d_model, s.shared_d_ff), dt)
    if s.shared_gate:
        w.shared_gate = _read(reader, p + lay.shared_gate, (1, s.d_model), dt)
    return w


def read_layer(reader: CheckpointReader, layer: MoeLayer) -> ExpertLayerWeights:
    """Every weight of one layer, experts stacked (the whole layer in memory)."""
    w = read_gate(reader, layer)
    experts = [read_expert(reader, layer, e) for e in range(layer.spec.num_experts)]
    w.w1 = torch.stack([x[0] for x in experts])
    w.w2 = torch.stack([x[1] for x in experts])
    w.w3 = torch.stack([x[2] for x in experts]) if layer.spec.gated else None
    return w.check(layer.spec)
