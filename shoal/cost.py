"""What the cluster costs, per model, and how much of what is provisioned it uses
(``shoal cost``).

Two snapshots ``seconds`` apart, from what the processes already report: the shard map (each
server's CPU seconds, memory and ids served per partition, from its heartbeats) and the
router's /metrics (client requests per model and version). Over the window:

- per model version: queries/s; CPU-seconds per 1,000 queries (the router's CPU split by the
  model's share of requests, each server's by the model's share of the ids it served); bytes
  moved per 1,000 queries (rows read from the servers); bytes stored (every replica of its
  partitions: disk, the capacity) and the memory holding its rows (whole partitions or row
  caches), and the share of its ids read from RocksDB over the window (its I/O path);
- per server: memory in use as a share of its budget (the memory tier: rows and row caches)
  and RSS, disk in use as a share of its capacity, and CPU in use (cores busy over the
  window).
"""
from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from shoal.proto import shoal_pb2 as pb


@dataclass
class ModelCost:
    model: str
    version: int
    queries_per_s: float
    cpu_s_per_1k: float | None      # None: no queries in the window
    bytes_per_1k: float | None
    memory_bytes: int               # stored: every replica of its partitions (disk)
    in_memory_bytes: int = 0        # memory holding its rows on the servers
    miss_share: float | None = None  # of its ids read in the window, from RocksDB


@dataclass
class ServerUse:
    server_id: str
    memory_share: float             # memory tier bytes / memory budget
    rss_bytes: int
    cpu_share: float                # cores busy over the window
    disk_share: float = 0.0         # disk in use / disk capacity (0: no capacity known)


def _requests(metrics_address: str) -> dict[tuple[str, int], float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, int], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "shoal_model_requests":
            continue
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels.get("code") == "OK" and \
                    s.labels.get("version", "").isdigit():
                key = (s.labels["model"], int(s.labels["version"]))
                out[key] = out.get(key, 0.0) + s.value
    return out


def _ids_by_table(m: pb.ShardMap) -> dict[str, dict[int, float]]:
    from shoal.wire import unpack
    return {s.server_id: {tl.table_uid: float(unpack(tl.ids_looked_up, "ids", "int64", 1).sum())
                          for tl in s.stats.table_loads} for s in m.servers}


def measure(client, seconds: float = 5.0) -> tuple[list[ModelCost], list[ServerUse]]:
    """Costs over a window of ``seconds`` of whatever traffic the cluster serves meanwhile."""
    st0 = client.status()
    req0 = _requests(st0.router.metrics_address)
    t0 = time.monotonic()
    time.sleep(seconds)
    st1 = client.status()
    req1 = _requests(st1.router.metrics_address)
    dt = time.monotonic() - t0
    m0, m1 = st0.map, st1.map
    ids0, ids1 = _ids_by_table(m0), _ids_by_table(m1)
    cpu0 = {s.server_id: s.stats.cpu_seconds for s in m0.servers}
    owner = {t.table_uid: (md.name, md.version) for md in m1.models for t in md.tables}
    row_bytes = {t.table_uid: t.dim * (2 if t.dtype in ("float16", "bfloat16") else 4)
                 for md in m1.models for t in md.tables}
    requests = {k: req1.get(k, 0.0) - req0.get(k, 0.0) for k in set(req1) | set(req0)}
    total_requests = sum(requests.values())
    cpu = {k: 0.0 for k in owner.values()}
    moved = {k: 0.0 for k in owner.values()}
    router_cpu = st1.router.cpu_seconds - st0.router.cpu_seconds
    for k, n in requests.items():
        if k in cpu and total_requests:
            cpu[k] += router_cpu * n / total_requests
    uses = []
    for s in m1.servers:
        d = {uid: n - ids0.get(s.server_id, {}).get(uid, 0.0)
             for uid, n in ids1.get(s.server_id, {}).items()}
        busy = s.stats.cpu_seconds - cpu0.get(s.server_id, s.stats.cpu_seconds)
        served = sum(v for v in d.values() if v > 0)
        for uid, n in d.items():
            if n > 0 and uid in owner:
                cpu[owner[uid]] += busy * n / served
                moved[owner[uid]] += n * row_bytes[uid]
        budget = s.memory_budget_bytes or 1
        cap = s.disk_capacity_bytes
        uses.append(ServerUse(s.server_id, s.stats.resident_bytes / budget, s.stats.rss_bytes,
                              busy / dt if dt > 0 else 0.0,
                              s.stats.disk_bytes / cap if cap else 0.0))
    held = _memory_held(m1)
    reads = _reads_by_model(m0, m1, owner)
    costs = []
    for md in m1.models:
        k = (md.name, md.version)
        n = requests.get(k, 0.0)
        ids, misses, memory = reads.get(k, (0, 0, 0))
        costs.append(ModelCost(md.name, md.version, n / dt if dt > 0 else 0.0,
                               cpu[k] / n * 1000 if n else None,
                               moved[k] / n * 1000 if n else None, held.get(k, 0),
                               memory, misses / ids if ids else None))
    return costs, uses


