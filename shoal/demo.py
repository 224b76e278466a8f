"""The end-to-end demo (`shoal demo`, the README's first command).

Starts a local cluster (3 shard servers, replication 2), creates a DLRM-shaped model of 8
tables, fills it with random rows, streams Zipf-distributed queries from 4 client threads and
checks every answer against a local torchrec EmbeddingBagCollection with the same weights;
beside them, a Mixture-of-Experts layer (8 experts, top-2) answers ``moe_forward`` calls,
each checked against the same layer computed locally, and a client scores candidates with
the model's dense part (``predict``), each score checked against the local DLRM. Five
seconds in, it SIGKILLs a shard
server: the queries go on, and the coordinator declares it dead and rebuilds its replicas
elsewhere; then it adds a server, rebalances onto it and splits a table, still under load.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import warnings
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shoal demo")
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--replication", type=int, default=2)
    ap.add_argument("--rows", type=int, default=200_000, help="rows per table")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--bag", type=int, default=20, help="mean ids per bag")
    ap.add_argument("--seconds", type=float, default=15.0, help="how long to send queries")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--kill-at", type=float, default=5.0,
                    help="seconds into the queries to SIGKILL a shard server (-1: never)")
    ap.add_argument("--no-resize", action="store_true",
                    help="skip adding a server and splitting a table under the queries")
    ap.add_argument("--plaintext", action="store_true",
                    help="no TLS and no roles (the default runs with both, from `shoal certs`)")
    args = ap.parse_args(argv)
    if args.kill_at is not None and args.kill_at < 0:
        args.kill_at = None

    import shoal
    from embeddings.synthetic import random_kjt
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.set_num_threads(1)
    t_start = time.monotonic()
    tables = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=args.dim,
                                 num_embeddings=args.rows, feature_names=[f"cat_{i}"],
                                 pooling=PoolingType.MEAN if i % 4 == 3 else PoolingType.SUM)
              for i in range(8)]
    oracle = EmbeddingBagCollection(tables=tables)
    from torchrec.models.dlrm import DLRM
    dlrm = DLRM(embedding_bag_collection=oracle, dense_in_features=13,
                dense_arch_layer_sizes=[32, args.dim], over_arch_layer_sizes=[32, 1]).eval()
    features = [f for t in tables for f in t.feature_names]
    sizes = [t.num_embeddings for t in tables]
    step = lambda msg: print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    # A short lease so the demo shows a failover in seconds (the default is 5 s). Memory for
    # a quarter of the rows each server holds: the rest is read from RocksDB (shards.tiers).
    from shards.tiers import budget_for_rows
    held = 8 * args.rows * args.dim * 4 * args.replication // args.servers
    budget = budget_for_rows(held // 4)
    config = shoal.ShoalConfig().replace(coordinator__lease_s=2.0,
                                         server__heartbeat_interval_s=0.25,
                                         server__memory_budget_bytes=budget)
    certs = None
    if not args.plaintext:
        import tempfile

        from shoal.certs import make_certs
        certs = tempfile.mkdtemp(prefix="shoal-demo-certs-")
        paths = make_certs(certs)
        config = shoal.ShoalConfig.from_json(open(paths["config"]).read()).replace(
            coordinator=config.coordinator, server=config.server,
            security__client_certs=False)      # query clients below come with a token only
    step(f"starting a local cluster: {args.servers} shard servers, replication "
         f"{args.replication}, a coordinator and a router; each server's memory budget "
         f"({budget / 2**20:.1f} MiB with RocksDB's caches) holds a quarter of its "
         f"{held / 2**20:.1f} MiB of rows, the hottest, and RocksDB the rest" +
         ("" if certs is None else "; TLS on every port, mutual TLS between them, roles "
                                   "checked on every call"))
    with shoal.LocalCluster(servers=args.servers, replication=args.replication,
                            config=config) as cluster:
        client = cluster.client()                  # the operator: the cluster's own files
        query_creds = _query_credentials(certs, step) if certs else None
        if certs:
            _show_refusals(cluster, query_creds, step)
        step(f"status page: http://{client.status().map.coordinator_metrics_address}/ (live "
             "while the demo runs; `shoal status` lists every process's /metrics)")
        ckpt = os.path.join(str(cluster.data_dir), "checkpoint")
        t0 = time.monotonic()
        _save_checkpoint(dlrm, ckpt)
        step(f"saved a torchrec DLRM (its 8 embedding tables, dense arch and over arch) as a "
             f"torch.distributed.checkpoint ({time.monotonic() - t0:.1f}s)")
        # The model's tables (with their pooling), created loading: nothing is servable until
        # the load below has written and verified every replica.
        placed = client.create_model("dlrm", tables, loading=True)
        step(f"created model 'dlrm': 8 tables x {args.rows:,} rows x dim {args.dim} "
             f"({sum(t.num_partitions for t in placed)} partitions), version 1 loading")
        res = client.load(ckpt, model="dlrm", version=1,
                          dense_part=shoal.DensePart.dlrm(features))
        step(f"loaded the checkpoint: {sum(res.tables.values()):,} rows "
             f"({res.bytes / 2**20:.0f} MiB, x{args.replication} replicas) in "
             f"{res.seconds:.1f}s ({res.bytes / 2**20 / res.seconds:.0f} MiB/s), every replica "
             f"verified against it, {len(res.dense)} dense tensors stored with it as the "
             "model's dense part; version 1 is current")

        moe = _MoeQueries(cluster.router_address, creds=query_creds)
        client.put_expert_layers("mixtral", [(moe.spec, moe.weights)])
        step(f"registered MoE model 'mixtral': 1 layer of {moe.spec.num_experts} experts, "
             f"top-{moe.spec.top_k}, d_model {moe.spec.d_model}, d_ff {moe.spec.d_ff} (each "
             "expert a partition, replicated like the tables)")

        step(f"querying for {args.seconds:.0f}s from {args.clients} clients: batch "
             f"{args.batch}, ~{args.bag} ids per bag, Zipf ids; every answer checked against "
             "a local torchrec EmbeddingBagCollection")
        lat, max_diff, ids, errors = [], [0.0], [0], []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds
        stop = threading.Event()

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            c = shoal.connect(cluster.router_address, creds=query_creds)
            while not stop.is_set():
                kjt = random_kjt(rng, features, sizes, args.batch, args.bag)
                t = time.perf_counter()
                try:
                    got = c.lookup("dlrm", kjt)
                except shoal.ShoalError as e:
                    with lock:
                        errors.append(e)
                    continue
                elapsed = time.perf_counter() - t
                with torch.no_grad():
                    want = oracle(kjt)
                diff = float((got.values() - want.values()).abs().max())
                with lock:
                    lat.append(elapsed)
                    ids[0] += kjt.values().numel()
                    max_diff[0] = max(max_diff[0], diff)
            c.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
        threads += [threading.Thread(target=moe.run, args=(stop,))
                    for _ in range(moe.CALLERS)]
        scoring = _PredictQueries(cluster.router_address, dlrm, features, sizes, query_creds)
        threads.append(threading.Thread(target=scoring.run, args=(stop,)))
        t0 = time.monotonic()
        for th in threads:
            th.start()
        failover = resized = None
        if args.kill_at is not None and args.servers >= 2 and args.replication >= 2:
            time.sleep(args.kill_at)
            failover = _kill_and_watch(cluster, client, step, stop_at)
        if not args.no_resize:
            resized = _resize_and_split(cluster, step)
        time.sleep(max(0.0, stop_at - time.monotonic()))
        stop.set()
        for th in threads:
            th.join()
        wall = time.monotonic() - t0
        lat_ms = np.array(lat) * 1e3
        st = client.status()
        step("results:")
        print(f"    queries answered: {len(lat):,} ({len(errors)} failed)")
        print(f"    throughput:       {len(lat) / wall:,.0f} batches/s, {ids[0] / wall:,.0f} "
              "ids/s (the oracle check runs in the same 2 cores)")
        print(f"    latency:          p50 {np.percentile(lat_ms, 50):.2f} ms, p99 "
              f"{np.percentile(lat_ms, 99):.2f} ms per batch")
        print(f"    max |shoal - torchrec|: {max_diff[0]:.3g}")
        print(f"    moe_forward:      {moe.ok:,} calls of {moe.tokens} tokens from {moe.CALLERS} "
              f"decode callers answered ({len(moe.errors)} failed), max |shoal - local| "
              f"{moe.max_diff:.3g}; the router merged {st.router.moe_merged:,} of them "
              f"({st.router.moe_requests:,} calls ran as {st.router.moe_batches:,} layer calls)")
        print(f"    predict:          {scoring.ok:,} requests of {scoring.candidates} candidates "
              f"scored ({len(scoring.errors)} failed), max |shoal - local DLRM| "
              f"{scoring.max_diff:.3g}")
        print(f"    router merged {st.router.requests:,} requests into "
              f"{st.router.batches:,} batches; {st.router.replica_retries} reads retried on "
              f"another replica, {st.router.hedges} hedged")
        if failover:
            print(f"    failover: {failover}")
        if resized:
            print(f"    resize:   {resized}")
        for s in st.map.servers:
            x = s.stats
            hit = 1 - x.cold_ids / x.ids_looked_up if x.ids_looked_up else 1.0
            print(f"    server {s.server_id} ({s.state}): {x.partitions} partitions, "
                  f"{x.raw_bytes / 2**20:.1f} MiB of rows, {x.resident_bytes / 2**20:.1f} MiB "
                  f"of them in memory, RSS {x.rss_bytes / 2**20:.0f} MiB, "
                  f"{x.ids_looked_up:,} ids served, hit rate {hit:.1%} "
                  f"({x.cold_ids:,} read from disk)")
        print(f"    metrics: {_counted(st.router.metrics_address)}")
        client.close()
    if certs:
        import shutil
        shutil.rmtree(certs, ignore_errors=True)
    ok = not errors and max_diff[0] < 1e-4 and len(lat) > 0 and moe.passed and scoring.passed
    step("stopped the cluster. " + ("OK: every answer matched torchrec, the local DLRM and "
                                    "the local MoE layer." if ok
                                    else "FAILED: see the numbers above."))
    return 0 if ok else 1


def _query_credentials(certs: str, step):
    """A query-role bearer token for the demo's query clients, signed with the cluster's key."""
    from shoal.security import Credentials, make_token
    key = bytes.fromhex(open(os.path.join(certs, "token.key")).read().strip())
    step(f"issued a query-role token (`shoal token`); the query clients use it over TLS "
         f"(certificates in {certs})")
    return Credentials.from_files(os.path.join(certs, "ca.pem"),
                                  token=make_token(key, "demo-queries", ["query"]))


def _show_refusals(cluster, query_creds, step) -> None:
    """What the roles refuse: a write with the query token, a call with no credentials."""
    import shoal
    from shoal.security import Credentials
    c = shoal.connect(cluster.router_address, 10, query_creds)
    try:
        c.create_model("intruder", [])
        said = "was ALLOWED (wrong)"
    except shoal.ShoalError as e:
        said = f"was refused: {e.code.name}"
    c.close()
    anon = shoal.connect(cluster.router_address, 10,
                         Credentials(ca=query_creds.ca))       # TLS, but no token
    try:
        anon.status()
        said2 = "was ALLOWED (wrong)"
    except shoal.ShoalError as e:
        said2 = f"was refused: {e.code.name}"
    anon.close()
    step(f"a query-role client's CreateModel {said}; a call without credentials {said2}")


def _counted(address: str) -> str:
    """The router's own request counters, read from its Prometheus endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        return f"unreadable ({e})"
    by = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "shoal_model_requests_total":
                key = (smp.labels["model"], smp.labels["rpc"], smp.labels["code"])
                by[key] = by.get(key, 0) + smp.value
    return "; ".join(f"{m} {rpc} {code}: {int(v):,}" for (m, rpc, code), v in sorted(by.items())
                     if rpc in ("Lookup", "MoeForward", "Predict")) + f" (http://{address}/metrics)"


