"""Background traffic for tests: worker threads that run until the ``with`` block ends."""
from __future__ import annotations

import threading


class Workers:
    """``n`` daemon threads running ``self._run(i)``; ``self._stop`` is set on exit, and the
    threads are joined (at most ``join_s`` each). Subclasses write ``_run``."""

    def __init__(self, n: int = 2, join_s: float = 60.0):
        self._stop = threading.Event()
        self._join_s = join_s
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(n)]

    def _run(self, i: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(self._join_s)
