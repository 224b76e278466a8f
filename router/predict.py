"""Predict: candidates scored by a model version's dense part (``shoal.dense_part``).

Requests that arrive within ``predict_window_ms`` of each other are merged per (model,
version) by a ``Batcher``: one pooled lookup for all of them (``pooled_lookup``, itself one
fan-out per shard server), one run of the dense part over every candidate, and the scores
split back per request. The dense part runs in a worker thread (torch releases the GIL in its
ops), so the event loop keeps answering lookups meanwhile.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from router.pooled import Query
from shoal.dense_part import DensePart, Scorer
from shoal.errors import InvalidArgument, ResourceExhausted, ShoalError


@dataclass
class PredictItem:
    query: Query                 # the sparse features, validated
    dense: torch.Tensor          # float32 [B, dense_in_features]
    top_k: int
    arrived: float


@dataclass
class Prediction:
    scores: np.ndarray           # float32 [B] or the top k, best first
    indices: np.ndarray | None   # int64, with top_k
    timings: dict


async def scorer_for(dense_cache, model) -> Scorer:
    """The version's dense part, ready to run; built once per version, on first use."""
    def make(params):
        part = DensePart.from_params(params)
        if part is None:
            raise ShoalError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"model {model.name!r} v{model.version} has no dense part to "
                             "predict with (store one with the version: client.put_dense_part "
                             "or load(..., dense_part=...))")
        dims = [model.feature(f).spec.dim for f in part.features]   # NOT_FOUND if unknown
        return part.build(params, dims)
    return await dense_cache.derived(model.name, model.version, "dense_part", make)


def check_request(scorer: Scorer, keys: list[str], dense: torch.Tensor, batch_size: int,
                  top_k: int, max_batch: int) -> None:
    part = scorer.part
    if len(keys) != len(part.features) or set(keys) != set(part.features):
        missing = [f for f in part.features if f not in keys]
        extra = [k for k in keys if k not in part.features]
        raise InvalidArgument(f"sparse.keys: the dense part takes features "
                              f"{list(part.features)}; "
                              + (f"missing {missing}" if missing else f"not taken {extra}"))
    if dense.dim() != 2 or dense.shape != (batch_size, scorer.dense_in_features):
        raise InvalidArgument(f"dense: shape {list(dense.shape)} must be [{batch_size}, "
                              f"{scorer.dense_in_features}] (batch_size x dense_in_features)")
    if not torch.isfinite(dense).all():
        raise InvalidArgument("dense: every value must be finite")
    if batch_size > max_batch:
        raise ResourceExhausted(f"sparse.batch_size: {batch_size} candidates exceed "
                                f"max_predict_batch {max_batch}; split the request")
    if top_k < 0:
        raise InvalidArgument(f"top_k: {top_k} must be >= 0")


async def predict_batch(items: list[PredictItem], lookup, scorer: Scorer,
                        executor=None) -> list[Prediction]:
    """Score the merged items: one lookup (``lookup(queries, columns)``: every query's
    pooled embeddings as one array, in the dense part's feature order), one dense run (in
    ``executor``, default: the loop's); split per item."""
    t0 = time.perf_counter()
    pooled = await lookup([it.query for it in items], tuple(scorer.part.features))
    t1 = time.perf_counter()
    emb = torch.from_numpy(pooled[0])
    dense = torch.cat([it.dense for it in items]) if len(items) > 1 else items[0].dense
    scores = await asyncio.get_running_loop().run_in_executor(executor, scorer.scores, dense,
                                                              emb)
    t2 = time.perf_counter()
    out, at = [], 0
    for it in items:
        s = scores[at: at + len(it.dense)]
        at += len(it.dense)
        idx = None
        if it.top_k:
            s, idx = torch.topk(s, min(it.top_k, len(s)))
            idx = idx.numpy()
        timings = {"batching": t0 - it.arrived, "lookup": t1 - t0, "dense": t2 - t1,
                   "batch_requests": float(len(items))}
        for k in ("merge", "fan_out", "servers", "combine", "pool_split"):   # the lookup's
            if it.query.timings and k in it.query.timings:                   # own stages
                timings[f"lookup_{k}"] = it.query.timings[k]
        out.append(Prediction(s.numpy(), idx, timings))
    return out
