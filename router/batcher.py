"""Micro-batching: requests that arrive within a short window are merged into one batch.

``submit`` is called from RPC threads and returns a Future. One collector thread takes the first
waiting request, keeps collecting until the window closes or the batch holds ``max_ids`` ids,
groups the batch by model and hands each group to ``execute`` on a small pool, so several merged
batches can be in flight while the next is collected.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable


class Batcher:
    def __init__(self, execute: Callable[[list], list], window_s: float, max_ids: int,
                 executors: int):
        """``execute(items)`` returns one result per item, or raises (failing all of them)."""
        self._execute = execute
        self._window = window_s
        self._max_ids = max_ids
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=executors, thread_name_prefix="batch")
        self._stop = threading.Event()
        threading.Thread(target=self._collect, daemon=True, name="batcher").start()

    def submit(self, item, key: Hashable, num_ids: int) -> Future:
        fut: Future = Future()
        self._queue.put((key, item, num_ids, fut))
        return fut

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._pool.shutdown(wait=False)

    def _collect(self) -> None:
        while not self._stop.is_set():
            first = self._queue.get()
            if first is None:
                return
            batch, ids = [first], first[2]
            deadline = time.monotonic() + self._window
            while ids < self._max_ids:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
                ids += nxt[2]
            groups: dict[Hashable, list] = {}
            for entry in batch:
                groups.setdefault(entry[0], []).append(entry)
            for group in groups.values():
                self._pool.submit(self._run, group)

    def _run(self, group: list) -> None:
        try:
            results = self._execute([item for _, item, _, _ in group])
        except BaseException as e:   # every waiting caller gets the error
            for *_, fut in group:
                fut.set_exception(e)
            return
        for (*_, fut), result in zip(group, results):
            fut.set_result(result)
