"""Tail-latency control for reads: per-server latency tracking, hedging and a retry budget.

A read to a replica that has not answered within that server's recent p95 (times a factor, at
least a floor) is sent to another replica as well; the first answer wins. Hedges and error
retries draw on a token bucket that fills by a fraction of the requests served plus a small
steady rate, so a sick cluster never sees a retry storm. The clock is injected for tests.
"""
from __future__ import annotations

import collections
import time
from typing import Callable

import numpy as np


class LatencyTracker:
    """Recent latencies of each server; the percentile is recomputed every ``every`` samples."""

    def __init__(self, window: int = 256, percentile: float = 95.0, every: int = 16):
        self._window = window
        self._percentile = percentile
        self._every = every
        self._samples: dict[int, collections.deque] = {}
        self._counts: dict[int, int] = {}
        self._cached: dict[int, float] = {}

    def observe(self, server: int, seconds: float) -> None:
        d = self._samples.setdefault(server, collections.deque(maxlen=self._window))
        d.append(seconds)
        n = self._counts[server] = self._counts.get(server, 0) + 1
        if n % self._every == 0 or server not in self._cached:
            self._cached[server] = float(np.percentile(np.fromiter(d, float), self._percentile))

    def percentiles(self, min_samples: int) -> dict[int, float]:
        return {s: p for s, p in self._cached.items()
                if len(self._samples[s]) >= min_samples}

    def best(self, min_samples: int) -> float | None:
        ps = self.percentiles(min_samples)
        return min(ps.values()) if ps else None

    def percentile(self, server: int, min_samples: int) -> float | None:
        if len(self._samples.get(server, ())) < min_samples:
            return None
        return self._cached.get(server)


class RetryBudget:
    """Token bucket: ``ratio`` tokens per request served plus ``min_per_s`` per second, at most
    ``cap``; each hedge or retry takes one."""

    def __init__(self, ratio: float, min_per_s: float, cap: float = 100.0,
                 clock: Callable[[], float] = time.monotonic):
        self._ratio, self._min_per_s, self._cap = ratio, min_per_s, cap
        self._clock = clock
        self._tokens = cap / 10
        self._last = clock()

    def deposit(self) -> None:
        self._tokens = min(self._cap, self._tokens + self._ratio)

    def withdraw(self) -> bool:
        now = self._clock()
        self._tokens = min(self._cap, self._tokens + (now - self._last) * self._min_per_s)
        self._last = now
        if self._tokens >= 1.0 - 1e-9:          # 10 deposits of 0.1 make one token
            self._tokens -= 1.0
            return True
        return False


class Hedger:
    def __init__(self, enabled: bool, factor: float, min_delay_s: float, min_samples: int,
                 budget: RetryBudget, tracker: LatencyTracker | None = None):
        self.enabled = enabled
        self._factor = factor
        self._min_delay = min_delay_s
        self._min_samples = min_samples
        self.budget = budget
        self.tracker = tracker or LatencyTracker()
        self.hedges = 0
        self.hedge_wins = 0

    def delay(self, server: int) -> float | None:
        """How long to wait for ``server`` before hedging: the recent p95 of the fastest server
        (so a server that is slow all the time is still hedged), times the factor, at least the
        floor. None: do not hedge (hedging off, or too few samples yet)."""
        if not self.enabled:
            return None
        best = self.tracker.best(self._min_samples)
        return None if best is None else max(self._min_delay, best * self._factor)

    def slow(self, probe: bool) -> frozenset[int]:
        """Servers whose p95 is over ``SLOW_RATIO`` times the fastest one's: reads avoid them
        while another replica exists. On a ``probe`` turn none is avoided, so a server that
        recovers is noticed."""
        if not self.enabled or probe:
            return frozenset()
        best = self.tracker.best(self._min_samples)
        if best is None:
            return frozenset()
        return frozenset(s for s, p in self.tracker.percentiles(self._min_samples).items()
                         if p > SLOW_RATIO * max(best, self._min_delay))


SLOW_RATIO = 4.0
