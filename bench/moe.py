"""One MoE layer through a local Shoal cluster beside the same layer in one process, in one
run: 8 experts, top-2, d_model 512, d_ff 2048 (SiLU-gated, Mixtral gating), 4096 tokens per
request; experts on 2 shard servers (1 thread each; replication 2, so each expert's tokens are
split across both), against the in-process block (``experts.compute.moe_forward_local``,
tested equal to the published Mixtral block) on 2 threads.

    python bench/moe.py [--tokens 4096] [--iters 10]

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
    args = ap.parse_args()

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
    split = {k: statistics.median(s[k] for s in stages[1:]) for k in stages[-1]}
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


if __name__ == "__main__":
    sys.exit(main())
