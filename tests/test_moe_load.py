"""``shoal load`` of Hugging Face MoE checkpoints (safetensors in 3 shard files, an index, a
config.json) in the Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 layouts, into a 3-server cluster: every
MoE layer is served by ``moe_forward`` with the outputs of a token-by-token block computed
straight from the raw tensors (``tests/test_moe_checkpoint.naive``), dense layers are skipped
and listed, every replica holds exactly the experts' rows, a bfloat16 checkpoint loads as
bfloat16 layers, a second load makes a new version, and a checkpoint whose shapes conflict with
the model's fails naming the layer, leaving nothing visible."""
from __future__ import annotations

import grpc
import pytest
import torch

import shoal
from embeddings.checkpoint import CheckpointError
from experts.layout import expert_row_ids, unpack_expert
from experts.specs import ExpertLayerSpec
from shoal.admin import server_checksums
from shoal.errors import ShoalError
from tests.test_moe_checkpoint import DENSE, D, E, FF, K, make, naive

KINDS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with shoal.LocalCluster(servers=3, replication=2,
                            data_dir=str(tmp_path_factory.mktemp("moeload"))) as c:
        client = c.client(timeout=120)
        yield c, client
        client.close()


@pytest.mark.parametrize("kind", KINDS)
def test_load_serves_each_layout_like_the_raw_tensors(cluster, kind, tmp_path):
    _, client = cluster
    cfg, t = make(kind, tmp_path)
    seen = []
    res = client.load(str(tmp_path), model=kind, chunk_bytes=4096, progress=seen.append)
    moe_ids = [i for i in range(3) if i not in DENSE[kind]]
    assert res.expert_layers == [f"layers.{i}" for i in moe_ids]
    assert res.skipped_layers == [f"model.layers.{i}" for i in DENSE[kind]]
    assert res.version == 1 and seen and seen[-1].bytes_done == seen[-1].bytes_total > 0
    md = next(m for m in client.models() if m.name == kind)
    assert md.current and md.state == "ready"
    specs = {m.name: ExpertLayerSpec.from_proto(m) for m in md.expert_layers}
    assert sorted(specs) == res.expert_layers
    x = torch.randn(33, D, generator=torch.Generator().manual_seed(3))
    for i in moe_ids:
        got = client.moe_forward(kind, f"layers.{i}", x)
        torch.testing.assert_close(got, naive(kind, t, i, x), rtol=1e-4, atol=1e-4)
    # Every replica holds each expert's rows exactly: expert 3 of the last layer read back.
    spec = specs["layers.2"]
    rows = client.lookup_rows(kind, "moe.layers.2", expert_row_ids(spec, 3))
    w1, w2, w3 = unpack_expert(spec, rows)
    moe = "block_sparse_moe" if kind == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    p = f"model.layers.2.{moe}.experts.3"
    assert torch.equal(w1, t[f"{p}.{names[0]}.weight"])
    assert torch.equal(w3, t[f"{p}.{names[1]}.weight"])
    assert torch.equal(w2, t[f"{p}.{names[2]}.weight"])


