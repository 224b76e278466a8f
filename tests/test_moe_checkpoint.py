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
    elif kind == "qwen3_moe":         # Qwen3MoeConfig's field names; layer 1 off the step
        cfg.update(num_experts=E, moe_intermediate_size=FF, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[1], hidden_act="silu")
        dense = [1]
    elif kind == "olmoe":             # OlmoeConfig's: every layer MoE, intermediate_size
        cfg.update(num_experts=E, intermediate_size=FF, norm_topk_prob=False,
                   hidden_act="silu")
        dense = []
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
            if kind in ("mixtral", "qwen3_moe"):        # renormalised (qwen3: norm_topk_prob)
                w = w / w.sum()
        for e, we in zip(ranked, w):
            out[i] += we * mlp(f"{p}.experts.{e}", v)
        if kind == "qwen2_moe":
            out[i] += torch.sigmoid(v @ f32[f"{p}.shared_expert_gate.weight"].t())[0] * \
                mlp(f"{p}.shared_expert", v)
        if kind == "deepseek_v3":
            out[i] += mlp(f"{p}.shared_experts", v)
    return out


KINDS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
DENSE = {"mixtral": [], "olmoe": [], "qwen2_moe": [0], "qwen3_moe": [1], "deepseek_v3": [0]}


@pytest.mark.parametrize("kind", KINDS)
def test_layers_specs_tensors_and_outputs(kind, tmp_path):
    cfg, t = make(kind, tmp_path)
    with open_checkpoint(str(tmp_path)) as reader:
        layers, skipped = moe_layers(read_config(str(tmp_path)), reader.tensors())
        dense = DENSE[kind]
        assert [m.spec.name for m in layers] == [f"layers.{i}" for i in range(3)
                                                 if i not in dense]
        assert skipped == [f"model.layers.{i}" for i in dense]
        spec = layers[0].spec
        assert (spec.num_experts, spec.d_model, spec.d_ff, spec.top_k, spec.dtype) == \
            (E, D, FF, K, "float32")
        assert spec.gating == {"mixtral": "softmax_renorm", "qwen2_moe": "softmax",
                               "qwen3_moe": "softmax", "olmoe": "softmax",
                               "deepseek_v3": "sigmoid_group"}[kind]
        if kind in ("qwen3_moe", "olmoe"):
            assert (spec.shared_d_ff, spec.norm_topk_prob) == (0, kind == "qwen3_moe")
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


def test_config_fields_that_make_layers_dense_are_read_and_checked(tmp_path):
    """``first_k_dense_replace`` / ``moe_layer_freq`` (DeepSeek) and ``mlp_only_layers`` /
    ``decoder_sparse_step`` (Qwen) decide which layers are MoE, as the models' code reads
    them; a config that disagrees with the tensors is refused naming the field and layer."""
    for sub in ("ds", "q3", "ds2"):
        (tmp_path / sub).mkdir()
    cfg, _ = make("deepseek_v3", tmp_path / "ds")
    with open_checkpoint(str(tmp_path / "ds")) as reader:
        infos = reader.tensors()
        with pytest.raises(CheckpointError) as e:
            moe_layers(dict(cfg, first_k_dense_replace=0), infos)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "layer 0" in e.value.message and "first_k_dense_replace=0" in e.value.message
        assert "no 'model.layers.0.mlp.gate.weight'" in e.value.message
        with pytest.raises(CheckpointError, match=r"layer 1: .*moe_layer_freq=2.* a dense "
                                                  r"layer, but the checkpoint has"):
            moe_layers(dict(cfg, moe_layer_freq=2), infos)
        with pytest.raises(CheckpointError, match="moe_layer_freq 0 must be >= 1"):
            moe_layers(dict(cfg, moe_layer_freq=0), infos)
    cfg, _ = make("qwen3_moe", tmp_path / "q3")
    with open_checkpoint(str(tmp_path / "q3")) as reader:
        infos = reader.tensors()
        with pytest.raises(CheckpointError, match=r"layer 1: .*mlp_only_layers=\[\], "
                                                  r"decoder_sparse_step=1.* an MoE layer"):
            moe_layers(dict(cfg, mlp_only_layers=[]), infos)
        with pytest.raises(CheckpointError, match=r"layer 0: .*decoder_sparse_step=2"):
            moe_layers(dict(cfg, decoder_sparse_step=2, mlp_only_layers=[]), infos)
        for field, value, words in (("hidden_act", "gelu_new", "hidden_act 'gelu_new'"),
                                    ("model_type", "jamba", "model_type 'jamba'"),
                                    ("quantization_config", {"quant_method": "gptq", "bits": 4},
                                     "gptq")):
            with pytest.raises(CheckpointError) as e:
                moe_layers(dict(cfg, **{field: value}), infos)
            assert words in e.value.message and e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(CheckpointError, match="scoring_func 'softmax'"):
            moe_layers(dict(make("deepseek_v3", tmp_path / "ds2")[0], scoring_func="softmax"),
                       infos)


def _fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's block quantisation of a float32 weight: per 128 x 128 block, scale =
    amax / 448; stored ``(w / scale)`` in float8_e4m3fn and ``weight_scale_inv`` = scale."""
    rows, cols = w.shape
    nb_r, nb_c = -(-rows // 128), -(-cols // 128)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nb_r, nb_c)
    for i in range(nb_r):
        for j in range(nb_c):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / scale[i, j]).to(
                torch.float8_e4m3fn)
    return q, scale


def _fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The test's own dequantisation: a loop over blocks."""
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            out[sl] = q[sl].float() * scale[i, j]
    return out


