"""Autoscaling: the policy with a fake clock and synthetic load (pure), the coordinator turning
its decisions into resizes (fake clock, no servers), and the local backend following them."""
from __future__ import annotations

import math

import grpc
import pytest

from coordinator.autoscale import Autoscaler, Usage
from shoal.errors import ShoalError
from shoal.proto import shoal_pb2 as pb

TARGET = 1000.0          # ids/s per server


def policy(**kw) -> pb.AutoscalePolicy:
    base = dict(enabled=True, min_servers=2, max_servers=6, load_target=TARGET, band=0.2,
                window_s=30, cooldown_s=120)
    base.update(kw)
    return pb.AutoscalePolicy(**base)


def usage(n: int, per_server_load: float) -> Usage:
    return Usage(n, 0, 0, per_server_load * n)


def run(scaler: Autoscaler, n: int, load_at, seconds: float, step: float = 1.0,
        t0: float = 0.0) -> tuple[int, list]:
    """Drive the policy: total load ``load_at(t)`` ids/s, spread over the current servers; a
    decision takes effect at once. Returns (servers at the end, decisions)."""
    decisions = []
    for i in range(int(seconds / step)):
        t = t0 + i * step
        d = scaler.evaluate(t, Usage(n, 0, 0, load_at(t)))
        if d is not None:
            decisions.append((t, d))
            n = d.to_servers
    return n, decisions


def test_scales_out_when_load_stays_above_target_and_not_before_the_window():
    s = Autoscaler(policy())
    n, ds = run(s, 3, lambda t: 3 * 2000.0, 29)           # 2x target, but not for 30 s yet
    assert ds == []
    n, ds = run(s, 3, lambda t: 3 * 2000.0, 5, t0=29)
    assert len(ds) == 1 and ds[0][0] == 30
    d = ds[0][1]
    assert (d.from_servers, d.to_servers) == (3, 6)      # ceil(3 * 2.0): back to the target
    assert "2,000 ids/s per server (target 1,000)" in d.reason and "above 120%" in d.reason


def test_scales_in_one_server_at_a_time_when_load_stays_below():
    s = Autoscaler(policy(cooldown_s=60))
    n, ds = run(s, 5, lambda t: 1000.0, 400)              # 200/s per server: far below
    assert [(d.from_servers, d.to_servers) for _, d in ds] == [(5, 4), (4, 3), (3, 2)]
    assert [t for t, _ in ds] == [30, 30 + 60 + 30, 30 + 2 * (60 + 30)]   # window + cooldown
    assert n == 2                                         # and never below min_servers
    assert "with one server fewer" in ds[0][1].reason


