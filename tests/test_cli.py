"""The `shoal` command line against a real local cluster: up, status, models, down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import shoal
from embeddings.specs import TableSpec


def shoal_cli(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], env=env, timeout=timeout,
                          capture_output=True, text=True)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def assert_down(down, pids) -> None:
    """`shoal down` succeeded and every one of ``pids`` is gone (within 15 s)."""
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_up_status_models_down(tmp_path):
    env = dict(os.environ, SHOAL_HOME=str(tmp_path / "home"))
    data = tmp_path / "cluster"
    up = shoal_cli(["up", "--servers", "2", "--data-dir", str(data)], env)
    assert up.returncode == 0, up.stderr
    assert "2 servers, replication 2" in up.stdout
    address = up.stdout.split("router: ")[1].split()[0]
    state = json.loads((data / "cluster.json").read_text())
    pids = [state["coordinator"]["pid"], state["router"]["pid"],
            *[s["pid"] for s in state["servers"]]]
    try:
        assert all(alive(p) for p in pids)
        # A second `up` on the same folder is refused, naming it.
        again = shoal_cli(["up", "--data-dir", str(data)], env)
        assert again.returncode != 0 and str(data) in again.stderr

        client = shoal.connect(address)
        client.create_model("clim", [TableSpec("t", 1000, 8, feature_names=("f",))])
        rows = torch.arange(8000, dtype=torch.float32).reshape(1000, 8)
        assert client.write_rows("clim", "t", torch.arange(1000), rows) == 1000
        np.testing.assert_array_equal(client.lookup_rows("clim", "t", [5, 999]).numpy(),
                                      rows[[5, 999]].numpy())
        client.close()

        # Heartbeats carry the stats that `status` prints; wait for them (bounded).
        deadline = time.monotonic() + 20
        while True:
            st = shoal_cli(["status"], env)
            assert st.returncode == 0, st.stderr
            lines = {ln.split()[0]: ln.split() for ln in st.stdout.splitlines()
                     if ln.startswith("s")}
            if all(int(lines[s][3]) > 0 for s in ("s0", "s1")) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for sid in ("s0", "s1"):
            cols = lines[sid]
            assert cols[1] == "alive"
            assert int(cols[3]) == 4                  # 4 partitions, each on both servers
            assert int(cols[5]) == 1000               # rows held
        assert "4 partitions over 1 models" in st.stdout
        parts = shoal_cli(["status", "--partitions"], env)
        assert parts.returncode == 0
        assert sum(1 for ln in parts.stdout.splitlines() if ln.startswith("clim")) == 4

        models = shoal_cli(["models"], env)
        assert "clim v1 (ready, current): 1 tables, 1000 rows" in models.stdout
        assert "t: 1000 x 8 float32 sum, 4 partitions, features f" in models.stdout

        from tests.ckpt_fixtures import write_safetensors
        w = torch.randn(500, 8)
        ckpt = write_safetensors(str(tmp_path / "m.safetensors"),
                                 {"x.embedding_bags.t.weight": w})
        ld = shoal_cli(["load", ckpt, "--model", "ld", "--chunk-mib", "0.01"], env)
        assert ld.returncode == 0, ld.stderr
        assert "loaded ld v1: 1 tables, 500 rows" in ld.stdout and "verified" in ld.stdout
        assert "100%" in ld.stdout
        models = shoal_cli(["models"], env)
        assert "ld v1 (ready, current): 1 tables, 500 rows" in models.stdout
        c = shoal.connect(address)
        torch.testing.assert_close(c.lookup_rows("ld", "t", torch.arange(500)), w, rtol=0,
                                   atol=0)
        # An MoE checkpoint: its layers, and those skipped for not being MoE.
        from tests.test_moe_checkpoint import D, make, naive
        (tmp_path / "moe").mkdir()
        _, tensors = make("qwen2_moe", tmp_path / "moe")
        ld = shoal_cli(["load", str(tmp_path / "moe"), "--model", "qw"], env)
        assert ld.returncode == 0, ld.stderr
        assert "expert layers layers.1, layers.2; not MoE, skipped: model.layers.0" in ld.stdout
        models = shoal_cli(["models"], env)
        assert "expert layer layers.1: 8 experts, top-2, d_model 16, d_ff 24, silu_gated, " \
            "softmax, float32, shared expert d_ff 32 (table moe.layers.1)" in models.stdout
        x = torch.randn(3, D)
        torch.testing.assert_close(c.moe_forward("qw", "layers.2", x),
                                   naive("qwen2_moe", tensors, 2, x), rtol=1e-4, atol=1e-4)
        ex = shoal_cli(["experts", "qw"], env)
        assert ex.returncode == 0, ex.stderr
        assert "qw v1 layers.1: imbalance" in ex.stdout and "qw v1 layers.2:" in ex.stdout
        c.close()
    finally:
        down = shoal_cli(["down"], env)
    assert_down(down, pids)
    assert not (data / "cluster.json").exists()
    # With nothing running, commands say so instead of failing obscurely.
    gone = shoal_cli(["status"], env)
    assert gone.returncode != 0 and "shoal up" in gone.stderr


def up_with_model(tmp_path, model: str, *up_args):
    """`shoal up` 2 servers; a model with one 4000 x 8 table of 8 partitions, written.
    (env, data dir, client, rows)"""
    env = dict(os.environ, SHOAL_HOME=str(tmp_path / "home"))
    data = tmp_path / "cluster"
    up = shoal_cli(["up", "--servers", "2", "--data-dir", str(data), *up_args], env)
    assert up.returncode == 0, up.stderr
    client = shoal.connect(up.stdout.split("router: ")[1].split()[0])
    client.create_model(model, [TableSpec("t", 4000, 8, feature_names=("f",),
                                          num_partitions=8)])
    rows = torch.arange(32000, dtype=torch.float32).reshape(4000, 8)
    client.write_rows(model, "t", torch.arange(4000), rows)
    return env, data, client, rows


def test_add_server_drain_resize(tmp_path):
    env, data, client, rows = up_with_model(tmp_path, "rz")
    try:
        added = shoal_cli(["add-server"], env)
        assert added.returncode == 0, added.stderr
        assert "started s2" in added.stdout and "moving" in added.stdout
        m = client.status().map
        assert sum("s2" in rs.replicas for rs in m.partitions) >= 4     # 16 replicas / 3
        nothing = shoal_cli(["rebalance", "--dry-run"], env)
        assert "would move 0 partitions" in nothing.stdout, nothing.stdout
        plan = shoal_cli(["drain", "s2", "--dry-run"], env)
        assert plan.returncode == 0 and "-> s" in plan.stdout and "would move" in plan.stdout
        assert not client.status().map.moves                 # a dry run starts nothing
        shrink = shoal_cli(["resize", "--servers", "2"], env)
        assert shrink.returncode == 0, shrink.stderr
        assert "3 -> 2 servers (s0, s1)" in shrink.stdout
        m = client.status().map
        assert sorted(s.server_id for s in m.servers) == ["s0", "s1"]
        np.testing.assert_array_equal(client.lookup_rows("rz", "t", torch.arange(4000)).numpy(),
                                      rows.numpy())
        split = shoal_cli(["split", "rz", "t"], env)
        assert split.returncode == 0, split.stderr
        assert "rz/t serves from 16 partitions" in split.stdout, split.stdout
        assert client.models()[0].tables[0].num_partitions == 16
        np.testing.assert_array_equal(client.lookup_rows("rz", "t", torch.arange(4000)).numpy(),
                                      rows.numpy())
        none = shoal_cli(["split", "rz", "nope"], env)
        assert none.returncode == 1 and "no table 'nope'" in none.stderr
        client.close()
    finally:
        down = shoal_cli(["down"], env)
    assert down.returncode == 0, down.stderr


def test_autoscale_on_a_detached_cluster(tmp_path):
    """`shoal autoscale` on a `shoal up` cluster runs a provisioner process that starts the
    server the coordinator asks for; `shoal down` stops it and every server."""
    env, data, client, rows = up_with_model(tmp_path, "au", "--disk-capacity", str(4 << 20))
    try:
        bad = shoal_cli(["autoscale", "--min", "3", "--max", "2", "--memory-target", "0.5"], env)
        assert bad.returncode == 1 and "max_servers: 2 must be at least min_servers 3" \
            in bad.stderr, bad.stderr
        on = shoal_cli(["autoscale", "--min", "2", "--max", "3", "--capacity-target", "0.01",
                        "--window", "1", "--cooldown", "2"], env)
        assert on.returncode == 0, on.stderr
        assert "autoscaling 2..3 servers, targets: stored 1% of capacity" in on.stdout
        deadline = time.monotonic() + 90
        while True:
            m = client.status().map
            if len(m.servers) == 3 and not m.moves and \
                    any("s2" in rs.replicas for rs in m.partitions):
                break
            assert time.monotonic() < deadline, "the provisioner did not start s2"
            time.sleep(0.5)
        st = shoal_cli(["autoscale", "--status"], env)
        assert "2 -> 3: stored" in st.stdout, st.stdout
        np.testing.assert_array_equal(client.lookup_rows("au", "t", torch.arange(4000)).numpy(),
                                      rows.numpy())
        client.close()
        state = json.loads((data / "cluster.json").read_text())
        pids = [state["provisioner"]["pid"], *[s["pid"] for s in state["servers"]]]
        assert len(pids) == 4
    finally:
        down = shoal_cli(["down"], env)
    assert_down(down, pids)