def test_deepseek_v3_fp8_block_quantised_experts_are_dequantised(tmp_path):
    """A DeepSeek-V3-style checkpoint as published in FP8: experts and shared experts in
    float8_e4m3fn with ``weight_scale_inv`` per 128 x 128 block (d_model 256, d_ff 320: edge
    blocks are partial), the gate and bias unquantised, the published quantization_config.
    Read in float32, every weight equals the test's own block-by-block dequantisation; the
    layer (bfloat16 by default, float32 on request) equals the block computed from the
    dequantised weights; a missing scale is an error naming it."""
    d, ff, n_exp = 256, 320, 8
    g = torch.Generator().manual_seed(8)
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "hidden_size": d,
           "num_experts_per_tok": K, "n_routed_experts": n_exp, "moe_intermediate_size": ff,
           "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
           "norm_topk_prob": True, "scoring_func": "sigmoid", "first_k_dense_replace": 1,
           "moe_layer_freq": 1, "hidden_act": "silu",
           "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                   "quant_method": "fp8", "weight_block_size": [128, 128]}}
    t, deq = {}, {}

    def quantised(key, shape):
        q, s = _fp8_quantize(torch.randn(*shape, generator=g) * 0.05)
        t[key], t[key + "_scale_inv"] = q, s
        deq[key] = _fp8_dequantize(q, s)

    for i in range(2):
        p = f"model.layers.{i}.mlp"
        names = [f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj"]
        if i == 0:                                       # dense
            for n, shape in zip(names, [(4 * ff, d), (4 * ff, d), (d, 4 * ff)]):
                quantised(n + ".weight", shape)
            continue
        t[f"{p}.gate.weight"] = (torch.randn(n_exp, d, generator=g) * 0.1).to(torch.bfloat16)
        t[f"{p}.gate.e_score_correction_bias"] = torch.rand(n_exp, generator=g) * 0.1
        for e in [*(f"experts.{e}" for e in range(n_exp)), "shared_experts"]:
            for n, shape in (("gate_proj", (ff, d)), ("up_proj", (ff, d)),
                             ("down_proj", (d, ff))):
                quantised(f"{p}.{e}.{n}.weight", shape)
    keys = sorted(t)
    write_safetensors_index(str(tmp_path), {f"model-0000{j + 1}-of-00002.safetensors":
                                            {k: t[k] for k in keys[j::2]} for j in range(2)})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with open_checkpoint(str(tmp_path)) as reader:
        (layer16,), skipped = moe_layers(read_config(str(tmp_path)), reader.tensors())
        assert skipped == ["model.layers.0"] and layer16.spec.dtype == "bfloat16"
        (layer32,), _ = moe_layers(cfg, reader.tensors(), dtype="float32")
        w32 = read_layer(reader, layer32)
        p = "model.layers.1.mlp"
        for e in (0, 5):
            assert torch.equal(w32.w1[e], deq[f"{p}.experts.{e}.gate_proj.weight"])
            assert torch.equal(w32.w3[e], deq[f"{p}.experts.{e}.up_proj.weight"])
            assert torch.equal(w32.w2[e], deq[f"{p}.experts.{e}.down_proj.weight"])
        assert torch.equal(w32.shared_w2, deq[f"{p}.shared_experts.down_proj.weight"])
        assert torch.equal(w32.gate, t[f"{p}.gate.weight"].float())
        w16 = read_layer(reader, layer16)
        assert w16.w1.dtype == torch.bfloat16
        assert torch.equal(w16.w1[3], deq[f"{p}.experts.3.gate_proj.weight"].to(torch.bfloat16))
        # The block on the dequantised weights, token by token (as naive(), d = 256).
        x = torch.randn(6, d, generator=torch.Generator().manual_seed(2))
        f32 = dict(deq, **{k: v.float() for k, v in t.items() if "gate." in k})
        want = torch.zeros_like(x)

        def mlp(prefix, v):
            return (F.silu(v @ f32[f"{prefix}.gate_proj.weight"].t())
                    * (v @ f32[f"{prefix}.up_proj.weight"].t())) @ \
                f32[f"{prefix}.down_proj.weight"].t()
        for i, v in enumerate(x):
            s = torch.sigmoid(v @ f32[f"{p}.gate.weight"].t())
            choice = s + f32[f"{p}.gate.e_score_correction_bias"]
            best = choice.view(4, -1).topk(2, dim=-1).values.sum(-1).topk(2).indices.tolist()
            allowed = [e for e in range(n_exp) if e // (n_exp // 4) in best]
            ranked = sorted(allowed, key=lambda e: -float(choice[e]))[:K]
            wts = torch.stack([s[e] for e in ranked])
            wts = wts / wts.sum() * 2.5
            for e, we in zip(ranked, wts):
                want[i] += we * mlp(f"{p}.experts.{e}", v)
            want[i] += mlp(f"{p}.shared_experts", v)
        torch.testing.assert_close(moe_forward_local(layer32.spec, w32, x), want,
                                   rtol=1e-5, atol=1e-5)
        got16 = moe_forward_local(layer16.spec, w16, x.to(torch.bfloat16)).float()
        assert ((got16 - want).norm() / want.norm()).item() < 2e-2
    t.pop(f"{p}.experts.2.up_proj.weight_scale_inv")
    write_safetensors_index(str(tmp_path), {f"model-0000{j + 1}-of-00002.safetensors":
                                            {k: t[k] for k in keys[j::2] if k in t}
                                            for j in range(2)})
    with open_checkpoint(str(tmp_path)) as reader:
        (layer,), _ = moe_layers(cfg, reader.tensors())
        with pytest.raises(CheckpointError, match=r"experts.2.up_proj.weight_scale_inv"):
            read_layer(reader, layer)
