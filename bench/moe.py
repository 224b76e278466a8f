"""One MoE layer through a local Shoal cluster beside the same layer in one process, in one
run: 8 experts, top-2, d_model 512, d_ff 2048 (SiLU-gated, Mixtral gating), 4096 tokens per
request; experts on 2 shard servers (1 thread each; replication 2, so each expert's tokens are
split across both), against the in-process block (``experts.compute.moe_forward_local``,
tested equal to the published Mixtral block) on 2 threads.

    python bench/moe.py [--tokens 4096] [--iters 10]
    python bench/moe.py --decode [--callers 32 128] [--step-tokens 4] [--seconds 15]

``--decode``: the serving shape of an inference engine. Each of ``--callers`` threads sends
``--step-tokens`` tokens per call, back to back, for ``--seconds`` (the client's default
stream, the router merging concurrent calls); beside it, the same layer in one process given
each step's tokens from all callers as one batch (2 threads). Reports tokens/s, p50 / p99 per
step, how many calls the router merged, and the ratio (target >= 0.6). Writes
bench/results/moe-decode.json.

Reports tokens/s of both and the ratio (target >= 0.8), Shoal's output checked against the
in-process one, and the time split of a request: gate, dispatch, waiting on the servers (of
which expert compute, the longest server's), combine, and the rest (client <-> router
transfer). Writes bench/results/moe.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cpu_seconds, write_result  # noqa: E402


def make_layer(args):
    from experts.specs import ExpertLayerSpec, ExpertLayerWeights
    spec = ExpertLayerSpec("l0", num_experts=args.experts, d_model=args.d_model,
                           d_ff=args.d_ff, top_k=args.top_k).validate()
    g = torch.Generator().manual_seed(0)
    E, d, f = spec.num_experts, spec.d_model, spec.d_ff
    w = ExpertLayerWeights(gate=torch.randn(E, d, generator=g) / d ** 0.5,
                           w1=torch.randn(E, f, d, generator=g) / d ** 0.5,
                           w2=torch.randn(E, d, f, generator=g) / f ** 0.5,
                           w3=torch.randn(E, f, d, generator=g) / d ** 0.5).check(spec)
    return spec, w


def timed(fn, iters: int) -> list[float]:
    fn()                                        # warm up
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--callers", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--step-tokens", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--client-procs", type=int, default=1,
                    help="--decode: processes the callers are spread over (engine replicas)")
    ap.add_argument("--lanes", type=int, default=None,
                    help="router.moe_batch_lanes (default: the config's)")
    ap.add_argument("--window-ms", type=float, default=None,
                    help="router.moe_window_ms (default: the config's)")
    args = ap.parse_args()
    if args.decode:
        return decode(args)

    import shoal
    from experts.compute import moe_forward_local

    spec, w = make_layer(args)
    x = torch.randn(args.tokens, spec.d_model, generator=torch.Generator().manual_seed(1))

    torch.set_num_threads(2)
    with torch.no_grad():
        want = moe_forward_local(spec, w, x)
        local = timed(lambda: moe_forward_local(spec, w, x), args.iters)
    torch.set_num_threads(1)
    with torch.no_grad():
        local1_s = statistics.median(timed(lambda: moe_forward_local(spec, w, x), args.iters))
    local_s = statistics.median(local)

    with tempfile.TemporaryDirectory(prefix="shoal-moe-bench-") as tmp, \
            shoal.LocalCluster(servers=2, replication=2, data_dir=tmp) as cluster:
        client = cluster.client(timeout=120)
        client.put_expert_layers("moe", [(spec, w)])
        got = client.moe_forward("moe", "l0", x)
        err = ((got - want).norm() / want.norm()).item()
        pids = {h.server_id: h.pid for h in cluster.servers} | {
            "router": cluster.router.pid, "client": os.getpid()}
        stages = []

        def call():
            t = {}
            client.moe_forward("moe", "l0", x, timings=t)
            stages.append(t)

        before = {k: cpu_seconds(p) for k, p in pids.items()}
        shoal_times = timed(call, args.iters)
        cpu = {k: round((cpu_seconds(p) - before[k]) / (args.iters + 1), 4)
               for k, p in pids.items()}
        client.close()
    shoal_s = statistics.median(shoal_times)
    split = {k: statistics.median(s[k] for s in stages[1:]) for k in stages[-1]
             if k != "batch_requests"}
    split["servers_other"] = split["servers"] - split["expert_compute"]
    split["client_router_transfer"] = shoal_s - sum(
        split[k] for k in ("gate", "dispatch", "servers", "combine"))
    ratio = local_s / shoal_s
    print(f"layer: {spec.num_experts} experts, top-{spec.top_k}, d_model {spec.d_model}, "
          f"d_ff {spec.d_ff}, {args.tokens} tokens per request")
    print(f"in-process block, 2 threads: {args.tokens / local_s:,.0f} tokens/s "
          f"({local_s * 1e3:.1f} ms); on 1 thread {args.tokens / local1_s:,.0f} tokens/s")
    print(f"shoal (2 servers x 1 thread, replication 2): {args.tokens / shoal_s:,.0f} tokens/s "
          f"({shoal_s * 1e3:.1f} ms), ratio {ratio:.2f} (target >= 0.8); output rel. error "
          f"{err:.1e}")
    print("time split, ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in split.items()))
    print("CPU s per request: " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))
    path = write_result("moe", {
        "config": vars(args), "local_s": round(local_s, 4), "shoal_s": round(shoal_s, 4),
        "local_tokens_per_s": round(args.tokens / local_s),
        "local_1_thread_tokens_per_s": round(args.tokens / local1_s),
        "shoal_tokens_per_s": round(args.tokens / shoal_s), "ratio": round(ratio, 3),
        "rel_error": err, "split_ms": {k: round(v * 1e3, 2) for k, v in split.items()},
        "cpu_s_per_request": cpu})
    print(f"wrote {path}")
    assert err < 1e-5, f"Shoal's output differs from the in-process block: {err:.2e}"
    return 0


def decode(args) -> int:
    import numpy as np

    import shoal
    from experts.compute import moe_forward_local

    spec, w = make_layer(args)
    g = torch.Generator().manual_seed(1)
    result = {"config": vars(args), "runs": []}
    cfg = shoal.ShoalConfig()
    if args.window_ms is not None:
        cfg = cfg.replace(router__moe_window_ms=args.window_ms)
    if args.lanes is not None:
        cfg = cfg.replace(router__moe_batch_lanes=args.lanes)
    with tempfile.TemporaryDirectory(prefix="shoal-moe-decode-") as tmp, \
            shoal.LocalCluster(servers=2, replication=2, data_dir=tmp, config=cfg) as cluster:
        client = cluster.client(timeout=120)
        client.put_expert_layers("moe", [(spec, w)])
        pids = {h.server_id: h.pid for h in cluster.servers} | {
            "router": cluster.router.pid, "client": os.getpid()}
        for callers in args.callers:
            n = callers * args.step_tokens
            x = torch.randn(n, spec.d_model, generator=g)
            def local_times():              # the in-process step, 2 threads
                torch.set_num_threads(2)
                with torch.no_grad():
                    out = timed(lambda: moe_forward_local(spec, w, x), 10)
                torch.set_num_threads(1)
                return out
            with torch.no_grad():
                want = moe_forward_local(spec, w, x)
            local = local_times()
            xs = x.view(callers, args.step_tokens, spec.d_model)
            check = [client.moe_forward("moe", "l0", xs[i]) for i in range(min(callers, 4))]
            err = max(((c - want[i * args.step_tokens:(i + 1) * args.step_tokens]).norm()
                       / c.norm()).item() for i, c in enumerate(check))
            before = client.status().router
            # The callers as engine replicas would be: --client-procs processes, each with
            # its share of the callers as threads on its own client (one stream).
            import multiprocessing as mp
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            procs_n = max(1, min(args.client_procs, callers))
            share = np.array_split(np.arange(callers), procs_n)
            t0 = time.time() + 8.0                  # the children's start: after their imports
            procs = [ctx.Process(target=_decode_callers, args=(
                cluster.router_address, xs[idx].numpy(), t0, args.seconds, q))
                for idx in share]
            for p in procs:
                p.start()
            time.sleep(max(0.0, t0 - time.time()))
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            cpu0.update({f"client{i}": cpu_seconds(p.pid) for i, p in enumerate(procs)})
            time.sleep(args.seconds)
            cpu = {k: cpu_seconds(pids[k] if k in pids else procs[int(k[6:])].pid) - v
                   for k, v in cpu0.items()}
            got = [q.get(timeout=120) for _ in procs]
            for p in procs:
                p.join(60)
            elapsed = args.seconds
            after = client.status().router
            # Timed before and after Shoal's run (this machine's speed drifts): the median.
            local_s = statistics.median(local + local_times())
            all_lat = np.array([v for lat, _ in got for v in lat])
            errors = [e for _, errs in got for e in errs]
            calls = len(all_lat)
            tokens_s = calls * args.step_tokens / elapsed
            local_tokens_s = n / local_s
            merged = after.moe_merged - before.moe_merged
            batches = after.moe_batches - before.moe_batches
            run = {"callers": callers, "tokens_per_call": args.step_tokens,
                   "shoal_tokens_per_s": round(tokens_s),
                   "local_tokens_per_s": round(local_tokens_s),
                   "ratio": round(tokens_s / local_tokens_s, 3),
                   "p50_ms": round(float(np.percentile(all_lat, 50)) * 1e3, 2),
                   "p99_ms": round(float(np.percentile(all_lat, 99)) * 1e3, 2),
                   "local_step_ms": round(local_s * 1e3, 2), "calls": calls,
                   "errors": len(errors), "first_errors": errors[:3],
                   "merged_calls": merged, "batches": batches,
                   "calls_per_batch": round((after.moe_requests - before.moe_requests)
                                            / max(1, batches), 1),
                   "rel_error": err,
                   "cpu_cores": {k: round(v / args.seconds, 2) for k, v in cpu.items()}}
            print(f"{callers} callers x {args.step_tokens} tokens: shoal {tokens_s:,.0f} "
                  f"tokens/s (p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms a call, "
                  f"{run['calls_per_batch']} calls a batch), in-process merged step "
                  f"{local_tokens_s:,.0f} tokens/s ({run['local_step_ms']} ms): ratio "
                  f"{run['ratio']} (target >= 0.6); {len(errors)} errors, rel. error "
                  f"{err:.1e}; CPU cores {run['cpu_cores']}", flush=True)
            result["runs"].append(run)
        client.close()
    print(f"wrote {write_result('moe-decode', result)}")
    return 0


def _decode_callers(address: str, xs, t0: float, seconds: float, q) -> None:
    """One engine process: a thread per caller (row of ``xs``: its step's tokens), each
    calling moe_forward back to back from ``t0`` (wall clock) for ``seconds``; puts
    (latencies of the calls that ended in the window, errors) on ``q``."""
    import threading

    import shoal
    torch.set_num_threads(1)
    client = shoal.connect(address, timeout=120)
    x = torch.from_numpy(xs)
    client.moe_forward("moe", "l0", x[0])                       # connect, warm up
    lat: list[float] = []
    errors: list[str] = []
    end = t0 + seconds

    def caller(i):
        time.sleep(max(0.0, t0 - time.time()))
        while time.time() < end:
            t = time.perf_counter()
            try:
                client.moe_forward("moe", "l0", x[i], timeout=30)
            except Exception as e:                              # noqa: BLE001 - reported
                errors.append(repr(e)[:200])
                continue
            if time.time() <= end:
                lat.append(time.perf_counter() - t)
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(x))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    q.put((lat, errors))


if __name__ == "__main__":
    sys.exit(main())
