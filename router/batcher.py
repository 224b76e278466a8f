"""Micro-batching: lookups that arrive within a short window are merged into one batch.

Leader / follower on the router's event loop: the first request to arrive while no batch is
forming becomes the leader. It waits out the window (or until ``max_ids`` ids are waiting),
takes every request queued by then, runs them grouped by key (model) and hands each follower its
result. A lone request costs one short wait; several batches can be in flight at once.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Awaitable, Callable, Hashable

from shoal.errors import Unavailable


class Batcher:
    def __init__(self, execute: Callable[[list], Awaitable[list]], window_s: float,
                 max_ids: int):
        """``await execute(items)`` returns one result per item, or raises (failing them all)."""
        self._execute = execute
        self._window = window_s
        self._max_ids = max_ids
        self._pending: list = []
        self._pending_ids = 0
        self._full: asyncio.Event | None = None     # exists while a batch is forming
        self._tasks: set[asyncio.Task] = set()

    async def run(self, item, key: Hashable, num_ids: int):
        """Run ``item`` in a merged batch with the others of the same ``key``; return its
        result (or raise the batch's error)."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((key, item, fut))
        self._pending_ids += num_ids
        if self._full is None:
            # The batch runs as its own task, so a leader whose caller gives up (deadline,
            # cancel) does not strand the followers.
            self._full = asyncio.Event()
            task = asyncio.create_task(self._lead(self._full))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif self._pending_ids >= self._max_ids:
            self._full.set()                        # close the window early
        return await fut

    async def _lead(self, full: asyncio.Event) -> None:
        if self._pending_ids < self._max_ids:
            try:
                await asyncio.wait_for(full.wait(), self._window)
            except asyncio.TimeoutError:
                pass
        batch, self._pending, self._pending_ids, self._full = self._pending, [], 0, None
        groups: dict[Hashable, list] = {}
        for key, item, fut in batch:
            groups.setdefault(key, []).append((item, fut))
        for group in groups.values():
            try:
                results = await self._execute([item for item, _ in group])
            except Exception as e:                  # every waiting caller gets the error
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(group, results):
                if not fut.done():
                    fut.set_result(result)


MAX_STEP_KEYS = 1024


class StepBatcher:
    """Continuous batching, per key, for callers that come back step after step (MoE decode:
    ``router.moe``). Up to ``lanes`` batches of a key run at a time; the calls that arrive
    meanwhile make up the next. A batch starts, on a free lane, as soon as the callers of the
    batch before it are back (as many calls waiting as that batch took), or once ``max_ids``
    ids wait, or when calls stop coming (none for ``gap_s``), and at the latest ``window_s``
    after its first call. A lone caller never waits; callers in lockstep run as one batch per
    step (``lanes`` = 1) even when their calls reach the router spread over several
    milliseconds; a caller that leaves costs one gap, once.

    With ``lanes`` > 1 a batch takes at most its share of the calls in flight (running and
    waiting, over ``lanes``), so lockstep callers settle into ``lanes`` groups whose steps
    overlap: one group's batch runs on the servers while the others' answers and next calls
    travel. ``await execute(items)`` returns one result per item, or raises (failing them
    all)."""

    def __init__(self, execute: Callable[[list], Awaitable[list]], window_s: float,
                 max_ids: int, gap_s: float = 0.003, lanes: int = 1):
        self._execute = execute
        self._window = window_s
        self._gap = min(gap_s, window_s)
        self._max_ids = max_ids
        self._lanes = max(1, lanes)
        self._keys: dict[Hashable, _Step] = {}
        self.batches = 0                            # batches run
        self.merged = 0                             # calls that ran in a batch of two or more

    async def run(self, item, key: Hashable, num_ids: int):
        st = self._keys.get(key)
        if st is None:
            if len(self._keys) >= MAX_STEP_KEYS:    # keys of versions long gone
                for k in [k for k, v in self._keys.items()
                          if v.driver is None and not v.running]:
                    del self._keys[k]
            st = self._keys[key] = _Step()
        fut = asyncio.get_running_loop().create_future()
        st.pending.append((item, fut, num_ids))
        st.ids += num_ids
        st.last = max(st.last, asyncio.get_running_loop().time())
        st.wake.set()
        if st.driver is None:
            st.driver = asyncio.create_task(self._drive(key, st))
        return await fut

    def _share(self, st: "_Step") -> int:
        """The calls a batch may take: all waiting (one lane), else its share of the calls
        in flight."""
        if self._lanes == 1:
            return len(st.pending)
        return max(1, -(-(st.running_calls + len(st.pending)) // self._lanes))

    def _ready(self, st: "_Step") -> bool:
        expect = st.owed[0] if st.owed else 1
        if self._lanes > 1:
            expect = min(expect, self._share(st))
        return len(st.pending) >= expect or st.ids >= self._max_ids

    async def _wait(self, st: "_Step", until: float) -> None:
        st.wake.clear()
        try:
            await asyncio.wait_for(st.wake.wait(), max(0.0, until - asyncio.get_running_loop()
                                                        .time()))
        except asyncio.TimeoutError:
            pass

    async def _drive(self, key: Hashable, st: "_Step") -> None:
        loop = asyncio.get_running_loop()
        try:
            while st.pending:
                if st.running >= self._lanes:           # every lane busy: wait for one
                    await self._wait(st, loop.time() + 3600)
                    continue
                first = loop.time()
                while not self._ready(st):
                    until = min(first + self._window, st.last + self._gap)
                    if loop.time() >= until:
                        break
                    await self._wait(st, until)
                cap = self._share(st)
                if st.owed:
                    st.owed.popleft()
                batch, ids = [], 0
                while st.pending and len(batch) < cap and \
                        (not batch or ids + st.pending[0][2] <= self._max_ids):
                    entry = st.pending.popleft()
                    st.ids -= entry[2]
                    if not entry[1].done():                 # its caller has not given up
                        batch.append(entry)
                        ids += entry[2]
                if batch:
                    st.running += 1
                    st.running_calls += len(batch)
                    task = asyncio.create_task(self._run_batch(st, batch))
                    st.tasks.add(task)
                    task.add_done_callback(st.tasks.discard)
                    _cancel_when_abandoned(task, [fut for _, fut, _ in batch])
                    await asyncio.sleep(0)          # let it start before the next is formed
        finally:
            st.driver = None                # the key's state stays: its callers come back
            if st.pending:                  # arrived as the driver was ending
                st.driver = asyncio.create_task(self._drive(key, st))

    async def _run_batch(self, st: "_Step", batch: list) -> None:
        self.batches += 1
        self.merged += len(batch) if len(batch) > 1 else 0
        try:
            results = await self._execute([item for item, _, _ in batch])
        except Exception as e:                      # every waiting caller gets the error
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(e)
        else:
            for (_, fut, _), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)
        finally:
            for _, fut, _ in batch:                 # cancelled under a caller still waiting
                if not fut.done():
                    fut.set_exception(Unavailable("the merged batch this call ran in was "
                                                  "cancelled; call again"))
            st.running -= 1
            st.running_calls -= len(batch)
            # Its callers will be back (one lane: and those waiting already go with them).
            st.owed.append(len(batch) + (len(st.pending) if self._lanes == 1 else 0))
            # They get two gaps to start coming back.
            st.last = max(st.last, asyncio.get_running_loop().time() + self._gap)
            st.wake.set()


def _cancel_when_abandoned(task: asyncio.Task, futures: list) -> None:
    """Cancel ``task`` (a batch) once every caller in it has given up (deadline, cancel):
    a batch stuck on a hung server must not hold its lane for the callers after it."""
    def check(_):
        if not task.done() and all(f.done() for f in futures):
            task.cancel()
    for f in futures:
        f.add_done_callback(check)


class _Step:
    def __init__(self):
        self.pending: collections.deque = collections.deque()   # (item, future, num_ids)
        self.ids = 0
        self.owed: collections.deque = collections.deque()  # sizes of batches whose callers
        self.running = 0                                    # are not all back yet
        self.running_calls = 0
        self.last = 0.0                             # when the last call came (loop time)
        self.wake = asyncio.Event()                 # a call came, or a batch ended
        self.driver: asyncio.Task | None = None
        self.tasks: set[asyncio.Task] = set()
