"""Micro-batching: lookups that arrive within a short window are merged into one batch.

Leader / follower, with no threads of its own: ``run`` is called from RPC threads. The first
request to arrive while no batch is forming becomes the leader: it waits out the window (or
until ``max_ids`` ids are waiting), takes every request queued by then, runs them grouped by key
(model) in its own thread, and hands each follower its result. A lone request costs one short
wait and no thread hand-off; several batches can run at once in different RPC threads.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Callable, Hashable


class Batcher:
    def __init__(self, execute: Callable[[list], list], window_s: float, max_ids: int):
        """``execute(items)`` returns one result per item, or raises (failing all of them)."""
        self._execute = execute
        self._window = window_s
        self._max_ids = max_ids
        self._cond = threading.Condition()
        self._pending: list = []
        self._pending_ids = 0
        self._forming = False

    def run(self, item, key: Hashable, num_ids: int):
        """Run ``item`` in a merged batch with the others of the same ``key``; return its
        result (or raise the batch's error)."""
        fut: Future = Future()
        with self._cond:
            self._pending.append((key, item, fut))
            self._pending_ids += num_ids
            lead = not self._forming
            if lead:
                self._forming = True
            elif self._pending_ids >= self._max_ids:
                self._cond.notify_all()          # close the window early
        if lead:
            self._lead()
        return fut.result()

    def _lead(self) -> None:
        deadline = time.monotonic() + self._window
        with self._cond:
            while self._pending_ids < self._max_ids:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._pending, self._pending_ids = self._pending, [], 0
            self._forming = False
        groups: dict[Hashable, list] = {}
        for key, item, fut in batch:
            groups.setdefault(key, []).append((item, fut))
        for group in groups.values():
            try:
                results = self._execute([item for item, _ in group])
            except BaseException as e:          # every waiting caller gets the error
                for _, fut in group:
                    fut.set_exception(e)
                continue
            for (_, fut), result in zip(group, results):
                fut.set_result(result)
