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
