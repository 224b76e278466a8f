"""Resharding under load: a local cluster of 2 shard servers (replication 2) grows to 4 while
4 clients query it.

    python bench/reshard.py

Reports throughput and p99 while partitions move, as ratios of the steady state before
(targets >= 0.5 and <= 3), failed queries (target 0), and the MiB/s migrated. Writes
bench/results/reshard.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (QueryLoad, add_load_args, load_workload, percentiles,  # noqa: E402
                          write_result)


def main() -> int:
    ap = argparse.ArgumentParser()
    add_load_args(ap)
    ap.add_argument("--to", type=int, default=4, help="servers to grow to (from 2)")
    args = ap.parse_args()

    import shoal

    torch.set_num_threads(1)
    tables, batches = load_workload(args)
    cfg = shoal.ShoalConfig()
    if args.rebuild_mib_per_s:
        cfg = cfg.replace(server__rebuild_mib_per_s=args.rebuild_mib_per_s)
    with shoal.LocalCluster(servers=2, replication=2, config=cfg) as cluster:
        client = cluster.client()
        client.create_model("rs", tables)
        for t in tables:
            client.write_rows("rs", t.name, torch.arange(args.rows),
                              torch.randn(args.rows, args.dim))
        load = QueryLoad(cluster.router_address, "rs", batches, args.clients).start()
        time.sleep(args.steady_s)
        t_start = time.perf_counter()
        for _ in range(args.to - 2):
            cluster.add_server()
        t_added = time.perf_counter()
        plan = cluster.rebalance(wait=True)
        t_done = time.perf_counter()
        time.sleep(2.0)
        load.stop()
        router = client.status().router
        client.close()

    log, errors = load.log, load.errors

    def window(lo, hi):
        rows = [(lat, ok) for t0, lat, ok in log if lo <= t0 < hi]
        return [lat for lat, ok in rows if ok], (hi - lo)

    steady, steady_s = window(t_start - args.steady_s, t_start)
    adding, adding_s = window(t_start, t_added)          # new processes start: not moves yet
    during, during_s = window(t_added, t_done)
    failed = sum(1 for _, _, ok in log if not ok)
    p_steady, p_during = percentiles(steady), percentiles(during)
    qps_steady, qps_during = len(steady) / steady_s, len(during) / during_s
    moved = sum(m.bytes for m in plan.moves)
    copy_s = t_done - t_added
    result = {
        "config": vars(args), "queries": len(log), "failed_queries": failed,
        "errors": sorted(set(errors))[:20],
        "steady": {**p_steady, "batches_per_s": round(qps_steady, 2)},
        "adding_servers": {**percentiles(adding),
                           "batches_per_s": round(len(adding) / adding_s, 2) if adding_s else 0},
        "during_moves": {**p_during, "batches_per_s": round(qps_during, 2)},
        "throughput_ratio": round(qps_during / qps_steady, 3),
        "p99_ratio": round(p_during["p99_ms"] / p_steady["p99_ms"], 3),
        "moves": len(plan.moves), "bytes_moved": moved,
        "seconds_adding_servers": round(t_added - t_start, 2),
        "seconds_moving": round(copy_s, 2),
        "migration_mib_per_s": round(moved / 2**20 / copy_s, 1) if copy_s else None,
        "bytes_per_server_before": dict(plan.bytes_before),
        "bytes_per_server_after": dict(plan.bytes_after),
        "router": {"redirects": router.redirects, "replica_retries": router.replica_retries,
                   "hedges": router.hedges}}
    print(f"queries: {len(log)}, failed: {failed} (target 0)")
    for e in result["errors"][:5]:
        print(f"  error: {e}")
    print(f"steady: {qps_steady:.1f} batches/s, p99 {p_steady['p99_ms']:.1f} ms; while moving: "
          f"{qps_during:.1f} batches/s, p99 {p_during['p99_ms']:.1f} ms")
    print(f"throughput ratio {result['throughput_ratio']:.2f} (target >= 0.5), p99 ratio "
          f"{result['p99_ratio']:.2f} (target <= 3)")
    print(f"2 -> {args.to} servers: {len(plan.moves)} moves, {moved / 2**20:.0f} MiB in "
          f"{copy_s:.1f} s = {result['migration_mib_per_s']} MiB/s")
    print(f"wrote {write_result('reshard', result)}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
