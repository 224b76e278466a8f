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


class WholeRowReaders(Workers):
    """Threads that read rows (``read(client) -> [n, dim]``, each client from ``connect()``)
    while updates write one value into every element of those rows: each row read must be one
    value throughout (never half one write, half another) and never below ``acked``, the last
    value acknowledged for every row before the read began. ``errors`` and ``reads`` are for
    the test to check after the block."""

    def __init__(self, connect, read, n: int = 2):
        super().__init__(n)
        self._connect, self._read = connect, read
        self.acked = 0.0
        self.errors: list[Exception] = []
        self.reads = 0

    def _run(self, i: int) -> None:
        import numpy as np
        c = self._connect()
        try:
            while not self._stop.is_set():
                floor = self.acked
                got = np.asarray(self._read(c))
                if not (got.min(1) == got.max(1)).all():
                    bad = int(np.flatnonzero(got.min(1) != got.max(1))[0])
                    raise AssertionError(f"row {bad} mixes values: {got[bad]}")
                if got[:, 0].min() < floor:
                    raise AssertionError(f"a row reads {got[:, 0].min()} after value {floor} "
                                         "was acknowledged for every row")
                self.reads += 1
        except Exception as e:                   # noqa: BLE001 - the test reports it
            self.errors.append(e)
        finally:
            c.close()
