"""Model versions on a real cluster: a new version is written while the current one serves,
is not readable until ready, becomes current in one step, and an old one is dropped with its
rows deleted everywhere."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

import shoal
from embeddings.specs import TableSpec


def _rows(seed: int, n: int = 3000, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_versions_write_switch_and_drop(tmp_path):
    with shoal.LocalCluster(servers=3, replication=2, data_dir=str(tmp_path)) as cluster:
        client = cluster.client(timeout=30)
        client.create_model("vm", [TableSpec("t", 3000, 8, feature_names=("f",),
                                             num_partitions=4)])
        v1, v2 = _rows(1), _rows(2)
        ids = torch.arange(3000)
        client.write_rows("vm", "t", ids, v1)
        md2 = client.create_version("vm")              # same tables as the current version
        assert md2.version == 2 and md2.state == "loading" and not md2.current
        assert md2.tables[0].num_partitions == 4
        uid1 = next(m.tables[0].table_uid for m in client.models() if m.version == 1)
        assert md2.tables[0].table_uid != uid1
        # Queries of v2 are refused while it loads; the default still reads v1.
        with pytest.raises(shoal.ShoalError) as e:
            client.lookup_rows("vm", "t", ids[:5], version=2)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "loading" in e.value.message
        with pytest.raises(shoal.ShoalError) as e:
            client.update_version("vm", 2, make_current=True)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        # Readers of the default version under a switch: every answer is v1's or v2's, whole;
        # every reader answers before the switch and after it (then v2's), and none fails.
        phase = {"now": "before"}           # which side of the switch a read began on
        answers = [[] for _ in range(2)]
        errors: list[str] = []
        stop = threading.Event()

        def reader(mine):
            c = cluster.client(timeout=30)
            try:
                while not stop.is_set():
                    began = phase["now"]
                    try:
                        mine.append((began, c.lookup_rows("vm", "t", ids[:64]).numpy()))
                    except Exception as e:      # noqa: BLE001 - counted and reported
                        errors.append(f"{began}: {e!r}")
            finally:
                c.close()

        def read_on(side, n=3, timeout=30):
            deadline = time.monotonic() + timeout
            while not all(sum(b == side for b, _ in a) >= n for a in answers):
                assert time.monotonic() < deadline and not errors, \
                    (f"readers' answers begun {side} the switch: "
                     f"{[sum(b == side for b, _ in a) for a in answers]}; errors {errors[:3]}")
                time.sleep(0.01)

        threads = [threading.Thread(target=reader, args=(a,)) for a in answers]
        for t in threads:
            t.start()
        try:
            client.write_rows("vm", "t", ids, v2, version=2)
            np.testing.assert_array_equal(client.lookup_rows("vm", "t", ids).numpy(), v1)
            client.update_version("vm", 2, ready=True)
            np.testing.assert_array_equal(client.lookup_rows("vm", "t", ids, version=2).numpy(),
                                          v2)
            read_on("before")
            phase["now"] = "during"
            client.update_version("vm", 2, make_current=True)
            phase["now"] = "after"
            np.testing.assert_array_equal(client.lookup_rows("vm", "t", ids).numpy(), v2)
            read_on("after")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert errors == [], f"{len(errors)} reads failed; first: {errors[:3]}"
        for mine in answers:
            for began, a in mine:
                want = {"before": [v1], "during": [v1, v2], "after": [v2]}[began]
                assert any(np.array_equal(a, w[:64]) for w in want), \
                    f"a read begun {began} the switch answered neither {began!r} version"
        # The current version cannot be dropped; the old one can, and its rows go.
        with pytest.raises(shoal.ShoalError) as e:
            client.update_version("vm", 2, drop=True)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "current" in e.value.message
        client.update_version("vm", 1, drop=True)
        assert [(m.version, m.current) for m in client.models()] == [(2, True)]
        with pytest.raises(shoal.ShoalError) as e:
            client.lookup_rows("vm", "t", ids[:5], version=1)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "versions: [2]" in e.value.message
        from shoal.admin import server_stats
        deadline = time.monotonic() + 20
        while True:                                   # only v2's 4 partitions x 2 replicas
            stored = sum(server_stats(s.address).stored_partitions
                         for s in client.status().map.servers)
            if stored == 4 * 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert stored == 8
        client.close()


def test_version_steps_in_the_coordinator_state():
    from coordinator.state import ClusterState
    from coordinator.versions import with_update
    from shoal.config import CoordinatorConfig
    from shoal.errors import ShoalError
    from shoal.proto import shoal_pb2 as pb
    from tests.test_units import _table

    s = ClusterState()
    for i in range(3):
        s = s.with_server(f"s{i}", f"h:{i}", 0)
    alive, cfg = ["s0", "s1", "s2"], CoordinatorConfig()
    with pytest.raises(ShoalError) as e:
        s.with_model(pb.ModelSpec(name="m"), alive, cfg, 2, new_version=True)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    quota = 3 * 1024 * 8 * 4                         # room for 1.5 versions of 2 replicas
    s, v1 = s.with_model(pb.ModelSpec(name="m", tables=[_table("a", n=1024, dim=8)],
                                      memory_quota_bytes=quota), alive, cfg, 2)
    assert (v1.version, v1.state, v1.current) == (1, "ready", True)
    with pytest.raises(ShoalError) as e:                # a second version would pass the quota
        s.with_model(pb.ModelSpec(name="m"), alive, cfg, 2, new_version=True)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "other versions" in e.value.message and "drop an old version" in e.value.message
    s, v1 = s.with_model(pb.ModelSpec(name="n", tables=[_table("a", n=1024, dim=8)]),
                         alive, cfg, 2)
    s, v2 = s.with_model(pb.ModelSpec(name="n"), alive, cfg, 2, new_version=True)
    assert (v2.version, v2.state, v2.current) == (2, "loading", False)
    assert v2.tables[0].table_uid != v1.tables[0].table_uid
    assert sum(k[0] == v2.tables[0].table_uid for k in s.partitions) == 4
    with pytest.raises(ShoalError) as e:
        with_update(s, "n", 3, ready=True)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "versions: [1, 2]" in e.value.message
    s2 = with_update(with_update(s, "n", 2, ready=True), "n", 2, make_current=True)
    assert [(md.version, md.current) for md in s2.versions("n")] == [(1, False), (2, True)]
    s3 = with_update(s2, "n", 1, drop=True)
    assert [md.version for md in s3.versions("n")] == [2]
    assert not any(k[0] == v1.tables[0].table_uid for k in s3.partitions)
    # A map saved before versions existed: every version ready, the newest current.
    m = s.to_map()
    for md in m.models:
        md.state, md.current = "", False
    back = ClusterState.from_map(m, s.next_table_uid)
    assert back.current("n").version == 2 and back.current("m").version == 1