class _CheckedQueries:
    """A client thread sending requests (``ask``) and checking each answer against the same
    computed in this process; counts answers, failures and the largest difference."""

    def __init__(self, address: str, creds=None):
        self.address, self.creds = address, creds
        self.ok, self.errors, self.max_diff = 0, [], 0.0
        self._lock = threading.Lock()           # several threads may run one of these

    @property
    def passed(self) -> bool:
        return self.ok > 0 and not self.errors and self.max_diff < 1e-4

    def ask(self, client, i: int):
        """One request: (Shoal's answer, the local one)."""
        raise NotImplementedError

    def run(self, stop: threading.Event) -> None:
        import shoal
        c = shoal.connect(self.address, creds=self.creds)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                got, want = self.ask(c, i)
            except shoal.ShoalError as e:
                self.errors.append(e)
                continue
            diff = float((got - want).abs().max())
            with self._lock:
                self.max_diff = max(self.max_diff, diff)
                self.ok += 1
        c.close()


class _MoeQueries(_CheckedQueries):
    """``moe_forward`` on one Mixtral-style layer, against the layer computed locally: each
    thread that runs it is a decode-shaped caller (a few tokens a call, back to back, on a
    connection of its own), so the router merges their calls."""

    CALLERS = 4

    def __init__(self, address: str, tokens: int = 4, creds=None):
        from experts.specs import ExpertLayerSpec, ExpertLayerWeights
        super().__init__(address, creds)
        self.tokens = tokens
        self.spec = ExpertLayerSpec("l0", num_experts=8, d_model=64, d_ff=128, top_k=2)
        g = torch.Generator().manual_seed(7)
        E, d, f = 8, 64, 128
        self.weights = ExpertLayerWeights(
            gate=torch.randn(E, d, generator=g), w1=torch.randn(E, f, d, generator=g) * 0.1,
            w2=torch.randn(E, d, f, generator=g) * 0.1,
            w3=torch.randn(E, f, d, generator=g) * 0.1).check(self.spec)

    def ask(self, client, i: int):
        from experts.compute import moe_forward_local
        g = torch.Generator().manual_seed((threading.get_ident() * 7919 + i) % 2**31)
        x = torch.randn(self.tokens, self.spec.d_model, generator=g)
        got = client.moe_forward("mixtral", "l0", x)
        with torch.no_grad():
            return got, moe_forward_local(self.spec, self.weights, x)


