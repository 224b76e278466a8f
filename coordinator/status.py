"""The coordinator's web endpoint: the status page, its data, and the Prometheus metrics.

One HTTP port per coordinator (``StatusServer``) serves ``/`` (``status.html``: plain HTML and
JavaScript, no build step, which polls ``/status.json`` and redraws), ``/status.json``
(``status_view``: servers and the partitions each holds, memory per server, the load of every
partition and expert as the servers' heartbeats report it, moves and splits in flight, the
recent failures) and ``/metrics`` (the process's Prometheus registry). The view is computed per
request from the map the coordinator would hand a router, so the page shows what routers see.
"""
from __future__ import annotations

import collections
import json
import pathlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shoal.proto import shoal_pb2 as pb

PAGE = pathlib.Path(__file__).with_name("status.html")


class EventLog:
    """The coordinator's recent events (a server missing its lease, a replica reported
    unreachable, a copy that could not be started), newest last; bounded, thread-safe, soft."""

    def __init__(self, size: int = 100):
        self._events: collections.deque = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, kind: str, text: str) -> None:
        with self._lock:
            self._events.append({"time": time.time(), "kind": kind, "text": text})

    def recent(self) -> list[dict]:
        with self._lock:
            return list(self._events)


def status_view(m: pb.ShardMap, partition_load: dict[tuple[int, int], float],
                server_load: dict[str, float], events: list[dict]) -> dict:
    """What the status page draws, as plain JSON types. ``partition_load``: ids (for an expert
    layer's table: tokens) per second per (table_uid, partition), over its servers;
    ``server_load``: ids per second each server serves."""
    held: dict[str, list] = collections.defaultdict(list)
    for rs in m.partitions:
        for i, s in enumerate(rs.replicas):
            held[s].append([rs.table_uid, rs.partition, "leader" if i == 0 else "follower"])
        for s in rs.learners:
            held[s].append([rs.table_uid, rs.partition, "learner"])
    replicas = {(rs.table_uid, rs.partition): rs for rs in m.partitions}
    servers = [{
        "id": s.server_id, "address": s.address, "state": s.state, "domain": s.domain,
        "draining": s.draining, "heartbeat_age_s": round(s.last_heartbeat_age_s, 3),
        "memory": {"budget": s.memory_budget_bytes, "memory_tier": s.stats.resident_bytes,
                   "replication_log": s.stats.replication_log_bytes, "rss": s.stats.rss_bytes,
                   "row_cache": s.stats.cache_bytes, "rocksdb": s.stats.store_memory_bytes},
        "disk": {"capacity": s.disk_capacity_bytes, "used": s.stats.disk_bytes,
                 "rows": s.stats.raw_bytes},
        # ids served from memory, since the server started (1 before any)
        "hit_rate": round(1.0 - s.stats.cold_ids / s.stats.ids_looked_up, 4)
        if s.stats.ids_looked_up else 1.0,
        "rows": s.stats.rows, "raw_bytes": s.stats.raw_bytes,
        "load": round(server_load.get(s.server_id, 0.0), 3),
        "partitions": sorted(held.get(s.server_id, [])),
        "metrics": s.metrics_address,
    } for s in sorted(m.servers, key=lambda s: s.server_id)]
    tables = []
    for md in m.models:
        expert_tables = {x.table: x.name for x in md.expert_layers}
        for t in md.tables:
            loads = [round(partition_load.get((t.table_uid, p), 0.0), 3)
                     for p in range(t.num_partitions)]
            sets = [list(replicas[(t.table_uid, p)].replicas) if (t.table_uid, p) in replicas
                    else [] for p in range(t.num_partitions)]
            tables.append({"model": md.name, "version": md.version, "current": md.current,
                           "state": md.state, "table": t.name, "table_uid": t.table_uid,
                           "expert_layer": expert_tables.get(t.name, ""),
                           "num_partitions": t.num_partitions, "load": loads,
                           "replicas": sets})
    moves = [{"table_uid": mv.table_uid, "partition": mv.partition, "source": mv.source,
              "target": mv.target, "bytes": mv.bytes, "bytes_done": mv.bytes_done,
              "phase": mv.phase, "seconds": round(mv.seconds, 1)} for mv in m.moves]
    splits = [{"model": sp.model, "table": sp.table, "table_uid": sp.table_uid,
               "frozen": sp.frozen} for sp in m.splits]
    return {"map_version": m.version, "time": time.time(), "servers": servers,
            "tables": tables, "moves": moves, "splits": splits, "events": events[-50:]}


class StatusServer:
    """``/``, ``/status.json`` and ``/metrics`` on one port, in a daemon thread."""

    def __init__(self, view: Callable[[], dict], registry, host: str = "127.0.0.1",
                 port: int = 0):
        page = PAGE.read_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):                       # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                try:
                    if path in ("/", "/index.html"):
                        self._send(200, "text/html; charset=utf-8", page)
                    elif path == "/status.json":
                        self._send(200, "application/json",
                                   json.dumps(view()).encode())
                    elif path == "/metrics":
                        self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                    else:
                        self._send(404, "text/plain", f"no page {path!r}: try /, "
                                   "/status.json or /metrics\n".encode())
                except Exception as e:              # never take the coordinator down
                    self._send(500, "text/plain", f"{type(e).__name__}: {e}\n".encode())

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):           # quiet: the page polls every second
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.address = f"{host}:{self._httpd.server_port}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True,
                         name="status-http").start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
