"""Shared measurement helpers for the benchmarks: CPU seconds of a process, percentiles, and
results written as JSON under bench/results/."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentiles(values_s, ps=(50, 99)) -> dict:
    import numpy as np
    arr = np.asarray(values_s) * 1e3
    return {f"p{p}_ms": round(float(np.percentile(arr, p)), 3) for p in ps} if len(arr) else {}


def write_result(name: str, result: dict) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# ---------------------------------------------------------------- a steady lookup load

def add_load_args(ap) -> None:
    """The workload flags shared by the benchmarks that run a lookup load beside an event."""
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--bag", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steady-s", type=float, default=10.0)
    ap.add_argument("--rebuild-mib-per-s", type=float, default=None,
                    help="pace of each replica copy (default: the server config's)")


def load_workload(args):
    """(torchrec table configs, 32 KJT batches) for ``args`` from ``add_load_args``."""
    import numpy as np
    from embeddings.synthetic import random_kjt
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim,
                                 num_embeddings=args.rows, feature_names=[f"f{i}"])
              for i in range(args.tables)]
    rng = np.random.default_rng(0)
    batches = [random_kjt(rng, [f"f{i}" for i in range(args.tables)], [args.rows] * args.tables,
                          args.batch, args.bag) for _ in range(32)]
    return tables, batches


class QueryLoad:
    """``clients`` threads sending pooled lookups in a closed loop; ``log`` holds
    (start, latency s, ok) per query and ``errors`` the failures' messages."""

    def __init__(self, router_address: str, model: str, batches, clients: int):
        import threading
        self.log, self.errors = [], []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._args = (router_address, model, batches, clients)
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def start(self) -> "QueryLoad":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, i: int) -> None:
        import shoal
        address, model, batches, clients = self._args
        c = shoal.connect(address, timeout=30)
        j = i
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                c.lookup(model, batches[j % len(batches)])
                ok = True
            except shoal.ShoalError as e:
                ok = False
                with self._lock:
                    self.errors.append(f"{e.code.name}: {e.message[:300]}")
            with self._lock:
                self.log.append((t0, time.perf_counter() - t0, ok))
            j += clients
        c.close()
