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
