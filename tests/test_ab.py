"""A/B and canaries: a version given a 20% traffic share answers 20% of 5,000 keyed
requests (within 4.4 standard deviations), the same keys every time; every answer says its
version and holds that version's rows; switching the current version back and forth under
load drops no request."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import shoal

KJT = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([5]), torch.tensor([1]))


def ask(client, key: str) -> int:
    """The version that answered a keyed lookup, checked against its rows (vN: all N)."""
    answered = {}
    got = client.lookup("m", KJT, key=key, answered=answered).values()
    v = answered["version"]
    assert got.tolist() == [[float(v)] * 4], (key, v, got)
    return v


def test_traffic_share_is_sticky_and_switches_drop_nothing(tmp_path):
    with shoal.LocalCluster(servers=2, replication=2, data_dir=str(tmp_path / "c")) as cluster:
        client = cluster.client(timeout=60)
        client.create_model("m", [shoal.TableSpec("t", 100, 4, feature_names=("f",))])
        client.write_rows("m", "t", np.arange(100), np.full((100, 4), 1.0, np.float32))
        v2 = client.create_version("m").version
        assert v2 == 2
        client.write_rows("m", "t", np.arange(100), np.full((100, 4), 2.0, np.float32),
                          version=2)
        client.update_version("m", 2, ready=True)
        assert ask(client, "anyone") == 1                   # no share yet: the current one

        client.set_traffic_share("m", 2, 0.2)
        keys = [f"user{i}" for i in range(5000)]
        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(lambda k: ask(client, k), keys))
        share = first.count(2) / len(first)
        assert abs(share - 0.2) < 4.4 * (0.2 * 0.8 / len(first)) ** 0.5, share
        again = [ask(client, k) for k in keys[:300]]
        assert again == first[:300]                         # sticky per key
        assert ask(client, "") == 1                         # no key: the current version

        with pytest.raises(shoal.ShoalError) as e:
            client.set_traffic_share("m", 2, 1.5)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "traffic_share" in \
            e.value.message
        with pytest.raises(shoal.ShoalError) as e:
            client.set_traffic_share("m", 1, 0.1)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "current" in \
            e.value.message

        # Switching the current version (and rolling back) under load drops no request.
        client.set_traffic_share("m", 2, 0.0)
        errors, seen, stop = [], set(), threading.Event()

        def load(k: int) -> None:
            c = cluster.client(timeout=30)
            try:
                for j in range(5000):                       # bounded; stopped well before
                    if stop.is_set():
                        return
                    seen.add(ask(c, ""))
            except Exception as ex:                         # noqa: BLE001 - reported below
                errors.append(ex)
            finally:
                c.close()

        threads = [threading.Thread(target=load, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for v in (2, 1, 2, 1):
            client.update_version("m", v, make_current=True)
            assert ask(client, "") == v                     # this router switched at once
            threading.Event().wait(0.3)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, repr(errors[0])
        assert seen == {1, 2}
        client.close()
