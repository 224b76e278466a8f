"""How long each RocksDB call a shard server makes through rocksdict keeps other Python threads
from running (the GIL), measured against doing nothing.

    python bench/gil.py                    # 400k rows of dim 64 (100 MiB), 8 partitions

A spinner thread counts loop iterations; for each call (multi-get of 4,000 random keys, an
iteration over a partition, a WriteBatch of 4,000 rows, an SST ingest of 100k rows, a
checkpoint) the spinner's progress while the call runs is compared with its progress over the
same time alone: 1.0 means the call let other threads run throughout, 0.0 that it held the
GIL throughout. Also reports each call's time, which the busy spinner stretches (a call that
takes the GIL back between its parts waits for it). Runs at the servers' GIL switch interval.
Writes bench/results/gil.json.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_result  # noqa: E402
from shards.storage import RocksRowStore, encode_keys  # noqa: E402

N, P, DIM = 400_000, 8, 64


class Spinner:
    def __init__(self):
        self.count = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.count += 1

    def close(self):
        self._stop.set()
        self._t.join()


def share_free(spin: Spinner, call) -> tuple[float, float]:
    """(seconds the call took, the spinner's progress meanwhile over its progress alone)."""
    c0, t0 = spin.count, time.perf_counter()
    call()
    t1, c1 = time.perf_counter(), spin.count
    alone0 = spin.count
    time.sleep(t1 - t0)
    alone = spin.count - alone0
    return t1 - t0, (c1 - c0) / max(1, alone)


def main() -> None:
    from shoal.config import ShardServerConfig
    sys.setswitchinterval(ShardServerConfig().gil_switch_interval_s)    # as a server runs
    d = tempfile.mkdtemp(prefix="gil-")
    store = RocksRowStore(d, 64 << 20, 50_000)
    ids = np.arange(N)
    parts = (ids & (P - 1)).astype(np.int32)
    rows = np.random.default_rng(0).random((N, DIM), dtype=np.float32)
    for lo in range(0, N, 100_000):
        store.write_rows(1, parts[lo:lo + 100_000], ids[lo:lo + 100_000], rows[lo:lo + 100_000])
    rng = np.random.default_rng(1)
    spin = Spinner()
    time.sleep(0.1)
    calls = {
        "multi_get_4000": lambda: store.read_rows(
            1, parts[q], q, DIM * 4) if (q := np.unique(rng.integers(0, N, 4000))) is not None
        else None,
        "raw_get_list_4000": lambda: store._db.get(encode_keys(
            1, parts[q], q)) if (q := np.unique(rng.integers(0, N, 4000))) is not None else None,
        "scan_partition_50k": lambda: store.scan_partition(1, int(rng.integers(0, P))),
        "write_batch_4000": lambda: store.write_rows(
            1, parts[q], q, rows[q]) if (q := np.unique(rng.integers(0, N, 4000))) is not None
        else None,
        "ingest_100k": lambda: store.write_rows(1, parts[:100_000], ids[:100_000],
                                                rows[:100_000]),
    }
    out = {}
    for name, call in calls.items():
        took, free = zip(*(share_free(spin, call) for _ in range(5)))
        out[name] = {"ms": statistics.median(took) * 1e3, "others_ran": statistics.median(free)}
        print(f"{name:22s} {out[name]['ms']:8.1f} ms   other threads ran "
              f"{out[name]['others_ran']:.0%} of the time")
    spin.close()
    quiet = {}
    for name in ("multi_get_4000", "scan_partition_50k"):
        quiet[name] = statistics.median(
            (lambda t0: (calls[name](), time.perf_counter() - t0)[1])(time.perf_counter())
            for _ in range(5)) * 1e3
        print(f"{name:22s} {quiet[name]:8.1f} ms with no other thread running")
    write_result("gil", {"rows": N, "dim": DIM, "partitions": P, "calls": out,
                         "alone_ms": quiet})
    store.close()


if __name__ == "__main__":
    main()