def test_never_flaps_under_load_oscillating_around_the_target():
    # Within the band (+-15% around the target): never any decision, whatever the period.
    for period in (4, 20, 90, 300):
        s = Autoscaler(policy())
        n, ds = run(s, 4, lambda t: 4 * TARGET * (1 + 0.15 * math.sin(2 * math.pi * t / period)),
                    3600)
        assert ds == [] and n == 4, period
    # Swings beyond the band but shorter than the window: no decision either.
    s = Autoscaler(policy())
    n, ds = run(s, 4, lambda t: 4 * TARGET * (1.5 if (t // 20) % 2 else 0.5), 3600)
    assert ds == [] and n == 4
    # Sustained swings (10 min high, 10 min low): it follows them, never twice within the
    # cool-down, and never reverses a decision within window + cool-down.
    s = Autoscaler(policy())
    n, ds = run(s, 4, lambda t: 4 * TARGET * (1.6 if (t // 600) % 2 else 0.4), 3600)
    times = [t for t, _ in ds]
    assert all(b - a >= 120 + 30 for a, b in zip(times, times[1:]))
    assert len(ds) <= 3600 / 150


def test_respects_min_and_max():
    s = Autoscaler(policy(min_servers=2, max_servers=4))
    n, ds = run(s, 4, lambda t: 4 * 10 * TARGET, 1000)    # 10x the target at the maximum
    assert ds == [] and n == 4
    n, ds = run(s, 3, lambda t: 3 * 10 * TARGET, 100)
    assert [(d.from_servers, d.to_servers) for _, d in ds] == [(3, 4)]   # capped at max
    s = Autoscaler(policy(min_servers=2, max_servers=4))
    n, ds = run(s, 1, lambda t: 0.0, 5)                    # below min: to min at once
    assert [(d.from_servers, d.to_servers) for _, d in ds] == [(1, 2)] and ds[0][0] == 0
    s = Autoscaler(policy(min_servers=2, max_servers=4))
    n, ds = run(s, 2, lambda t: 0.0, 1000)                 # idle at min: stays
    assert ds == []


def test_memory_target_and_busy():
    s = Autoscaler(policy(load_target=0, memory_target=0.5, window_s=10))
    full = Usage(2, bytes=1.6e9, budget=2e9, load=0)      # 80% of budget, target 50%
    assert s.evaluate(0, full) is None
    assert s.evaluate(5, full, busy=True) is None          # moving data: windows restart
    assert s.evaluate(14, full) is None
    d = s.evaluate(24, full)
    assert d is not None and (d.from_servers, d.to_servers) == (2, 4)   # ceil(2 * 1.6)
    assert "stored 80% of capacity (target 50%)" in d.reason


@pytest.mark.parametrize("field,kw,text", [
    ("min_servers", dict(min_servers=0), "at least 1"),
    ("max_servers", dict(min_servers=3, max_servers=2), "at least min_servers 3"),
    ("memory_target", dict(memory_target=1.5), "[0, 1]"),
    ("band", dict(band=1.5), "(0, 1)"),
    ("memory_target and load_target", dict(load_target=0), "set at least one")])
def test_bad_policies_are_clear_errors(field, kw, text):
    with pytest.raises(ShoalError) as e:
        Autoscaler(policy(**kw))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith(field) and text in e.value.message


# ---------------------------------------------------------------- in the coordinator

def test_coordinator_turns_decisions_into_resizes():
    import numpy as np

    from shoal.wire import pack
    from tests.test_rebalance import _coordinator, _finish_copies
    from tests.test_units import FakeContext

    svc, clock = _coordinator(["s0", "s1"], parts=8)
    uid = svc.shard_map().models[0].tables[0].table_uid
    st = svc.SetAutoscale(pb.SetAutoscaleRequest(policy=policy(
        min_servers=2, max_servers=3, window_s=5, cooldown_s=10)), FakeContext())
    assert st.desired_servers == 2 and st.policy.band == pytest.approx(0.2)
    counts = {"s0": 0, "s1": 0, "s2": 0}

    def tick(rate_per_server: float, servers=("s0", "s1")):
        clock.t += 1.0
        for s in servers:
            counts[s] += int(rate_per_server)
            c = np.zeros(8, np.int64)
            c[0] = counts[s]
            svc.Heartbeat(pb.HeartbeatRequest(server_id=s, stats=pb.ServerStats(
                table_loads=[pb.TableLoad(table_uid=uid, ids_looked_up=pack(c))])),
                FakeContext())
        svc.reconcile()

    for _ in range(20):                        # 2.5x the target, sustained
        tick(2500)
    st = svc.SetAutoscale(pb.SetAutoscaleRequest(status_only=True), FakeContext())
    assert st.desired_servers == 3 and len(st.decisions) == 1
    assert (st.decisions[0].from_servers, st.decisions[0].to_servers) == (2, 3)
    # The provisioner starts s2; the coordinator moves data onto it.
    svc.Register(pb.RegisterRequest(server_id="s2", address="h:s2"), FakeContext())
    tick(2500, ("s0", "s1", "s2"))
    assert svc.shard_map().moves and all(mv.target == "s2" for mv in svc.shard_map().moves)
    for _ in range(10):
        _finish_copies(svc)
        tick(2500, ("s0", "s1", "s2"))
    assert not svc.shard_map().moves
    # Load falls: after window + cool-down one server is drained and its data moved away.
    for _ in range(40):
        tick(100, ("s0", "s1", "s2"))
        _finish_copies(svc)
    m = svc.shard_map()
    st = m.autoscale
    assert st.desired_servers == 2 and [(d.from_servers, d.to_servers) for d in st.decisions] \
        == [(2, 3), (3, 2)]
    leaving = st.decisions[1].drained
    assert len(leaving) == 1 and {s.server_id: s.draining for s in m.servers}[leaving[0]]
    assert not any(leaving[0] in rs.replicas for rs in m.partitions)
    # Off: nothing more is decided.
    st = svc.SetAutoscale(pb.SetAutoscaleRequest(policy=pb.AutoscalePolicy()), FakeContext())
    assert not st.policy.enabled and st.desired_servers == 0


# ---------------------------------------------------------------- the local backend follows

@pytest.mark.timeout(300)
def test_local_cluster_follows_the_autoscaler_under_load(tmp_path):
    """Capacity use per server drives it (deterministic): 2 servers at ~60% of a 4 MiB disk
    capacity against a 40% target scale out (to the maximum, 3); raising the target to 90% scales back
    in to 2. 4 clients query and 1 writes throughout: no failure, every answer right."""
    import time

    import shoal
    from tests.oracle import fill_from_oracle
    from tests.test_failover import Load, check_replicas, coordinator_map, fo_tables

    read_cfg, write_cfg, oracle = fo_tables(seed=41)
    conf = shoal.ShoalConfig().replace(server__heartbeat_interval_s=0.25,
                                       server__disk_capacity_bytes=4 << 20,
                                       server__rebuild_mib_per_s=32.0,
                                       coordinator__lease_s=2.0)
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path),
                            config=conf) as cluster:
        client = cluster.client()
        client.create_model("fo", [read_cfg, write_cfg])
        fill_from_oracle(client, "fo", oracle)

        def wait_for(pred, what, timeout=90):
            deadline = time.monotonic() + timeout
            while not pred(coordinator_map(cluster)):
                assert time.monotonic() < deadline, what
                time.sleep(0.25)
            return coordinator_map(cluster)

        with Load(cluster, oracle) as load:
            st = cluster.autoscale(2, 3, memory_target=0.4, window_s=1, cooldown_s=2)
            assert st.policy.enabled and st.desired_servers == 2
            m = wait_for(lambda m: len(m.servers) == 3 and not m.moves and
                         all(any(s.server_id in rs.replicas for rs in m.partitions)
                             for s in m.servers), "no scale-out to 3 servers")
            d = m.autoscale.decisions[0]
            assert (d.from_servers, d.to_servers) == (2, 3) and "capacity" in d.reason
            assert sorted(cluster.server_ids()) == ["s0", "s1", "s2"]
            cluster.autoscale(2, 3, memory_target=0.9, window_s=1, cooldown_s=2)
            m = wait_for(lambda m: len(m.servers) == 2 and not m.moves,
                         "no scale-in to 2 servers")
            d = m.autoscale.decisions[-1]
            assert (d.from_servers, d.to_servers) == (3, 2) and len(d.drained) == 1
            gone = d.drained[0]
            scaled_in = len(load.acked)
            time.sleep(0.5)                           # writes go on after the scale-in
        assert load.failures == []
        assert load.answered > 20 and len(load.acked) > scaled_in > 0
        assert gone not in cluster.server_ids() and len(cluster.server_ids()) == 2
        assert not (tmp_path / gone / "rocksdb").exists()      # nothing left on it
        check_replicas(m, load.acked)
        assert all(len(rs.replicas) == 2 for rs in m.partitions)
        client.close()
