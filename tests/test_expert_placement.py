"""The hot-expert replication planner (pure): skewed loads get replicas of their hottest
experts and a lower imbalance, within each server's capacity, with few copies; an even load is
left alone; a full server drops a cold redundant replica to make room."""
from __future__ import annotations

import numpy as np

from experts.placement import apply, imbalance, plan_replicas, server_loads

SERVERS = ["s0", "s1", "s2", "s3"]


def round_robin(num_experts: int) -> dict[int, list[str]]:
    return {e: [SERVERS[e % len(SERVERS)]] for e in range(num_experts)}


def test_skewed_load_gets_replicas_and_evens_out():
    load = 1e4 / np.arange(1, 17) ** 1.2          # Zipf: experts 0, 1 get most tokens
    place = round_robin(16)
    before = imbalance(load, place, SERVERS)
    actions = plan_replicas(load, place, SERVERS, capacity={s: 6 for s in SERVERS},
                            max_moves=8)
    after_place = apply(place, actions)
    after = imbalance(load, after_place, SERVERS)
    assert before > 1.8 and after < 1.25, (before, after, actions)
    assert 1 <= sum(a.kind == "add" for a in actions) <= 8
    assert {a.expert for a in actions if a.kind == "add"} >= {0}      # the hottest is copied
    for e, where in after_place.items():
        assert len(where) == len(set(where)) >= 1                      # distinct, never lost
    held = {s: sum(s in w for w in after_place.values()) for s in SERVERS}
    assert all(n <= 6 for n in held.values())
    total = sum(server_loads(load, after_place, SERVERS).values())
    assert abs(total - load.sum()) < 1e-6 * load.sum()                 # tokens conserved


def test_even_load_is_left_alone_and_moves_are_bounded():
    load = np.full(16, 100.0)
    assert plan_replicas(load, round_robin(16), SERVERS, {s: 8 for s in SERVERS}) == []
    assert plan_replicas(np.zeros(16), round_robin(16), SERVERS, {s: 8 for s in SERVERS}) == []
    skew = np.array([1000.0] + [1.0] * 15)
    acts = plan_replicas(skew, round_robin(16), SERVERS, {s: 8 for s in SERVERS}, max_moves=2)
    assert sum(a.kind == "add" for a in acts) == 2


def test_full_servers_drop_a_cold_redundant_replica_for_a_hot_one():
    place = {0: ["s0"], 1: ["s1", "s2", "s3"], 2: ["s1"], 3: ["s2"], 4: ["s3"]}
    load = np.array([900.0, 3.0, 10.0, 10.0, 10.0])
    servers = SERVERS
    cap = {"s0": 1, "s1": 2, "s2": 2, "s3": 2}                          # all full
    acts = plan_replicas(load, place, servers, cap, max_moves=3)
    assert acts and acts[0].kind == "drop" and acts[0].expert == 1    # the cold extra copy
    assert acts[1].kind == "add" and acts[1].expert == 0
    after = apply(place, acts)
    assert imbalance(load, after, servers) < imbalance(load, place, servers)
    assert all(len(w) >= 1 for w in after.values())
    held = {s: sum(s in w for w in after.values()) for s in servers}
    assert all(held[s] <= cap[s] for s in servers)


def test_no_expert_drops_below_the_models_replication():
    # Expert 1 has 3 replicas; with replication 3 none is redundant, so the full servers
    # cannot make room and nothing is planned; with replication 2 one copy may go.
    place = {0: ["s0"], 1: ["s1", "s2", "s3"], 2: ["s1"], 3: ["s2"], 4: ["s3"]}
    load = np.array([900.0, 3.0, 10.0, 10.0, 10.0])
    cap = {"s0": 1, "s1": 2, "s2": 2, "s3": 2}
    assert plan_replicas(load, place, SERVERS, cap, max_moves=3, min_replicas=3) == []
    acts = plan_replicas(load, place, SERVERS, cap, max_moves=3, min_replicas=2)
    assert [a.kind for a in acts][:2] == ["drop", "add"] and acts[0].expert == 1
    assert all(len(w) >= 2 for e, w in apply(place, acts).items() if e == 1)
