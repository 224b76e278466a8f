"""MoE layers read from Hugging Face style checkpoints (safetensors shards in several files, an
index json, a config.json) in the Mixtral, Qwen2-MoE and DeepSeek-V3 layouts: the layers and
their gating hyper-parameters come from the config, dense layers are skipped and listed, every
tensor reads back exactly, and the block computed from them equals a per-token loop over the
raw tensors."""
from __future__ import annotations

import json
import zlib

import grpc
import pytest
import torch
import torch.nn.functional as F

from embeddings.checkpoint import CheckpointError, open_checkpoint
from experts.checkpoint import moe_layers, read_config, read_expert, read_layer
from experts.compute import moe_forward_local
from tests.ckpt_fixtures import write_safetensors_index

E, D, FF, SHARED, K = 8, 16, 24, 32, 2


def _expert(g, prefix, names, dtype, d_ff=FF):
    w1, w3, w2 = names
    return {f"{prefix}.{w1}.weight": (torch.randn(d_ff, D, generator=g) * 0.2).to(dtype),
            f"{prefix}.{w3}.weight": (torch.randn(d_ff, D, generator=g) * 0.2).to(dtype),
            f"{prefix}.{w2}.weight": (torch.randn(D, d_ff, generator=g) * 0.2).to(dtype)}


def make(kind: str, folder, dtype=torch.float32):
    """(config, tensors) of a 3-layer model of ``kind``; layer 0 is dense where the layout
    allows it. Written as 3 safetensors files and an index."""
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()) % 1000)   # hash() varies by run
    t: dict[str, torch.Tensor] = {}
    names = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    moe = "block_sparse_moe" if kind == "mixtral" else "mlp"
    cfg = {"model_type": kind, "num_hidden_layers": 3, "hidden_size": D,
           "num_experts_per_tok": K}
    if kind == "mixtral":
        cfg.update(num_local_experts=E, intermediate_size=FF)
        dense = []
    elif kind == "qwen2_moe":
        cfg.update(num_experts=E, moe_intermediate_size=FF, norm_topk_prob=False,
                   shared_expert_intermediate_size=SHARED, mlp_only_layers=[0])
        dense = [0]
    else:
        cfg.update(n_routed_experts=E, moe_intermediate_size=FF, n_shared_experts=2,
                   n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                   scoring_func="sigmoid", first_k_dense_replace=1)
        dense = [0]
    for i in range(3):
        p = f"model.layers.{i}"
        t[f"{p}.self_attn.q_proj.weight"] = torch.randn(D, D, generator=g).to(dtype)
        if i in dense:
            t.update(_expert(g, f"{p}.mlp", names, dtype))
            continue
        t[f"{p}.{moe}.gate.weight"] = torch.randn(E, D, generator=g).to(dtype)
        for e in range(E):
            t.update(_expert(g, f"{p}.{moe}.experts.{e}", names, dtype))
        if kind == "qwen2_moe":
            t.update(_expert(g, f"{p}.mlp.shared_expert", names, dtype, SHARED))
            t[f"{p}.mlp.shared_expert_gate.weight"] = torch.randn(1, D, generator=g).to(dtype)
        if kind == "deepseek_v3":
            t[f"{p}.mlp.gate.e_score_correction_bias"] = torch.rand(E, generator=g) * 0.1
            t.update(_expert(g, f"{p}.mlp.shared_experts", names, dtype, 2 * FF))
    keys = sorted(t)
    files = {f"model-0000{j + 1}-of-00003.safetensors": {k: t[k] for k in keys[j::3]}
             for j in range(3)}
    write_safetensors_index(str(folder), files)
    (folder / "config.json").write_text(json.dumps(cfg))
    return cfg, t


