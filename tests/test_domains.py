"""Failure domains (a host, a Ray node): the coordinator keeps a partition's replicas in
distinct domains while there are enough — at placement, when it rebuilds a lost replica, when
the rebalancer moves or swaps replicas, and when hot experts get copies. Pure logic and the
coordinator service with a fake clock; the Ray tests check the same on real nodes."""
from __future__ import annotations

import random

import numpy as np

from coordinator.placement import PartitionLoad, ServerLoad, distinct_domains, place
from coordinator.rebalance import ServerSpec, plan_moves
from coordinator.service import CoordinatorService
from coordinator.store import MemoryStateStore
from experts.placement import plan_replicas
from shoal.config import CoordinatorConfig
from shoal.proto import shoal_pb2 as pb
from tests.test_units import FakeClock, FakeContext, _table

DOMAIN = {"s0": "a", "s1": "a", "s2": "b", "s3": "b", "s4": "c", "s5": "c"}


def _domains(replicas, domain_of=DOMAIN):
    return [domain_of.get(s, s) for s in replicas]


def test_distinct_domains_prefers_other_domains_then_fills():
    order = ["s0", "s1", "s2", "s3"]
    assert distinct_domains(order, 2, DOMAIN) == ["s0", "s2"]
    assert distinct_domains(order, 3, DOMAIN) == ["s0", "s2", "s1"]      # only 2 domains
    assert distinct_domains(order, 1, DOMAIN, taken={"a"}) == ["s2"]
    assert distinct_domains(order, 2, {}) == ["s0", "s1"]                 # no domains given


def test_placement_puts_replicas_in_distinct_domains():
    servers = [ServerLoad(s, domain=d) for s, d in DOMAIN.items()]
    parts = [PartitionLoad(1, p, 1000 + p) for p in range(64)]
    for R in (2, 3):
        out = place(parts, servers, R)
        for reps in out.values():
            assert len(set(reps)) == R and len(set(_domains(reps))) == R
        per = {s: sum(s in r for r in out.values()) for s in DOMAIN}
        assert max(per.values()) - min(per.values()) <= 2            # still balanced
    two = [ServerLoad(s, domain=DOMAIN[s]) for s in ("s0", "s1", "s2", "s3")]
    for reps in place(parts, two, 3).values():          # 3 replicas, 2 domains: both used
        assert len(set(reps)) == 3 and set(_domains(reps)) == {"a", "b"}


def test_rebalance_and_drain_never_share_a_domain():
    rng = random.Random(3)
    servers = list(DOMAIN)
    parts = [PartitionLoad(1, p, rng.randint(1, 50) << 20) for p in range(48)]
    replicas = place(parts, [ServerLoad(s, domain=DOMAIN[s]) for s in servers[:4]], 2)
    sizes = {(1, p.partition): p.bytes for p in parts}
    # Two new servers in domain c; then draining s1 as well.
    for draining in (set(), {"s1"}):
        specs = [ServerSpec(s, draining=s in draining, domain=DOMAIN[s]) for s in servers]
        plan = plan_moves(replicas, sizes, specs)
        assert plan.moves
        after = {k: list(r) for k, r in replicas.items()}
        for m in plan.moves:
            after[m.key] = [m.target if r == m.source else r for r in after[m.key]]
        for k, reps in after.items():
            assert len(set(_domains(reps))) == len(reps), (k, reps)
            assert not (draining & set(reps))


def test_a_lost_replica_is_rebuilt_in_another_domain():
    clock = FakeClock()
    built = []
    svc = CoordinatorService(MemoryStateStore(),
                             CoordinatorConfig(lease_s=5.0, max_builds_per_server=64),
                             default_replication=2, clock=clock,
                             build_replica=lambda addr, req: built.append((addr, req)))
    for s in ("s0", "s1", "s2", "s3"):
        svc.Register(pb.RegisterRequest(server_id=s, address=f"h:{s}", domain=DOMAIN[s]),
                     FakeContext())
    svc.CreateModel(pb.CreateModelRequest(spec=pb.ModelSpec(name="m", tables=[
        _table("a", parts=16)])), FakeContext())
    m = svc.shard_map()
    assert {s.server_id: s.domain for s in m.servers} == \
        {s: DOMAIN[s] for s in ("s0", "s1", "s2", "s3")}
    for rs in m.partitions:
        assert sorted(_domains(rs.replicas)) == ["a", "b"]
    for _ in range(7):                               # s2 (domain b) falls silent
        clock.t += 1.0
        for s in ("s0", "s1", "s3"):
            svc.Heartbeat(pb.HeartbeatRequest(server_id=s), FakeContext())
        svc.reconcile()
    m = svc.shard_map()
    lost = [rs for rs in m.partitions if rs.learners]
    assert lost                                      # s2's partitions are being rebuilt ...
    for rs in lost:
        assert list(rs.learners) == ["s3"], rs       # ... in domain b, next to the a copy
        assert _domains(rs.replicas) == ["a"]


def test_hot_expert_copies_go_to_other_domains():
    load = np.array([900.0, 10, 10, 10])
    place_ = {0: ["s0"], 1: ["s1"], 2: ["s2"], 3: ["s3"]}
    dom = {"s0": "a", "s1": "a", "s2": "b", "s3": "b"}
    cap = {s: 3 for s in dom}
    acts = plan_replicas(load, place_, list(dom), cap, max_moves=1, domain_of=dom)
    assert [(a.kind, a.expert) for a in acts] == [("add", 0)]
    assert dom[acts[0].server] == "b"                # s1 is less loaded but in s0's domain
