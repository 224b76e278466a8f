"""Lookup load per partition, from the cumulative counters servers send with each heartbeat.

A server counts the ids it looks up per partition (``ServerStats.table_loads``); the rate is
the difference between two heartbeats over the time between them, smoothed (an exponentially
weighted mean with a time constant), and a partition's load is the sum over the servers that
serve it. Soft state: lost with the coordinator, rebuilt within a few heartbeats.
"""
from __future__ import annotations

import math

import numpy as np

from shoal.errors import ShoalError
from shoal.wire import unpack


class LoadTracker:
    def __init__(self, time_constant_s: float = 10.0):
        self._tau = time_constant_s
        self._last: dict[str, tuple[float, dict[int, np.ndarray]]] = {}  # server -> (t, counts)
        self._rate: dict[str, dict[int, np.ndarray]] = {}       # server -> uid -> ids/s [P]

    def observe(self, server: str, now: float, loads) -> None:
        """Take one heartbeat's cumulative counters (``pb.TableLoad``s) from ``server``."""
        counts = {}
        for tl in loads:
            try:
                counts[tl.table_uid] = unpack(tl.ids_looked_up, "ids_looked_up", "int64", 1)
            except ShoalError:         # a malformed report is ignored, not fatal
                continue
        prev = self._last.get(server)
        self._last[server] = (now, counts)
        if prev is None or now <= prev[0]:
            return
        dt = now - prev[0]
        w = 1.0 - math.exp(-dt / self._tau)
        rates = self._rate.setdefault(server, {})
        for uid, c in counts.items():
            old = prev[1].get(uid)
            if old is None or old.shape != c.shape or (c < old).any():   # restarted, resized
                continue
            inst = (c - old) / dt
            r = rates.get(uid)
            rates[uid] = inst if r is None or r.shape != inst.shape else r + w * (inst - r)
        for uid in set(rates) - set(counts):
            del rates[uid]

    def forget(self, server: str) -> None:
        self._last.pop(server, None)
        self._rate.pop(server, None)

    def partition_load(self) -> dict[tuple[int, int], float]:
        """Ids looked up per second per (table_uid, partition), over all servers."""
        out: dict[tuple[int, int], float] = {}
        for rates in self._rate.values():
            for uid, r in rates.items():
                for p in np.flatnonzero(r > 0).tolist():
                    out[(uid, p)] = out.get((uid, p), 0.0) + float(r[p])
        return out

    def server_load(self) -> dict[str, float]:
        """Ids looked up per second by each server."""
        return {s: float(sum(r.sum() for r in rates.values()))
                for s, rates in self._rate.items()}


    def table_server_load(self, table_uid: int) -> dict[str, float]:
        """Ids (for an expert layer's table: tokens) per second each server serves of one
        table."""
        return {s: float(rates[table_uid].sum()) for s, rates in self._rate.items()
                if table_uid in rates}
