"""The dense parameters of model versions, as the router needs them: an expert layer's gate,
score correction and shared expert (and, later, a model's dense part).

A version's dense parameters never change once it is ready (the coordinator takes them only
while it loads), so the router fetches them once per version from the coordinator and keeps
the few most recently used versions. Concurrent first uses of one version share one fetch.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict

import grpc
import numpy as np
import torch

from shoal.errors import from_rpc_error
from shoal.proto import shoal_pb2 as pb
from shoal.wire import unpack

KEEP_VERSIONS = 8
FETCH_TIMEOUT_S = 120.0


class DenseCache:
    def __init__(self, coordinator, keep: int = KEEP_VERSIONS):
        """``coordinator``: a CoordinatorStub on a grpc.aio channel."""
        self._coord = coordinator
        self._keep = keep
        self._versions: OrderedDict[tuple[str, int], asyncio.Task] = OrderedDict()
        self._derived: dict[tuple, object] = {}
        self.fetches = 0

    async def get(self, model: str, version: int) -> dict[str, torch.Tensor]:
        """Version ``version`` (not 0) of ``model``'s dense parameters, by name."""
        key = (model, version)
        task = self._versions.get(key)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.ensure_future(self._fetch(model, version))
            self._versions[key] = task
            while len(self._versions) > self._keep:
                old, _ = self._versions.popitem(last=False)
                self._derived = {k: v for k, v in self._derived.items() if k[:2] != old}
        self._versions.move_to_end(key)
        return await asyncio.shield(task)

    async def derived(self, model: str, version: int, name: str, make):
        """``make(params)`` for one version, computed once (e.g. a layer's checked weights)."""
        key = (model, version, name)
        if key not in self._derived:
            value = make(await self.get(model, version))
            if (model, version) in self._versions:
                self._derived[key] = value
            return value
        return self._derived[key]

    async def _fetch(self, model: str, version: int) -> dict[str, torch.Tensor]:
        self.fetches += 1
        try:
            reply = await self._coord.GetDense(pb.GetDenseRequest(model=model, version=version),
                                               timeout=FETCH_TIMEOUT_S)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return {n: torch.from_numpy(np.array(unpack(t, n)))
                for n, t in zip(reply.names, reply.tensors)}
