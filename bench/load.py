"""Loading a checkpoint: a generated torch.distributed.checkpoint of >= 2 GB loaded into a
2-server cluster (replication 2), end to end (read, stream, store on both replicas, verify),
beside this machine's floor in the same run: one process writing the same rows as SST files
and ingesting them into one local RocksDB (Shoal's own storage code), reading them from the
same checkpoint reader.

    python bench/load.py [--gib 2] [--chunk-mib 64]

Reports GB/s of both and their ratio (target >= 0.5), for the serving configuration (each
server fills its memory tier with the rows it stores), with memory budget 0 (RocksDB only:
the same storage work as the floor), and the serving configuration with every chunk sent as
rows (``transfer="rows"``: each replica writes its own SST files, as a replica on another
host does), with the CPU seconds of each process. The first two link SST files the loader
writes once (``shards.spool``). Writes bench/results/load.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_result  # noqa: E402

DIM = 64
TABLES = 8


def make_checkpoint(path: str, gib: float) -> int:
    """A DCP checkpoint of TABLES float32 tables of dim DIM, ``gib`` GiB together."""
    import torch.distributed.checkpoint as dcp

    rows = int(gib * 2**30 / (TABLES * DIM * 4))
    sd = {}
    g = torch.Generator().manual_seed(0)
    for i in range(TABLES):
        sd[f"sparse_arch.embedding_bag_collection.embedding_bags.t_{i}.weight"] = \
            torch.randn(rows, DIM, generator=g)
    sd["over_arch.weight"] = torch.randn(16, 16, generator=g)
    dcp.save(sd, checkpoint_id=path, no_dist=True)
    return rows


def floor(path: str, chunk_bytes: int, data_dir: str) -> tuple[int, float]:
    """One process: read every table, write it as SST files (one per partition, as a shard
    server does) and ingest them into one RocksDB, through Shoal's own storage code."""
    from embeddings.checkpoint import embedding_tables, open_checkpoint
    from embeddings.partition import choose_num_partitions, partition_of
    from shards.storage import RocksRowStore
    from shoal.config import CoordinatorConfig
    from shoal.serving import heap_kept

    cc = CoordinatorConfig()
    store = RocksRowStore(data_dir, sst_threshold_rows=1)
    nbytes = 0
    t0 = time.perf_counter()
    with heap_kept(4 * chunk_bytes), open_checkpoint(path) as r:   # buffers reused, as Shoal's
        infos = r.tensors()
        for uid, (name, key) in enumerate(sorted(embedding_tables(infos).items()), 1):
            n = infos[key].shape[0]
            P = choose_num_partitions(n, DIM * 4, cc.target_partition_bytes, cc.min_partitions,
                                      cc.max_partitions)       # what the cluster's table gets
            step = max(1, chunk_bytes // (DIM * 4))
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                rows = r.read_rows(key, lo, hi).numpy()
                ids = np.arange(lo, hi, dtype=np.int64)
                store.bulk_write(uid, partition_of(ids, P), ids, rows)
                nbytes += rows.nbytes
    dt = time.perf_counter() - t0
    store.close()
    return nbytes, dt


def cluster_load(ckpt: str, chunk: int, data_dir: str, cfg, transfer: str = "auto"):
    """(LoadResult, seconds, CPU seconds of each server and of this loading process) of one
    load into a new 2-server cluster."""
    import shoal
    from bench.common import cpu_seconds

    with shoal.LocalCluster(servers=2, replication=2, data_dir=data_dir, config=cfg) as cluster:
        client = cluster.client(timeout=600)
        pids = {h.server_id: h.pid for h in cluster.servers} | {"loader": os.getpid()}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = time.perf_counter()
        res = client.load(ckpt, model="big", chunk_bytes=chunk, transfer=transfer)
        s_s = time.perf_counter() - t0
        cpu = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
        client.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    return res, s_s, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0, help="checkpoint size")
    ap.add_argument("--chunk-mib", type=float, default=16.0)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()

    import shoal

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="shoal-load-bench-")
    try:
        ckpt = os.path.join(work, "ckpt")
        t0 = time.perf_counter()
        rows = make_checkpoint(ckpt, args.gib)
        print(f"wrote a {args.gib:.1f} GiB DCP checkpoint ({TABLES} tables x {rows:,} rows x "
              f"dim {DIM}) in {time.perf_counter() - t0:.1f} s")
        chunk = int(args.chunk_mib * 2**20)
        f_bytes, f_s = floor(ckpt, chunk, os.path.join(work, "floor"))
        shutil.rmtree(os.path.join(work, "floor"), ignore_errors=True)
        print(f"floor (1 process, SST write + ingest, 1 RocksDB): {f_bytes / 1e9:.2f} GB in "
              f"{f_s:.1f} s = {f_bytes / 1e9 / f_s:.3f} GB/s")
        result = {"config": vars(args), "bytes": f_bytes, "tables": TABLES, "rows": rows,
                  "dim": DIM, "floor_seconds": round(f_s, 2),
                  "floor_gb_per_s": round(f_bytes / 1e9 / f_s, 3)}
        # The serving configuration (each server fills its memory tier with the rows it
        # stores), then RocksDB only (memory budget 0: the same storage work as the floor).
        for label, budget, transfer in (("", None, "auto"), ("rocksdb_only_", 0, "auto"),
                                        ("rows_", None, "rows")):
            cfg = shoal.ShoalConfig() if budget is None else \
                shoal.ShoalConfig().replace(server__memory_budget_bytes=budget)
            res, s_s, cpu = cluster_load(ckpt, chunk, os.path.join(work, f"cluster{label}"), cfg,
                                         transfer)
            ratio = (res.bytes / s_s) / (f_bytes / f_s)
            what = ("memory tier filled" if budget is None else
                    "memory budget 0, RocksDB only") + \
                (f", {res.spooled_files} spooled files" if transfer == "auto" else ", as rows")
            print(f"shoal load (2 servers, replication 2, verified, {what}): "
                  f"{res.bytes / 1e9:.2f} GB in {s_s:.1f} s = {res.bytes / 1e9 / s_s:.3f} GB/s, "
                  f"ratio {ratio:.2f} (target >= 0.5); CPU s: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
            result.update({f"{label}shoal_seconds": round(s_s, 2),
                           f"{label}shoal_gb_per_s": round(res.bytes / 1e9 / s_s, 3),
                           f"{label}ratio": round(ratio, 3),
                           f"{label}spooled_files": res.spooled_files,
                           f"{label}cpu_seconds": {k: round(v, 2) for k, v in cpu.items()}})
        print(f"wrote {write_result('load', result)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
