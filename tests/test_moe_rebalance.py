"""Hot-expert replication under load, on a real 4-server cluster (replication 1, so each expert
starts on one server): skewed traffic sends half of all tokens to one expert. The coordinator,
from the servers' per-expert token counters, gives the hot experts redundant replicas; once
they serve, the measured imbalance (max / mean tokens per server, counted by the servers)
drops, and no request fails or returns a wrong answer while the copies are built and switched
in."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import shoal
from tests.traffic import Workers
from experts.compute import moe_forward_local
from experts.specs import ExpertLayerSpec, ExpertLayerWeights
from shoal.wire import unpack

E, D, FF, K, T = 8, 64, 128, 2, 256


def _layer():
    spec = ExpertLayerSpec("l0", num_experts=E, d_model=D, d_ff=FF, top_k=K).validate()
    g = torch.Generator().manual_seed(11)
    w = ExpertLayerWeights(gate=torch.randn(E, D, generator=g),
                           w1=torch.randn(E, FF, D, generator=g) * 0.1,
                           w2=torch.randn(E, D, FF, generator=g) * 0.1,
                           w3=torch.randn(E, FF, D, generator=g) * 0.1).check(spec)
    return spec, w


def skewed_routing(g: torch.Generator, hot: list[int]):
    """[T, 2] distinct experts per token: the first from a skew where ``hot[0]`` gets half of
    all first choices and ``hot[1]`` a quarter; the second uniform over the rest."""
    p = torch.full((E,), 0.25 / (E - 2))
    p[hot[0]], p[hot[1]] = 0.5, 0.25
    first = torch.multinomial(p, T, replacement=True, generator=g)
    second = (first + torch.randint(1, E, (T,), generator=g)) % E
    ids = torch.stack([first, second], 1)
    return ids, torch.rand(T, K, generator=g) + 0.1


class Traffic(Workers):
    """Clients calling moe_forward with skewed routing, each answer checked locally."""

    def __init__(self, address, spec, weights, hot):
        self.address, self.spec, self.w, self.hot = address, spec, weights, hot
        self.ok, self.failures, self.wrong = 0, [], 0
        super().__init__(2, join_s=30)

    def _run(self, i):
        client = shoal.connect(self.address, timeout=30)
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(T, D, generator=g)
        deadline = time.monotonic() + 240
        while not self._stop.is_set() and time.monotonic() < deadline:
            ids, w = skewed_routing(g, self.hot)
            try:
                got = client.moe_forward("moe", "l0", x, expert_ids=ids, expert_weights=w)
            except shoal.ShoalError as e:
                self.failures.append(e)
                continue
            want = moe_forward_local(self.spec, self.w, x, expert_ids=ids, expert_weights=w)
            if torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                self.ok += 1
            else:
                self.wrong += 1
        client.close()


def _tokens_per_server(client, uid: int) -> dict[str, int]:
    """The servers' own cumulative token counters for the layer's table (from heartbeats)."""
    out = {}
    for s in client.status().map.servers:
        for tl in s.stats.table_loads:
            if tl.table_uid == uid:
                out[s.server_id] = int(unpack(tl.ids_looked_up, "ids", "int64", 1).sum())
    return out


def _measured_imbalance(client, uid: int, seconds: float) -> float:
    time.sleep(1.0)                          # heartbeats carry the counters twice a second
    a = _tokens_per_server(client, uid)
    time.sleep(seconds)
    b = _tokens_per_server(client, uid)
    per = np.array([b.get(s, 0) - a.get(s, 0) for s in b], float)
    assert len(per) == 4 and per.sum() > 0, (a, b)
    return float(per.max() / per.mean())


def _wait_built(client, uid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(rs.learners for rs in client.status().map.partitions if rs.table_uid == uid):
            return
        time.sleep(0.2)
    pytest.fail("hot-expert copies were not built in time")


def _wait_for_rates(client, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (b,) = client.rebalance_experts("moe", dry_run=True).layers
        if sum(b.tokens_per_s) > 0 and b.changes:
            return b
        time.sleep(0.5)
    pytest.fail("the coordinator saw no expert load")


def test_hot_experts_get_replicas_under_load(tmp_path):
    spec, w = _layer()
    cfg = shoal.ShoalConfig().replace(coordinator__expert_rebalance_s=0)   # on demand here
    with shoal.LocalCluster(servers=4, replication=1, data_dir=str(tmp_path / "c"),
                            config=cfg) as cluster:
        client = cluster.client(timeout=60)
        client.put_expert_layers("moe", [(spec, w)])
        uid = next(t.table_uid for m in client.models() for t in m.tables if m.name == "moe")
        sets = {rs.partition: list(rs.replicas) for rs in client.status().map.partitions
                if rs.table_uid == uid}
        # The hot experts: two on the same server, so the skew lands on one server.
        by_server: dict[str, list[int]] = {}
        for e in range(E):
            by_server.setdefault(sets[e][0], []).append(e)
        hot = next(es for es in by_server.values() if len(es) >= 2)[:2]
        with Traffic(cluster.router_address, spec, w, hot) as traffic:
            before = _measured_imbalance(client, uid, 3.0)
            plan = _wait_for_rates(client)
            assert plan.imbalance_after < plan.imbalance_before
            # The coordinator's metrics name the same hot experts (per-expert load).
            from tests.test_metrics import scrape
            c = scrape(client.status().map.coordinator_metrics_address)
            load = {dict(k[1])["expert"]: v for k, v in c.items()
                    if k[0] == "shoal_expert_load" and dict(k[1])["layer"] == "l0"}
            assert len(load) == E and set(sorted(load, key=load.get)[-2:]) == \
                set(map(str, hot)), (load, hot)
            applied = client.rebalance_experts("moe")
            (b,) = applied.layers
            assert b.changes and {c.expert for c in b.changes if c.kind == "add"} & set(hot)
            assert b.imbalance_after < b.imbalance_before
            _wait_built(client, uid)
            after = _measured_imbalance(client, uid, 3.0)
            m = client.status().map
            replicas = {rs.partition: len(rs.replicas) for rs in m.partitions
                        if rs.table_uid == uid}
            assert max(replicas[e] for e in hot) >= 2
            assert all(n >= 1 for n in replicas.values())
            n_before = traffic.ok
        print(f"imbalance measured {before:.2f} -> {after:.2f}; planned {b.imbalance_before:.2f} -> "
              f"{b.imbalance_after:.2f}; {traffic.ok} requests, changes {list(b.changes)}")
        assert not traffic.failures, traffic.failures[:3]
        assert traffic.wrong == 0 and n_before > 20
        assert before > 1.6, before                  # half the tokens on one server's experts
        assert after < before - 0.3, (before, after)
        client.close()