def naive(kind: str, t: dict, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The block, token by token, straight from the raw tensors (float32)."""
    moe = "block_sparse_moe" if kind == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    p = f"model.layers.{layer}.{moe}"
    f32 = {k: v.float() for k, v in t.items() if k.startswith(p)}

    def mlp(prefix, v):
        w1, w3, w2 = (f32[f"{prefix}.{n}.weight"] for n in names)
        return (F.silu(v @ w1.t()) * (v @ w3.t())) @ w2.t()

    out = torch.zeros_like(x)
    for i, v in enumerate(x):
        logits = v @ f32[f"{p}.gate.weight"].t()
        if kind == "deepseek_v3":
            s = torch.sigmoid(logits)
            choice = s + f32[f"{p}.gate.e_score_correction_bias"]
            groups = choice.view(4, -1)
            best = groups.topk(2, dim=-1).values.sum(-1).topk(2).indices.tolist()
            allowed = [e for e in range(E) if e // (E // 4) in best]
            ranked = sorted(allowed, key=lambda e: -float(choice[e]))[:K]
            w = torch.stack([s[e] for e in ranked])
            w = w / w.sum() * 2.5
        else:
            prob = logits.softmax(-1)
            ranked = prob.argsort(descending=True)[:K].tolist()
            w = prob[ranked]
            if kind == "mixtral":
                w = w / w.sum()
        for e, we in zip(ranked, w):
            out[i] += we * mlp(f"{p}.experts.{e}", v)
        if kind == "qwen2_moe":
            out[i] += torch.sigmoid(v @ f32[f"{p}.shared_expert_gate.weight"].t())[0] * \
                mlp(f"{p}.shared_expert", v)
        if kind == "deepseek_v3":
            out[i] += mlp(f"{p}.shared_experts", v)
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_layers_specs_tensors_and_outputs(kind, tmp_path):
    cfg, t = make(kind, tmp_path)
    with open_checkpoint(str(tmp_path)) as reader:
        layers, skipped = moe_layers(read_config(str(tmp_path)), reader.tensors())
        dense = 0 if kind == "mixtral" else 1
        assert [m.spec.name for m in layers] == [f"layers.{i}" for i in range(dense, 3)]
        assert skipped == [f"model.layers.{i}" for i in range(dense)]
        spec = layers[0].spec
        assert (spec.num_experts, spec.d_model, spec.d_ff, spec.top_k, spec.dtype) == \
            (E, D, FF, K, "float32")
        assert spec.gating == {"mixtral": "softmax_renorm", "qwen2_moe": "softmax",
                               "deepseek_v3": "sigmoid_group"}[kind]
        if kind == "qwen2_moe":
            assert (spec.shared_d_ff, spec.shared_gate, spec.norm_topk_prob) == \
                (SHARED, True, False)
        if kind == "deepseek_v3":
            assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor,
                    spec.shared_d_ff, spec.norm_topk_prob) == (4, 2, 2.5, 2 * FF, True)
        layer = layers[-1]
        w = read_layer(reader, layer)
        moe = "block_sparse_moe" if kind == "mixtral" else "mlp"
        down = "w2" if kind == "mixtral" else "down_proj"
        assert torch.equal(w.w2[5], t[f"model.layers.2.{moe}.experts.5.{down}.weight"])
        w1, w2, w3 = read_expert(reader, layer, 3)
        assert torch.equal(w1, w.w1[3]) and torch.equal(w2, w.w2[3]) and torch.equal(w3, w.w3[3])
        x = torch.randn(9, D, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(moe_forward_local(layer.spec, w, x), naive(kind, t, 2, x),
                                   rtol=1e-5, atol=1e-5)


def test_bfloat16_experts_and_clear_errors(tmp_path):
    cfg, t = make("mixtral", tmp_path, torch.bfloat16)
    with open_checkpoint(str(tmp_path)) as reader:
        (first, *_), _ = moe_layers(cfg, reader.tensors())
        assert first.spec.dtype == "bfloat16"
        w = read_layer(reader, first)
        assert w.w1.dtype == torch.bfloat16
        assert torch.equal(w.w1[0], t["model.layers.0.block_sparse_moe.experts.0.w1.weight"])
        with pytest.raises(CheckpointError) as e:
            moe_layers(dict(cfg, model_type="llama"), reader.tensors())
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'llama'" in e.value.message
        with pytest.raises(CheckpointError) as e:
            moe_layers(dict(cfg, num_experts_per_tok=9), reader.tensors())
        assert "top_k: 9" in e.value.message
        bad = {k: v for k, v in cfg.items() if k != "num_local_experts"}
        with pytest.raises(CheckpointError, match="num_local_experts"):
            moe_layers(bad, reader.tensors())
        with pytest.raises(CheckpointError, match="shape"):       # a d_ff the tensors lack
            (layer, *_), _ = moe_layers(dict(cfg, intermediate_size=FF + 1), reader.tensors())
            read_expert(reader, layer, 0)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(str(tmp_path))
