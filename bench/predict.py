"""Online scoring of a DLRM-shaped model: Shoal's predict beside (a) the same model in one
process and (b) the common alternative of keeping embeddings in Redis (redis-server from
Debian's packages, started here; MGET of the rows, pooling and the dense part in the client),
in one run, from the same concurrent clients.

    python bench/predict.py [--seconds 15] [--procs 4] [--threads 8] [--row-cache-rows N]

Requests: 64 candidates, each with 13 dense features and one id in each of 26 sparse
features (Zipf-distributed ids), scored by a torchrec DLRM with random weights. Clients are
``--procs`` processes of ``--threads`` threads each, every one sending requests back to
back. Reports requests/s and p50 / p99 of each, and the ratios (target: Shoal >= 2x the
Redis alternative's throughput with a p99 no higher). Writes bench/results/predict.json.
Needs ``redis-server`` (apt-get install redis-server) and the ``redis`` package (the
``bench`` extra).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cpu_seconds, percentiles, write_result  # noqa: E402

DENSE_IN = 13
FEATURES = [f"cat_{i}" for i in range(26)]


def make_model(rows: int, dim: int):
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f, embedding_dim=dim, num_embeddings=rows, feature_names=[f])
        for f in FEATURES])
    return DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE_IN,
                dense_arch_layer_sizes=[64, dim], over_arch_layer_sizes=[128, 64, 1]).eval()


def make_requests(n: int, candidates: int, rows: int, alpha: float):
    """n requests: (dense [candidates, 13], ids int64 [26, candidates])."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        ids = np.minimum(rng.zipf(alpha, size=(len(FEATURES), candidates)) - 1, rows - 1)
        ids = (ids * 2654435761) % rows             # hot ids spread over the table
        out.append((rng.standard_normal((candidates, DENSE_IN)).astype(np.float32),
                    ids.astype(np.int64)))
    return out


def to_kjt(ids: np.ndarray):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    return KeyedJaggedTensor.from_lengths_sync(
        FEATURES, torch.from_numpy(ids.reshape(-1)),
        torch.ones(ids.size, dtype=torch.int32))


# ---------------------------------------------------------------- the clients

def _client_proc(system: str, target, requests, seconds: float, threads: int, start_at: float,
                 dense_params, dim: int, out) -> None:
    """One client process: ``threads`` threads sending requests back to back."""
    import threading
    torch.set_num_threads(1)
    lat, lock = [], threading.Lock()
    if system == "redis":
        import redis
        from shoal.dense_part import DensePart
        scorer = DensePart.dlrm(FEATURES).build(dense_params, [dim] * len(FEATURES))
        keys = [[f"{f}:{i}".encode() for f, row in zip(FEATURES, ids) for i in row.tolist()]
                for _, ids in requests]          # built once: the alternative's best case

    def worker(k: int) -> None:
        if system == "shoal":
            import shoal
            c = shoal.connect(target, timeout=60)
            kjts = [to_kjt(ids) for _, ids in requests]
            dense = [torch.from_numpy(d) for d, _ in requests]
        else:
            r = redis.Redis(host="127.0.0.1", port=target)
        mine, j = [], k
        while time.time() < start_at:
            time.sleep(0.001)
        stop = start_at + seconds
        while time.time() < stop:
            i = j % len(requests)
            t = time.perf_counter()
            if system == "shoal":
                c.predict("dlrm", dense[i], kjts[i])
            else:
                vals = r.mget(keys[i])
                emb = np.frombuffer(b"".join(vals), np.float32).reshape(
                    len(FEATURES), -1, dim).transpose(1, 0, 2)       # [candidates, 26, dim]
                scorer.scores(torch.from_numpy(requests[i][0]),
                              torch.from_numpy(np.ascontiguousarray(emb)).reshape(len(emb), -1))
            mine.append(time.perf_counter() - t)
            j += threads
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = time.process_time()
    for t in ts:
        t.join()
    out.put((lat, time.process_time() - cpu0))


