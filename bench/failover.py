"""Steady lookup load on a local cluster of 3 shard servers (replication 2); one is SIGKILLed.

    python bench/failover.py

Reports failed queries (target 0), p99 in the 10 s after the kill as a ratio of the steady p99
before it (target <= 3), the time until the coordinator declared the server dead, the time to
restore the replication factor, and the MB/s copied to build the new replicas. Writes
bench/results/failover.json.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (QueryLoad, add_load_args, load_workload, percentiles,  # noqa: E402
                          write_result)


def main() -> int:
    ap = argparse.ArgumentParser()
    add_load_args(ap)
    ap.add_argument("--after-s", type=float, default=10.0)
    ap.add_argument("--lease-s", type=float, default=2.0)
    ap.add_argument("--data-dir", default=None, help="keep the cluster's files (and logs) here")
    ap.add_argument("--profile-dir", default="",
                    help="record the router and the surviving servers with py-spy (--gil) "
                         "from the kill on, one raw profile per process, in this folder")
    args = ap.parse_args()

    import shoal
    from shoal.proto import shoal_pb2 as pb
    from shoal.proto import shoal_pb2_grpc as pbg
    from shoal.serving import channel

    torch.set_num_threads(1)
    tables, batches = load_workload(args)
    cfg = shoal.ShoalConfig().replace(coordinator__lease_s=args.lease_s,
                                      server__heartbeat_interval_s=args.lease_s / 8)
    if args.rebuild_mib_per_s:
        cfg = cfg.replace(server__rebuild_mib_per_s=args.rebuild_mib_per_s)
    with shoal.LocalCluster(servers=3, replication=2, config=cfg,
                            data_dir=args.data_dir) as cluster:
        client = cluster.client()
        client.create_model("fo", tables)
        for t in tables:
            client.write_rows("fo", t.name, torch.arange(args.rows),
                              torch.randn(args.rows, args.dim))
        coord = pbg.CoordinatorStub(channel(cluster.coordinator_address))

        def shard_map():
            return coord.GetShardMap(pb.GetShardMapRequest(), timeout=10).map

        load = QueryLoad(cluster.router_address, "fo", batches, args.clients).start()
        time.sleep(args.steady_s)
        before = shard_map()
        victim = cluster.servers[0]
        lost = [rs for rs in before.partitions if victim.server_id in rs.replicas]
        lost_bytes = 0
        for rs in lost:
            spec = next(t for md in before.models for t in md.tables
                        if t.table_uid == rs.table_uid)
            lost_bytes += -(-spec.num_embeddings // spec.num_partitions) * spec.dim * 4
        profilers = []
        if args.profile_dir:
            import shutil
            import subprocess
            os.makedirs(args.profile_dir, exist_ok=True)
            spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable),
                                                         "py-spy")
            for name, pid in [("router", cluster.router.pid)] + [
                    (s.server_id, s.pid) for s in cluster.servers[1:]]:
                profilers.append(subprocess.Popen(
                    [spy, "record", "-p", str(pid), "-d", str(int(args.after_s)), "-r", "100",
                     "--gil", "-f", "raw", "-o", os.path.join(args.profile_dir, f"{name}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        t_kill = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        t_dead = t_restored = None
        deadline = t_kill + 300
        while time.perf_counter() < deadline:
            m = shard_map()
            if t_dead is None and not any(victim.server_id in rs.replicas
                                          for rs in m.partitions):
                t_dead = time.perf_counter()
            if t_dead is not None and all(len(rs.replicas) == 2 and not rs.learners
                                          for rs in m.partitions):
                t_restored = time.perf_counter()
                break
            time.sleep(0.05)
        time.sleep(max(0.0, t_kill + args.after_s - time.perf_counter()))
        load.stop()
        for p in profilers:
            p.wait(60)
        router = client.status().router
        client.close()

    log, errors = load.log, load.errors
    steady = [lat for t0, lat, ok in log if t_kill - args.steady_s <= t0 < t_kill and ok]
    after = [lat for t0, lat, ok in log if t_kill <= t0 < t_kill + args.after_s and ok]
    failed = sum(1 for _, _, ok in log if not ok)
    p_steady, p_after = percentiles(steady), percentiles(after)
    ratio = p_after["p99_ms"] / p_steady["p99_ms"]
    restore_s = (t_restored - t_kill) if t_restored else None
    copy_s = (t_restored - t_dead) if t_restored else None
    mb_s = lost_bytes / 2**20 / copy_s if copy_s else None
    print(f"queries: {len(log)}, failed: {failed} (target 0)")
    for e in sorted(set(errors))[:5]:
        print(f"  error: {e}")
    print(f"steady p99 {p_steady['p99_ms']:.1f} ms; p99 in the {args.after_s:.0f} s after the "
          f"kill {p_after['p99_ms']:.1f} ms = {ratio:.2f}x (target <= 3)")
    print(f"declared dead after {t_dead - t_kill:.1f} s (lease {args.lease_s} s); replication "
          f"restored {restore_s:.1f} s after the kill; {len(lost)} partitions, "
          f"{lost_bytes / 2**20:.0f} MiB rebuilt at {mb_s:.0f} MiB/s")
    print(f"router: {router.replica_retries} replica retries, {router.hedges} hedges")
    slowest = sorted(((x, t0 - t_kill) for t0, x, ok in log if t0 >= t_kill - 1), reverse=True)[:12]
    print("slowest after the kill (latency ms @ s after kill): " + ", ".join(
        f"{x * 1e3:.0f}@{at:+.2f}" for x, at in slowest))
    windows = {"kill_to_dead": (t_kill, t_dead), "dead_to_restored": (t_dead, t_restored),
               "restored_on": (t_restored, t_kill + args.after_s)}
    phases = {}
    for name, (lo, hi) in windows.items():
        lat = [x for t0, x, ok in log if lo is not None and hi is not None and lo <= t0 < hi]
        phases[name] = {"queries": len(lat), **percentiles(lat)}
        if lat:
            print(f"  {name}: {len(lat)} queries, p50 {phases[name]['p50_ms']:.1f} ms, "
                  f"p99 {phases[name]['p99_ms']:.1f} ms")
    path = write_result("failover", {
        "config": vars(args), "queries": len(log), "failed_queries": failed,
        "errors": sorted(set(errors))[:20],
        "steady": p_steady, "after_kill": p_after, "p99_ratio": round(ratio, 3),
        "declared_dead_s": round(t_dead - t_kill, 3),
        "replication_restored_s": round(restore_s, 3) if restore_s else None,
        "partitions_rebuilt": len(lost), "bytes_rebuilt": lost_bytes,
        "rebuild_mib_per_s": round(mb_s, 1) if mb_s else None,
        "phases": phases,
        "timeline": [[round(t0 - t_kill, 3), round(x * 1e3, 1)] for t0, x, ok in log
                     if t0 >= t_kill - 2],
        "router": {"replica_retries": router.replica_retries, "hedges": router.hedges}})
    print(f"wrote {path}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
