"""Pooled lookups through a local Shoal cluster beside an in-process torchrec
EmbeddingBagCollection with the same weights, in one run.

    python bench/lookup.py                 # 8 tables x 1M rows x dim 64, batch 512, bag 20
    python bench/lookup.py --rows 100000   # quicker

Reports ids/s for both and the ratio, p50 / p99 per batch, CPU-seconds per batch in each
process, and each server's RSS against the raw bytes of the rows it holds. Writes
bench/results/lookup.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cpu_seconds, percentiles, rss_bytes, write_result  # noqa: E402


def run_baseline(ebc, batches, seconds: float) -> dict:
    torch.set_num_threads(1)
    lat, ids = [], 0
    t_cpu = time.process_time()
    start = time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - start < seconds:
            for kjt in batches:
                t = time.perf_counter()
                ebc(kjt)
                lat.append(time.perf_counter() - t)
                ids += kjt.values().numel()
    wall = time.perf_counter() - start
    return {"ids_per_s": ids / wall, "batches": len(lat), **percentiles(lat),
            "cpu_s_per_batch": (time.process_time() - t_cpu) / len(lat)}


def run_shoal(cluster, batches, seconds: float, clients: int) -> dict:
    lat, ids = [], [0]
    lock = threading.Lock()
    pids = {"router": cluster.router.pid, "client": os.getpid(),
            **{f"server {h.server_id}": h.pid for h in cluster.servers}}
    conns = [cluster.client() for _ in range(clients)]   # its credentials, where security is on
    for c in conns:                       # warm up channels and the router's batcher
        c.lookup("bench", batches[0])
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    start = time.perf_counter()
    stop_at = start + seconds

    def worker(i: int) -> None:
        c, mine, n = conns[i], [], 0
        j = i
        while time.perf_counter() < stop_at:
            kjt = batches[j % len(batches)]
            t = time.perf_counter()
            c.lookup("bench", kjt)
            mine.append(time.perf_counter() - t)
            n += kjt.values().numel()
            j += clients
        with lock:
            lat.extend(mine)
            ids[0] += n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu = {k: (cpu_seconds(p) - cpu0[k]) / len(lat) for k, p in pids.items()}
    for c in conns:
        c.close()
    return {"ids_per_s": ids[0] / wall, "batches": len(lat), **percentiles(lat),
            "cpu_s_per_batch": {k: round(v, 5) for k, v in cpu.items()},
            "clients": clients}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--bag", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--replication", type=int, default=0)
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--dedup", action="store_true", help="router sends unique ids + inverse")
    ap.add_argument("--window-ms", type=float, default=None)
    ap.add_argument("--secure", action="store_true",
                    help="TLS on every port and roles checked (certificates from shoal certs)")
    ap.add_argument("--huge-pages", action="store_true",
                    help="memory tier on transparent huge pages (server.arena_huge_pages)")
    ap.add_argument("--name", default="lookup", help="results file: bench/results/NAME.json")
    ap.add_argument("--data-dir", default=None, help="keep the cluster's data and logs here")
    args = ap.parse_args()

    import shoal
    from embeddings.synthetic import random_kjt
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim,
                                 num_embeddings=args.rows, feature_names=[f"f{i}"])
              for i in range(args.tables)]
    ebc = EmbeddingBagCollection(tables=tables)
    rng = np.random.default_rng(0)
    features = [f"f{i}" for i in range(args.tables)]
    batches = [random_kjt(rng, features, [args.rows] * args.tables, args.batch, args.bag,
                          args.alpha, fixed_bag=True) for _ in range(64)]
    ids_per_batch = batches[0].values().numel()
    print(f"batch: {args.batch} samples x {args.tables} features x {args.bag} ids = "
          f"{ids_per_batch} ids", flush=True)

    # The machine is shared and noisy: the baseline runs before and after Shoal (with the
    # cluster stopped both times) and the ratio uses their mean.
    before = run_baseline(ebc, batches, args.seconds / 2)
    print(f"torchrec EBC in-process, 1 thread: {before['ids_per_s'] / 1e6:.2f} M ids/s, "
          f"p50 {before['p50_ms']:.2f} ms, p99 {before['p99_ms']:.2f} ms", flush=True)

    cfg = shoal.ShoalConfig().replace(router__dedup_pooled=args.dedup,
                                      server__arena_huge_pages=args.huge_pages)
    if args.window_ms is not None:
        cfg = cfg.replace(router__batch_window_ms=args.window_ms)
    if args.secure:
        import json
        import tempfile

        from shoal.certs import make_certs
        sec = json.load(open(make_certs(tempfile.mkdtemp(prefix="bench-certs-"))["config"]))
        cfg = cfg.replace(security=shoal.ShoalConfig.from_json(json.dumps(sec)).security)
    with shoal.LocalCluster(servers=args.servers, replication=args.replication,
                            config=cfg, data_dir=args.data_dir) as cluster:
        client = cluster.client()
        client.create_model("bench", tables)
        t0 = time.perf_counter()
        with torch.no_grad():
            for t in tables:
                client.write_rows("bench", t.name, torch.arange(args.rows),
                                  ebc.embedding_bags[t.name].weight)
        fill_s = time.perf_counter() - t0
        raw = args.tables * args.rows * args.dim * 4
        print(f"filled {raw / 2**30:.2f} GiB (x{cluster.replication} replicas) in "
              f"{fill_s:.1f}s", flush=True)
        # Correctness before speed: one batch against the oracle.
        with torch.no_grad():
            diff = float((client.lookup("bench", batches[1]).values()
                          - ebc(batches[1]).values()).abs().max())
        shoal_res = run_shoal(cluster, batches, args.seconds, args.clients)
        st = client.status()
        r = st.router
        router_stats = {"requests": r.requests, "batches": r.batches, "hedges": r.hedges,
                        "hedge_wins": r.hedge_wins, "replica_retries": r.replica_retries,
                        "redirects": r.redirects}
        servers = {}
        for s in st.map.servers:
            rss = rss_bytes(cluster.server(s.server_id).pid)
            servers[s.server_id] = {"raw_bytes_held": s.stats.raw_bytes, "rss_bytes": rss,
                                    "rss_over_raw": round(rss / max(1, s.stats.raw_bytes), 3),
                                    "ids_served": s.stats.ids_looked_up}
        client.close()

    after = run_baseline(ebc, batches, args.seconds / 2)
    print(f"torchrec EBC again, after: {after['ids_per_s'] / 1e6:.2f} M ids/s", flush=True)
    baseline = {"ids_per_s": (before["ids_per_s"] + after["ids_per_s"]) / 2,
                "before": before, "after": after}
    ratio = shoal_res["ids_per_s"] / baseline["ids_per_s"]
    print(f"shoal ({args.servers} servers, {args.clients} clients): "
          f"{shoal_res['ids_per_s'] / 1e6:.2f} M ids/s, p50 {shoal_res['p50_ms']:.2f} ms, "
          f"p99 {shoal_res['p99_ms']:.2f} ms")
    print(f"ratio shoal / in-process (mean {baseline['ids_per_s'] / 1e6:.2f} M ids/s): "
          f"{ratio:.2f}x (target >= 0.3x)")
    print("CPU-seconds per batch: " + ", ".join(f"{k} {v * 1e3:.2f} ms"
                                                for k, v in shoal_res["cpu_s_per_batch"].items()))
    for sid, s in servers.items():
        print(f"server {sid}: RSS {s['rss_bytes'] / 2**30:.2f} GiB for "
              f"{s['raw_bytes_held'] / 2**30:.2f} GiB of rows = {s['rss_over_raw']:.2f}x "
              "(target <= 1.3x)")
    print(f"max |shoal - torchrec| on a checked batch: {diff:.3g}")
    print(f"router: {router_stats['requests']} requests in {router_stats['batches']} batches, "
          f"{router_stats['hedges']} hedged ({router_stats['hedge_wins']} won by the hedge), "
          f"{router_stats['replica_retries']} replica retries")
    path = write_result(args.name, {
        "config": vars(args), "ids_per_batch": ids_per_batch, "fill_seconds": round(fill_s, 2),
        "baseline_torchrec_ebc": baseline, "shoal": shoal_res, "ratio": round(ratio, 3),
        "servers": servers, "router": router_stats, "max_abs_diff": diff})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