def test_every_replica_holds_the_experts_and_reloads_make_versions(cluster, tmp_path):
    c, client = cluster
    _, t = make("mixtral", tmp_path)
    res = client.load(str(tmp_path), model="mx", chunk_bytes=1 << 20)
    m = client.status().map
    md = next(x for x in m.models if x.name == "mx" and x.version == res.version)
    table = next(x for x in md.tables if x.name == "moe.layers.1")
    addresses = {s.server_id: s.address for s in m.servers}
    rows = {}
    for rs in m.partitions:
        if rs.table_uid != table.table_uid:
            continue
        assert len(rs.replicas) == 2 and len(set(rs.replicas)) == 2
        got = [server_checksums(addresses[s], table.table_uid, [rs.partition], recorded=False)
               for s in rs.replicas]
        assert got[0][0][0] == got[1][0][0]                    # replicas agree, by scan
        rows[rs.partition] = int(got[0][1][0])
    assert rows == {e: 3 * FF if e < E else 0 for e in range(table.num_partitions)}
    again = client.load(str(tmp_path), model="mx")
    assert again.version == res.version + 1
    x = torch.randn(5, D)
    torch.testing.assert_close(client.moe_forward("mx", "layers.0", x),
                               naive("mixtral", t, 0, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(client.moe_forward("mx", "layers.0", x, version=res.version),
                               naive("mixtral", t, 0, x), rtol=1e-4, atol=1e-4)


def test_a_bfloat16_checkpoint_loads_as_bfloat16_layers(cluster, tmp_path):
    _, client = cluster
    _, t = make("qwen2_moe", tmp_path, dtype=torch.bfloat16)
    client.load(str(tmp_path), model="q16")
    md = next(m for m in client.models() if m.name == "q16")
    assert {m.dtype for m in md.expert_layers} == {"bfloat16"}
    # Tokens whose k-th and (k+1)-th gate logits nearly tie may pick another expert in
    # bfloat16 arithmetic (as any bfloat16 MoE would): compare the tokens with a clear choice.
    x = torch.randn(48, D, generator=torch.Generator().manual_seed(5)).to(
        torch.bfloat16)
    logits = x.float() @ t["model.layers.1.mlp.gate.weight"].float().t()
    top = logits.topk(K + 1, dim=1).values
    x = x[(top[:, K - 1] - top[:, K]) > 0.1]
    assert len(x) >= 24
    got = client.moe_forward("q16", "layers.1", x)
    want = naive("qwen2_moe", t, 1, x.float())
    assert got.dtype == torch.bfloat16
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 2e-2, err


def test_a_conflicting_checkpoint_fails_naming_the_layer(cluster, tmp_path):
    _, client = cluster
    (tmp_path / "a").mkdir()
    make("mixtral", tmp_path / "a")
    client.load(str(tmp_path / "a"), model="clash")
    import json
    import shutil
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    cfg = json.loads((b / "config.json").read_text())
    cfg["intermediate_size"] = FF + 8             # the tensors no longer match either
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        client.load(str(b), model="clash")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "layers.0" in e.value.message and "d_ff" in e.value.message
    versions = [(m.version, m.state) for m in client.models() if m.name == "clash"]
    assert versions == [(1, "ready")]


def test_a_truncated_expert_fails_and_leaves_no_version(cluster, tmp_path):
    _, client = cluster
    _, t = make("mixtral", tmp_path)
    import json
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    index["weight_map"].pop(key)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        client.load(str(tmp_path), model="trunc")
    assert key in e.value.message
    assert [m.state for m in client.models() if m.name == "trunc"] in ([], ["loading"])
    with pytest.raises(ShoalError) as e:
        client.moe_forward("trunc", "layers.0", torch.randn(2, D))
    assert e.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


def test_an_interrupted_moe_load_resumes_with_the_missing_experts_only(cluster, tmp_path):
    _, client = cluster
    _, t = make("mixtral", tmp_path)
    import json
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    key = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    broken = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != key})
    path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError):
        client.load(str(tmp_path), model="res", chunk_bytes=4096)
    assert [m.state for m in client.models() if m.name == "res"] == ["loading"]
    path.write_text(json.dumps(index))                    # repaired
    res = client.load(str(tmp_path), model="res", resume=True)
    # Layers 0 and 1 were written whole before the failure, and experts 0..3 of layer 2 at
    # least (the loader keeps one chunk in flight); the rest was rewritten.
    assert 2 * E + 4 <= res.skipped_partitions < 3 * E
    assert res.version == 1
    x = torch.randn(9, D)
    for i in range(3):
        torch.testing.assert_close(client.moe_forward("res", f"layers.{i}", x),
                                   naive("mixtral", t, i, x), rtol=1e-4, atol=1e-4)