class _PredictQueries(_CheckedQueries):
    """``predict`` of candidates with the model's dense part, against the local DLRM."""

    def __init__(self, address: str, dlrm, features, sizes, creds=None, candidates: int = 16):
        super().__init__(address, creds)
        self.dlrm, self.features, self.sizes, self.candidates = dlrm, features, sizes, candidates
        self._rng = np.random.default_rng(9)

    def ask(self, client, i: int):
        from embeddings.synthetic import random_kjt
        kjt = random_kjt(self._rng, self.features, self.sizes, self.candidates, 4)
        dense = torch.from_numpy(self._rng.standard_normal((self.candidates, 13))
                                 .astype(np.float32))
        got = client.predict("dlrm", dense, kjt, key=f"user{i}").scores
        time.sleep(0.02)                      # a light scoring load beside the lookups
        with torch.no_grad():
            return got, self.dlrm(dense, kjt)[:, 0]


def _save_checkpoint(dlrm, path: str) -> None:
    """The DLRM's state dict (tables and dense part), with DCP."""
    import torch.distributed.checkpoint as dcp
    with torch.no_grad():
        sd = {k: v.detach() for k, v in dlrm.state_dict().items()}
    with warnings.catch_warnings():           # no_dist's deprecation notice
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=path, no_dist=True)


