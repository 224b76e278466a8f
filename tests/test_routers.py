"""Routers scale out: two models served from one cluster at once each give their own correct
scores, and with 2 routers, SIGKILLing one under load fails no request of a client given
both (its calls move to the other)."""
from __future__ import annotations

import os
import signal
import threading
import time

import torch

import shoal
from shoal.dense_part import DensePart
from tests.test_predict import TABLES, batch, make_dlrm


def test_two_models_two_routers_one_killed(tmp_path):
    model_a, path_a = make_dlrm(str(tmp_path / "a"), 11)
    model_b, path_b = make_dlrm(str(tmp_path / "b"), 12)
    features = [n for n, _ in TABLES]
    with shoal.LocalCluster(servers=2, replication=2, routers=2,
                            data_dir=str(tmp_path / "c")) as cluster:
        assert len(set(cluster.router_addresses)) == 2
        client = cluster.client(timeout=60)
        client.load(path_a, model="a", dense_part=DensePart.dlrm(features))
        client.load(path_b, model="b", dense_part=DensePart.dlrm(features))
        models = {"a": model_a, "b": model_b}
        errors, done, stop = [], {"before": 0, "after": 0}, threading.Event()
        killed = threading.Event()

        def worker(k: int) -> None:
            c = cluster.client(timeout=30)
            try:
                for j in range(400):                      # bounded; stopped well before
                    if stop.is_set():
                        return
                    name = "ab"[(k + j) % 2]
                    d, s = batch(1000 * k + j, size=16)
                    got = c.predict(name, d, s)
                    with torch.no_grad():
                        want = models[name](d, s)[:, 0]
                    torch.testing.assert_close(got.scores, want, rtol=1e-5, atol=1e-5)
                    done["after" if killed.is_set() else "before"] += 1
            except Exception as e:                        # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                c.close()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while done["before"] < 40 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        # Both routers took requests before the kill.
        served = [shoal.connect(a, timeout=10).status().router.requests
                  for a in cluster.router_addresses]
        assert all(n > 0 for n in served), served
        os.kill(cluster.routers[1].pid, signal.SIGKILL)
        killed.set()
        deadline = time.monotonic() + 30
        while done["after"] < 40 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, repr(errors[0])
        assert done["before"] >= 40 and done["after"] >= 40, done
        client.close()
