"""Writing SST files: Shoal's vectorised writer (``shards.sst.write_sst``) beside rocksdict's
``SstFileWriter`` (one Python call per key), for the same 1M rows of 16 B keys and 256 B values,
each file then ingested into its own RocksDB and a sample read back to check they agree.

    python bench/sst.py [--rows 1000000]

Writes bench/results/sst.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_result  # noqa: E402


def main() -> int:
    import rocksdict

    from shards.sst import write_sst
    from shards.storage import RocksRowStore, encode_keys, key_array

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--tries", type=int, default=3)
    args = ap.parse_args()
    n = args.rows
    rng = np.random.default_rng(0)
    ids = np.arange(n, dtype=np.int64)
    keys = key_array(7, 0, ids)
    values = rng.integers(0, 256, (n, 256), dtype=np.uint8)
    gb = n * (16 + 256) / 1e9
    work = tempfile.mkdtemp(prefix="shoal-sst-bench-")
    opts = RocksRowStore._make_options(64 << 20)

    def ours(path):
        write_sst(path, [(keys, values)])

    def theirs(path):                    # the bytes lists are part of its cost
        w = rocksdict.SstFileWriter(opts)
        w.open(path)
        for k, v in zip(keys.view("V16").reshape(n).tolist(),
                        values.view("V256").reshape(n).tolist()):
            w[k] = v
        w.finish()

    try:
        times = {}
        for name, fn in (("shoal", ours), ("rocksdict", theirs)):
            best = float("inf")
            for i in range(args.tries):
                path = os.path.join(work, f"{name}{i}.sst")
                t = time.perf_counter()
                fn(path)
                best = min(best, time.perf_counter() - t)
                if i < args.tries - 1:
                    os.unlink(path)
            times[name] = best
            db = rocksdict.Rdict(os.path.join(work, f"db-{name}"), opts,
                                 column_families={"default": opts})
            ing = rocksdict.IngestExternalFileOptions()
            ing.set_move_files(True)
            db.ingest_external_file([path], ing)
            pick = rng.integers(0, n, 1000)
            got = db.get(encode_keys(7, np.zeros(len(pick), np.int64), ids[pick]))
            assert got == values[pick].view("V256").reshape(len(pick)).tolist(), name
            db.close()
        ratio = times["rocksdict"] / times["shoal"]
        for name, t in times.items():
            print(f"{name:9s}: {n:,} rows in {t:.3f} s = {n / t / 1e6:.2f} M rows/s, "
                  f"{gb / t:.2f} GB/s")
        print(f"shoal's writer is {ratio:.1f}x faster")
        result = {"rows": n, "key_bytes": 16, "value_bytes": 256,
                  "shoal_seconds": round(times["shoal"], 3),
                  "rocksdict_seconds": round(times["rocksdict"], 3),
                  "shoal_rows_per_s": round(n / times["shoal"]),
                  "rocksdict_rows_per_s": round(n / times["rocksdict"]),
                  "speedup": round(ratio, 2)}
        print(f"wrote {write_result('sst', result)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