def _resize_and_split(cluster, step) -> str:
    """Grow the cluster by one server and rebalance onto it, then double the partitions of
    table t_cat_0, all while the queries run."""
    from shoal.admin import describe_moves

    t0 = time.monotonic()
    h = cluster.add_server()
    step(f"started shard server {h.name}; rebalancing onto it while the queries go on")
    with cluster.admin() as admin:
        plan = admin.rebalance()
        step(f"moving {len(plan.moves)} partitions "
             f"({sum(m.bytes for m in plan.moves) / 2**20:.0f} MiB)")
        shown = [0.0]

        def progress(m):
            if m.moves and time.monotonic() - shown[0] > 3:
                shown[0] = time.monotonic()
                step(f"  {len(m.moves)} moves in flight, e.g. {describe_moves(m)[0]}")

        m = admin.wait_for_moves(progress=progress)
        moved_s = time.monotonic() - t0
        per = {s.server_id: sum(s.server_id in rs.replicas for rs in m.partitions)
               for s in m.servers if s.state == "alive"}
        step(f"rebalanced in {moved_s:.1f}s: replicas per server "
             f"{', '.join(f'{k} {v}' for k, v in sorted(per.items()))}")
        t1 = time.monotonic()
        sp = admin.split_table("dlrm", "t_cat_0")
        step(f"split table t_cat_0 live: {sp.new_table.num_partitions // 2} -> "
             f"{sp.new_table.num_partitions} partitions in {time.monotonic() - t1:.1f}s")
    return (f"added {h.name} and moved {len(plan.moves)} partitions in {moved_s:.1f}s; "
            f"t_cat_0 split to {sp.new_table.num_partitions} partitions")


def _kill_and_watch(cluster, client, step, stop_at: float) -> str:
    """SIGKILL one shard server while the queries run; wait (bounded) until the coordinator has
    declared it dead and rebuilt its partitions' replicas elsewhere."""
    import signal

    victim = cluster.servers[1]
    t_kill = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    step(f"killed shard server {victim.server_id} (SIGKILL, pid {victim.pid}); queries go on")
    dead_at = restored_at = None
    deadline = max(stop_at, t_kill + 60)
    while time.monotonic() < deadline and restored_at is None:
        m = client.status().map
        if dead_at is None and not any(victim.server_id in rs.replicas for rs in m.partitions):
            dead_at = time.monotonic() - t_kill
            step(f"coordinator declared {victim.server_id} dead after {dead_at:.1f}s; other "
                 "replicas lead its partitions, new copies are being built")
        if dead_at is not None and all(len(rs.replicas) >= 2 and not rs.learners
                                       for rs in m.partitions):
            restored_at = time.monotonic() - t_kill
            step(f"replication factor restored {restored_at:.1f}s after the kill")
        time.sleep(0.2)
    if restored_at is None:
        return f"{victim.server_id} killed; replication not yet restored after 60 s"
    return (f"{victim.server_id} killed; declared dead after {dead_at:.1f}s, every partition "
            f"back to 2 replicas after {restored_at:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
