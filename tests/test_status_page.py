"""The coordinator's status page: its data (``status_view``) from a map, and the page itself in
headless Chromium against a real local cluster, where the DOM must show the cluster's actual
servers and the partitions each holds, the load heat map where the load really is, a server
added (and the partitions moved onto it), and a server killed (dead, and the failure listed)."""
from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest
import torch

import shoal
from coordinator.status import status_view
from embeddings.specs import TableSpec
from shoal.proto import shoal_pb2 as pb
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests import webdriver
from tests.test_restart import wait_until

SERVERS_JS = """return [...document.querySelectorAll('#servers tr.server')].map(r => [
  r.dataset.server, r.dataset.state,
  [...r.querySelectorAll('.part')].map(p => [+p.dataset.tableUid, +p.dataset.partition,
                                             p.dataset.role])]);"""
HEAT_JS = """return [...document.querySelectorAll('#heat .heat')].map(h => [+h.dataset.tableUid,
  [...h.querySelectorAll('.cell')].map(c => [+c.dataset.load,
                                             getComputedStyle(c).backgroundColor])]);"""


def held_by(m: pb.ShardMap) -> list:
    """[server, state, sorted [table_uid, partition, role]] per server, as the page lists them."""
    out = {s.server_id: [s.server_id, s.state, []] for s in m.servers}
    for rs in m.partitions:
        for i, s in enumerate(rs.replicas):
            out[s][2].append([rs.table_uid, rs.partition, "leader" if i == 0 else "follower"])
        for s in rs.learners:
            out[s][2].append([rs.table_uid, rs.partition, "learner"])
    return [[s, st, sorted(p)] for s, st, p in (out[k] for k in sorted(out))]


def test_status_view_lists_servers_partitions_load_and_events():
    m = pb.ShardMap(version=7, servers=[
        pb.ServerInfo(server_id="a", address="127.0.0.1:1", state="alive",
                      memory_budget_bytes=1 << 30, disk_capacity_bytes=1 << 40,
                      stats=pb.ServerStats(resident_bytes=100, rss_bytes=1000, rows=10,
                                           cache_bytes=60, store_memory_bytes=70,
                                           disk_bytes=5000, raw_bytes=4000,
                                           ids_looked_up=200, cold_ids=30)),
        pb.ServerInfo(server_id="b", address="127.0.0.1:2", state="dead")],
        models=[pb.ModelSpec(name="m", version=1, current=True, state="ready", tables=[
            pb.TableSpec(name="t", table_uid=3, num_partitions=2)])],
        partitions=[pb.ReplicaSet(table_uid=3, partition=0, replicas=["a", "b"]),
                    pb.ReplicaSet(table_uid=3, partition=1, replicas=["b"], learners=["a"])],
        moves=[pb.Move(table_uid=3, partition=1, source="b", target="a", bytes=64,
                       phase="copying", bytes_done=32)])
    v = status_view(m, {(3, 1): 12.5}, {"a": 2.0}, [{"time": 1.0, "kind": "server_dead",
                                                     "text": "b missed its lease"}])
    json.dumps(v)                                     # plain JSON types only
    assert v["map_version"] == 7
    a, b = v["servers"]
    assert (a["id"], a["state"], b["state"]) == ("a", "alive", "dead")
    assert a["partitions"] == [[3, 0, "leader"], [3, 1, "learner"]]
    assert b["partitions"] == [[3, 0, "follower"], [3, 1, "leader"]]
    assert a["memory"] == {"budget": 1 << 30, "memory_tier": 100, "replication_log": 0,
                           "rss": 1000, "row_cache": 60, "rocksdb": 70}
    assert a["disk"] == {"capacity": 1 << 40, "used": 5000, "rows": 4000}
    assert (a["hit_rate"], b["hit_rate"]) == (0.85, 1.0)
    assert (a["load"], b["load"], a["rows"]) == (2.0, 0.0, 10)
    (t,) = v["tables"]
    assert t["load"] == [0.0, 12.5] and t["replicas"] == [["a", "b"], ["b"]]
    assert v["moves"][0]["phase"] == "copying" and v["moves"][0]["bytes_done"] == 32
    assert v["events"][0]["kind"] == "server_dead"


def test_status_page_in_chromium_follows_the_cluster(tmp_path):
    why = webdriver.missing()
    if why:                      # .ci/run installs them: in CI a missing browser is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)
    cfg = shoal.ShoalConfig().replace(coordinator__lease_s=2.0)
    with shoal.LocalCluster(servers=2, replication=1, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client = cluster.client()
        client.create_model("m", [TableSpec("t", 4096, 8, feature_names=("f",),
                                            num_partitions=8)])
        client.write_rows("m", "t", torch.arange(4096), torch.randn(4096, 8))
        uid = client.status().map.models[0].tables[0].table_uid
        hot = torch.arange(3, 4096, 8)[:64]           # every id in partition 3
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], hot, torch.full((16,), 4))
        web = client.status().map.coordinator_metrics_address
        with urllib.request.urlopen(f"http://{web}/status.json", timeout=10) as r:
            assert {s["id"] for s in json.load(r)["servers"]} == {"s0", "s1"}

        with webdriver.Browser() as b:
            b.get(f"http://{web}/?refresh_ms=250")

            def page_matches_map():
                m = client.status().map
                want = held_by(m)
                got = b.wait_for(f"const v = (() => {{ {SERVERS_JS} }})(); "
                                 f"return v.length === {len(want)} ? v : null;",
                                 what=f"{len(want)} servers")
                return got == want, got, want, m

            ok, got, want, m = page_matches_map()
            assert ok, (got, want)
            assert sorted(p for s in got for p in s[2]) == sorted(
                [rs.table_uid, rs.partition, "leader"] for rs in m.partitions)

            # The heat map: load arrives with the heartbeats (a rate between two); only
            # partition 3 is hot.
            def heat():
                client.lookup("m", kjt)
                for table_uid, cells in b.js(HEAT_JS):
                    if table_uid == uid and len(cells) == 8 and cells[3][0] > 0:
                        return cells
                return None
            cells = wait_until(heat, "a hot partition 3 in the heat map", 20, 0.25)
            assert cells[3][1] == "rgb(214, 69, 65)", cells             # the hottest: opaque
            assert all(load == 0 and bg.endswith(", 0)") for i, (load, bg) in enumerate(cells)
                       if i != 3), cells                                # the rest: clear

            # A third server joins: the page lists it, then the partitions moved onto it.
            cluster.add_server()
            b.wait_for("return [...document.querySelectorAll('#servers tr.server')]"
                       ".some(r => r.dataset.server === 's2')", what="server s2")
            cluster.rebalance()
            wait_until(lambda: page_matches_map()[0], "the map after the rebalance", 20, 0.25)
            on_s2 = [s for s in page_matches_map()[1] if s[0] == "s2"][0][2]
            assert on_s2, "the rebalance moved nothing onto s2"

            # A server is killed: the page marks it dead and lists the failure.
            cluster.kill("s1", signal.SIGKILL)
            b.wait_for("const r = document.querySelector('tr.server[data-server=\"s1\"]');"
                       "return r && r.dataset.state === 'dead';", timeout=30, what="s1 dead")
            text = b.wait_for("const e = [...document.querySelectorAll('#events li')]"
                              ".find(e => e.dataset.kind === 'server_dead');"
                              "return e && e.textContent;", what="the failure")
            assert "s1 missed its 2.0 s lease" in text