def run_clients(system: str, target, requests, args, dense_params, pids: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 8.0                     # spawned interpreters import torch first
    procs = [ctx.Process(target=_client_proc, args=(system, target, requests, args.seconds,
                                                     args.threads, start_at, dense_params,
                                                     args.dim, q))
             for _ in range(args.procs)]
    for p in procs:
        p.start()
    while time.time() < start_at:
        time.sleep(0.01)
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    lat, client_cpu = [], 0.0
    for _ in procs:
        got, used = q.get(timeout=args.seconds + 120)
        lat.extend(got)
        client_cpu += used
    cpu = {k: round(cpu_seconds(p) - cpu0[k], 2) for k, p in pids.items()}
    cpu["clients"] = round(client_cpu, 2)
    for p in procs:
        p.join(30)
    return {"requests_per_s": len(lat) / args.seconds, "requests": len(lat),
            **percentiles(lat), "cpu_seconds": cpu}


# ---------------------------------------------------------------- the systems

def in_process(model, requests, seconds: float) -> dict:
    torch.set_num_threads(1)
    kjts = [(torch.from_numpy(d), to_kjt(ids)) for d, ids in requests]
    lat = []
    stop = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < stop:
            for d, kjt in kjts:
                t = time.perf_counter()
                model(d, kjt)
                lat.append(time.perf_counter() - t)
    return {"requests_per_s": len(lat) / seconds, **percentiles(lat)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_redis(model, requests, args, dense_params, work: str) -> dict:
    import redis
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", work],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        t0 = time.perf_counter()
        with torch.no_grad():
            for f in FEATURES:
                w = model.sparse_arch.embedding_bag_collection.embedding_bags[f].weight.numpy()
                for lo in range(0, len(w), 20_000):
                    chunk = w[lo: lo + 20_000]
                    r.mset({f"{f}:{lo + i}".encode(): chunk[i].tobytes()
                            for i in range(len(chunk))})
        fill = time.perf_counter() - t0
        # Correctness first: one request against the model.
        from shoal.dense_part import DensePart
        scorer = DensePart.dlrm(FEATURES).build(dense_params, [args.dim] * len(FEATURES))
        d, ids = requests[0]
        vals = r.mget([f"{f}:{i}".encode() for f, row in zip(FEATURES, ids) for i in row.tolist()])
        emb = np.frombuffer(b"".join(vals), np.float32).reshape(len(FEATURES), -1, args.dim)
        got = scorer.scores(torch.from_numpy(d), torch.from_numpy(
            np.ascontiguousarray(emb.transpose(1, 0, 2))).reshape(len(d), -1))
        with torch.no_grad():
            diff = float((got - model(torch.from_numpy(d), to_kjt(ids))[:, 0]).abs().max())
        res = run_clients("redis", port, requests, args, dense_params, {"redis": proc.pid})
        res.update(fill_seconds=round(fill, 1), max_abs_diff=diff)
        return res
    finally:
        proc.terminate()
        proc.wait(10)


def run_shoal(model, requests, args, work: str) -> dict:
    import torch.distributed.checkpoint as dcp

    import shoal
    ckpt = os.path.join(work, "ckpt")
    dcp.save(model.state_dict(), checkpoint_id=ckpt, no_dist=True)
    cfg = shoal.ShoalConfig()
    if args.window_ms is not None:
        cfg = cfg.replace(router__predict_window_ms=args.window_ms)
    if args.row_cache_rows:
        cfg = cfg.replace(router__row_cache_rows=args.row_cache_rows)
    with shoal.LocalCluster(servers=2, replication=2, routers=args.routers, config=cfg,
                            data_dir=os.path.join(work, "cluster")) as cluster:
        client = cluster.client()
        t0 = time.perf_counter()
        client.load(ckpt, model="dlrm", dense_part=shoal.DensePart.dlrm(FEATURES))
        load_s = time.perf_counter() - t0
        d, ids = requests[0]
        with torch.no_grad():
            diff = float((client.predict("dlrm", torch.from_numpy(d), to_kjt(ids)).scores
                          - model(torch.from_numpy(d), to_kjt(ids))[:, 0]).abs().max())
        pids = {h.name: h.pid for h in cluster.routers + cluster.servers}
        res = run_clients("shoal", cluster.router_addresses, requests, args, None, pids)
        st = client.status().router
        res.update(load_seconds=round(load_s, 1), max_abs_diff=diff,
                   router_requests=st.requests, router_batches=st.batches)
        if args.row_cache_rows:
            res["cache_hit_ratio"] = round(st.cache_hits / max(1, st.cache_hits
                                                               + st.cache_misses), 3)
        client.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000, help="rows per table")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=1.1, help="Zipf exponent of the ids")
    ap.add_argument("--procs", type=int, default=4, help="client processes")
    ap.add_argument("--threads", type=int, default=8, help="client threads per process")
    ap.add_argument("--routers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--window-ms", type=float, default=None)
    ap.add_argument("--row-cache-rows", type=int, default=0,
                    help="the router's hot-row cache, rows per table (default 0: off)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    model = make_model(args.rows, args.dim)
    dense_params = {k: v.detach().clone() for k, v in model.state_dict().items()
                    if k.startswith(("dense_arch.", "over_arch."))}
    requests = make_requests(64, args.candidates, args.rows, args.alpha)
    work = tempfile.mkdtemp(prefix="shoal-predict-bench-")
    try:
        local = in_process(model, requests, args.seconds / 2)
        print(f"in-process DLRM, 1 thread: {local['requests_per_s']:.0f} requests/s, "
              f"p50 {local['p50_ms']:.2f} ms, p99 {local['p99_ms']:.2f} ms", flush=True)
        shoal_res = run_shoal(model, requests, args, work)
        print(f"shoal ({args.procs} x {args.threads} clients): "
              f"{shoal_res['requests_per_s']:.0f} requests/s, p50 {shoal_res['p50_ms']:.2f} ms, "
              f"p99 {shoal_res['p99_ms']:.2f} ms; {shoal_res['router_requests']} requests in "
              f"{shoal_res['router_batches']} lookup batches; CPU s {shoal_res['cpu_seconds']}; "
              f"max |diff| {shoal_res['max_abs_diff']:.2g}", flush=True)
        redis_res = run_redis(model, requests, args, dense_params, work)
        print(f"redis MGET + client pooling and dense part: "
              f"{redis_res['requests_per_s']:.0f} requests/s, p50 {redis_res['p50_ms']:.2f} ms, "
              f"p99 {redis_res['p99_ms']:.2f} ms; CPU s {redis_res['cpu_seconds']}; "
              f"max |diff| {redis_res['max_abs_diff']:.2g}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = shoal_res["requests_per_s"] / redis_res["requests_per_s"]
    print(f"shoal / redis: {ratio:.2f}x throughput (target >= 2x), p99 "
          f"{shoal_res['p99_ms']:.2f} vs {redis_res['p99_ms']:.2f} ms (target: no higher); "
          f"shoal / in-process: {shoal_res['requests_per_s'] / local['requests_per_s']:.2f}x")
    path = write_result("predict", {
        "config": vars(args), "features": len(FEATURES), "dense_in": DENSE_IN,
        "in_process": local, "shoal": shoal_res, "redis": redis_res,
        "ratio_vs_redis": round(ratio, 3),
        "ratio_vs_in_process": round(shoal_res["requests_per_s"] / local["requests_per_s"], 3)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
