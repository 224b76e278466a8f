"""Tables larger than memory: the same traffic on the same kind of cluster with every row in
memory, and with the servers' memory a small fraction (default 1/8) of the rows they hold.

    python bench/tiered.py [--rows 500000] [--tables 4] [--fraction 0.125] [--seconds 20]

2 shard servers (replication 2: each holds every row), ``--tables`` tables of ``--rows`` x
``--dim`` float32, 4 clients sending pooled lookups of 256 bags x 4 features x 20 ids drawn
from a Zipf distribution (the hottest ids scattered over the table), fresh ids every batch.
Phases: all resident at Zipf 1.05; then a cluster whose servers' budget leaves rows
``--fraction`` of what they hold, at Zipf 1.05 and then 1.2. Per phase: ids/s, p50 / p99 per
batch, the servers' hit rate (ids served from memory, as requests name them), CPU seconds per
batch of the router and of each server, each server's RSS (less an idle server's) against its budget, and the time
from the phase's start until the hit rate reached 95% of its steady value (the caches start
empty). Ratios against the all-resident phase. Writes bench/results/tiered.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cpu_seconds, percentiles, rss_bytes, write_result  # noqa: E402


class Traffic:
    """Zipf(a) batches, made ahead in a thread so clients never wait for numpy."""

    def __init__(self, tables: int, rows: int, batch: int, bag: int, seed: int):
        self.tables, self.rows, self.batch, self.bag = tables, rows, batch, bag
        self.perm = np.random.default_rng(12345).permutation(rows)
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()

    def next(self, a: float):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        n = self.tables * self.batch * self.bag
        with self.lock:
            ranks = self.rng.zipf(a, n) - 1
        ids = self.perm[np.minimum(ranks, self.rows - 1)]
        return KeyedJaggedTensor(keys=[f"f{i}" for i in range(self.tables)],
                                 values=torch.from_numpy(ids),
                                 lengths=torch.full((self.tables * self.batch,), self.bag,
                                                    dtype=torch.int32))


def server_counters(stubs) -> dict:
    from shoal.proto import shoal_pb2 as pb
    out = {}
    for sid, stub in stubs.items():
        s = stub.Stats(pb.StatsRequest(), timeout=10)
        out[sid] = (s.ids_looked_up, s.cold_ids, s.rss_bytes, s.resident_bytes,
                    s.store_memory_bytes, s.cache_bytes)
    return out


def hit_rate(a: dict, b: dict) -> float:
    ids = sum(b[s][0] - a[s][0] for s in b)
    cold = sum(b[s][1] - a[s][1] for s in b)
    return 1.0 - cold / ids if ids else float("nan")


def run_phase(cluster, traffic: Traffic, a: float, clients: int, seconds: float,
              warm_s: float, stubs, budget: int, idle: dict) -> dict:
    import shoal
    stop = threading.Event()
    log: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop():
        c = shoal.connect(cluster.router_address, timeout=60)
        try:
            while not stop.is_set():
                kjt = traffic.next(a)
                t0 = time.perf_counter()
                try:
                    c.lookup("tiered", kjt)
                except shoal.ShoalError as e:
                    errors.append(f"{e.code.name}: {e.message[:200]}")
                    continue
                with lock:
                    log.append((t0, time.perf_counter() - t0))
        finally:
            c.close()

    pids = {"router": cluster.router.pid, **{s.server_id: s.pid for s in cluster.servers}}
    start = time.perf_counter()
    c0 = server_counters(stubs)
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    # Warm-up: the hit rate each second, until warm_s.
    curve, prev = [], c0
    while time.perf_counter() - start < warm_s:
        time.sleep(1.0)
        now = server_counters(stubs)
        curve.append((round(time.perf_counter() - start, 1), round(hit_rate(prev, now), 4)))
        prev = now
    t_begin = time.perf_counter()
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    s0 = server_counters(stubs)
    n0 = len(log)
    rss_peak = {s: 0 for s in stubs}
    while time.perf_counter() - t_begin < seconds:
        time.sleep(1.0)
        for s in cluster.servers:
            rss_peak[s.server_id] = max(rss_peak[s.server_id], rss_bytes(s.pid))
    s1 = server_counters(stubs)
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    window = [lat for t0, lat in log[n0:] if t0 >= t_begin]
    elapsed = time.perf_counter() - t_begin
    stop.set()
    for t in threads:
        t.join(60)
    batches = len(window)
    steady = hit_rate(s0, s1)
    warm_at = next((t for t, h in curve if h >= 0.95 * steady), None)
    ids_per_batch = traffic.tables * traffic.batch * traffic.bag
    return {
        "zipf": a, "batches": batches, "errors": len(errors), "first_errors": errors[:3],
        "ids_per_s": round(batches * ids_per_batch / elapsed),
        **percentiles(window), "hit_rate": round(steady, 4),
        "hit_rate_curve": curve, "time_to_95pct_hit_rate_s": warm_at,
        "cpu_s_per_batch": {k: round((cpu1[k] - cpu0[k]) / max(1, batches), 5) for k in pids},
        "rss_mib": {s: round(v / 2**20, 1) for s, v in rss_peak.items()},
        "budget_mib": round(budget / 2**20, 1),
        "rss_idle_mib": {s: round(v / 2**20, 1) for s, v in idle.items()},
        # What serving the rows added to an idle server (Python, torch and gRPC: ~250 MB here)
        "rss_over_budget": {s: round((v - idle[s]) / budget, 3) for s, v in rss_peak.items()},
        "memory_mib": {s: {"rows": round(v[3] / 2**20, 1), "rocksdb": round(v[4] / 2**20, 1),
                           "row_cache": round(v[5] / 2**20, 1)} for s, v in s1.items()},
    }


def cluster_run(args, budget: int, zipfs: list[float], data_dir: str) -> list[dict]:
    import shoal
    from shoal.proto import shoal_pb2_grpc as pbg
    from shoal.serving import channel
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=args.rows,
                                 feature_names=[f"f{i}"]) for i in range(args.tables)]
    cfg = shoal.ShoalConfig().replace(server__memory_budget_bytes=budget,
                                      server__cache_policy=args.policy,
                                      server__read_chunks=args.read_chunks)
    out = []
    with shoal.LocalCluster(servers=2, replication=2, config=cfg, data_dir=data_dir) as cluster:
        idle = {s.server_id: rss_bytes(s.pid) for s in cluster.servers}
        client = cluster.client()
        client.create_model("tiered", tables)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for t in tables:
            for lo in range(0, args.rows, 250_000):
                hi = min(args.rows, lo + 250_000)
                client.write_rows("tiered", t.name, torch.arange(lo, hi),
                                  torch.randn(hi - lo, args.dim, generator=g))
        print(f"  filled in {time.perf_counter() - t0:.1f} s", flush=True)
        time.sleep(3.0)                   # the servers trim their heaps once writes stop
        m = client.status().map
        stubs = {s.server_id: pbg.ShardServerStub(channel(s.address)) for s in m.servers}
        traffic = Traffic(args.tables, args.rows, args.batch, args.bag, seed=1)
        for a in zipfs:
            r = run_phase(cluster, traffic, a, args.clients, args.seconds, args.warm_s, stubs,
                          budget, idle)
            print(f"  zipf {a}: {r['ids_per_s'] / 1e6:.2f} M ids/s, p50 {r.get('p50_ms')} ms, "
                  f"p99 {r.get('p99_ms')} ms, hit rate {r['hit_rate']}, "
                  f"RSS/budget {r['rss_over_budget']}", flush=True)
            out.append(r)
        client.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--bag", type=int, default=20, help="ids per bag")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.125)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warm-s", type=float, default=20.0)
    ap.add_argument("--policy", default="lfu")
    ap.add_argument("--read-chunks", type=int, default=8)
    args = ap.parse_args()
    from shards import tiers
    torch.set_num_threads(1)
    held = args.tables * args.rows * args.dim * 4
    small = tiers.budget_for_rows(int(held * args.fraction))
    big = tiers.budget_for_rows(held + (16 << 20))
    result = {"config": vars(args), "held_mib_per_server": round(held / 2**20, 1)}
    with tempfile.TemporaryDirectory(prefix="shoal-tiered-") as d:
        print(f"all resident (budget {big / 2**20:.0f} MiB)", flush=True)
        resident = cluster_run(args, big, [1.05], os.path.join(d, "resident"))
        print(f"memory = {args.fraction} of the rows (budget {small / 2**20:.0f} MiB)",
              flush=True)
        tiered = cluster_run(args, small, [1.05, 1.2], os.path.join(d, "tiered"))
    base = resident[0]
    result["resident"] = base
    result["tiered"] = tiered
    t = tiered[0]
    result["ratios_zipf_1.05"] = {
        "throughput": round(t["ids_per_s"] / base["ids_per_s"], 3),
        "p99": round(t["p99_ms"] / base["p99_ms"], 3),
        "p50": round(t["p50_ms"] / base["p50_ms"], 3)}
    print("ratios at zipf 1.05 (memory = 1/8 vs all resident):", result["ratios_zipf_1.05"])
    print("wrote", write_result("tiered", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