def _reads_by_model(m0: pb.ShardMap, m1: pb.ShardMap, owner) -> dict:
    """(model, version) -> (ids read in the window, of those from RocksDB, memory holding its
    rows now), from the servers' per-table counters."""
    before = {(s.server_id, tl.table_uid): (tl.ids, tl.misses)
              for s in m0.servers for tl in s.stats.table_loads}
    out: dict = {}
    for s in m1.servers:
        for tl in s.stats.table_loads:
            k = owner.get(tl.table_uid)
            if k is None:
                continue
            ids0, misses0 = before.get((s.server_id, tl.table_uid), (0, 0))
            ids, misses, memory = out.get(k, (0, 0, 0))
            out[k] = (ids + tl.ids - ids0, misses + tl.misses - misses0,
                      memory + tl.cache_bytes)
    return out


def _memory_held(m: pb.ShardMap) -> dict[tuple[str, int], int]:
    from embeddings.specs import TableSpec
    copies = {}
    for rs in m.partitions:
        copies[(rs.table_uid, rs.partition)] = len(rs.replicas)
    out = {}
    for md in m.models:
        total = 0
        for t in md.tables:
            spec = TableSpec.from_proto(t)
            per = -(-t.num_embeddings // t.num_partitions) * spec.row_bytes
            total += per * sum(copies.get((t.table_uid, p), 0) for p in range(t.num_partitions))
        out[(md.name, md.version)] = total
    return out


def table(costs: list[ModelCost], uses: list[ServerUse]) -> str:
    """``shoal cost``'s printout."""
    lines = [f"{'model':<16} {'ver':>3} {'queries/s':>10} {'CPU-s/1k q':>11} "
             f"{'MiB moved/1k q':>15} {'MiB stored':>10} {'MiB in memory':>13} "
             f"{'from disk':>9}"]
    for c in costs:
        cpu = f"{c.cpu_s_per_1k:.3f}" if c.cpu_s_per_1k is not None else "-"
        mib = f"{c.bytes_per_1k / 2**20:.2f}" if c.bytes_per_1k is not None else "-"
        disk = f"{c.miss_share:.1%}" if c.miss_share is not None else "-"
        lines.append(f"{c.model:<16} {c.version:>3} {c.queries_per_s:>10.1f} {cpu:>11} "
                     f"{mib:>15} {c.memory_bytes / 2**20:>10.1f} "
                     f"{c.in_memory_bytes / 2**20:>13.1f} {disk:>9}")
    lines.append("")
    lines.append(f"{'server':<8} {'memory tier / budget':>21} {'RSS MiB':>8} "
                 f"{'disk / capacity':>16} {'CPU (cores)':>12}")
    for u in uses:
        lines.append(f"{u.server_id:<8} {u.memory_share:>20.1%} {u.rss_bytes / 2**20:>8.0f} "
                     f"{u.disk_share:>16.2%} {u.cpu_share:>12.2f}")
    return "\n".join(lines)
