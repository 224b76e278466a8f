"""Micro-batching: lookups that arrive within a short window are merged into one batch.

Leader / follower on the router's event loop: the first request to arrive while no batch is
forming becomes the leader. It waits out the window (or until ``max_ids`` ids are waiting),
takes every request queued by then, runs them grouped by key (model) and hands each follower its
result. A lone request costs one short wait; several batches can be in flight at once.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Hashable


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
    ``router.moe``). One batch of a key runs at a time; the calls that arrive meanwhile make
    up the next. It starts as soon as the callers of the batch before are back (as many calls
    waiting as it took, plus those that were already waiting), or once ``max_ids`` ids wait,
    or when calls stop coming (none for ``gap_s``), and at the latest ``window_s`` after its
    first call. A lone caller never waits; callers in lockstep run as one batch per step even
    when their calls reach the router spread over several milliseconds; a caller that leaves
    costs one gap, once. ``await execute(items)`` returns one result per item, or raises
    (failing them all)."""

    def __init__(self, execute: Callable[[list], Awaitable[list]], window_s: float,
                 max_ids: int, gap_s: float = 0.003):
        self._execute = execute
        self._window = window_s
        self._gap = min(gap_s, window_s)
        self._max_ids = max_ids
        self._keys: dict[Hashable, _Step] = {}
        self.batches = 0                            # batches run
        self.merged = 0                             # calls that ran in a batch of two or more

    async def run(self, item, key: Hashable, num_ids: int):
        st = self._keys.get(key)
        if st is None:
            if len(self._keys) >= MAX_STEP_KEYS:    # keys of versions long gone
                for k in [k for k, v in self._keys.items() if v.driver is None]:
                    del self._keys[k]
            st = self._keys[key] = _Step()
        fut = asyncio.get_running_loop().create_future()
        st.pending.append((item, fut, num_ids))
        st.ids += num_ids
        st.last = max(st.last, asyncio.get_running_loop().time())
        st.arrived.set()
        if st.driver is None:
            st.driver = asyncio.create_task(self._drive(key, st))
        return await fut

    def _ready(self, st: "_Step") -> bool:
        return len(st.pending) >= st.expect or st.ids >= self._max_ids

    async def _drive(self, key: Hashable, st: "_Step") -> None:
        loop = asyncio.get_running_loop()
        try:
            while st.pending:
                first = loop.time()
                while not self._ready(st):
                    until = min(first + self._window, st.last + self._gap)
                    if loop.time() >= until:
                        break
                    st.arrived.clear()
                    try:
                        await asyncio.wait_for(st.arrived.wait(), until - loop.time())
                    except asyncio.TimeoutError:
                        pass
                batch, ids = [], 0
                while st.pending and (not batch or ids + st.pending[0][2] <= self._max_ids):
                    entry = st.pending.pop(0)
                    st.ids -= entry[2]
                    if not entry[1].done():                 # its caller has not given up
                        batch.append(entry)
                        ids += entry[2]
                if not batch:
                    continue
                self.batches += 1
                self.merged += len(batch) if len(batch) > 1 else 0
                try:
                    results = await self._execute([item for item, _, _ in batch])
                except Exception as e:                  # every waiting caller gets the error
                    for _, fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(e)
                else:
                    for (_, fut, _), r in zip(batch, results):
                        if not fut.done():
                            fut.set_result(r)
                st.expect = max(1, len(batch) + len(st.pending))
                # Its callers get two gaps to start coming back.
                st.last = max(st.last, loop.time() + self._gap)
        finally:
            st.driver = None                # the key's state stays: its callers come back
            if st.pending:                  # arrived as the driver was ending
                st.driver = asyncio.create_task(self._drive(key, st))


class _Step:
    def __init__(self):
        self.pending: list = []                     # (item, future, num_ids)
        self.ids = 0
        self.expect = 1
        self.last = 0.0                             # when the last call came (loop time)
        self.arrived = asyncio.Event()
        self.driver: asyncio.Task | None = None
