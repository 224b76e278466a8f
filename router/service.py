"""The client-facing router: validates requests, merges concurrent lookups, and runs the
lookup / write paths against the shard servers."""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
import os
import resource
import uuid

import numpy as np

from shoal.config import RouterConfig
from shoal.errors import (InvalidArgument, ResourceExhausted, ShoalError, abort_async,
                          from_rpc_error)
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.wire import is_set, pack, to_torch, unpack
from experts.compute import check_hidden
from experts.gating import check_routing
from experts.specs import ExpertLayerWeights

import grpc

from shoal import security
from shoal.metrics import MODEL_REQUESTS, STAGE_SECONDS, record_rpc
from router.batcher import Batcher, StepBatcher
from router.dense import DenseCache
from router.moe import MoeItem, MoeStats, moe_batch
from router.predict import PredictItem, check_request, predict_batch, scorer_for
from router.hedging import Hedger, RetryBudget
from router.mapcache import MapCache
from router.pooled import Query, Stats, output_keys, pooled_lookup
from embeddings.specs import check_ids
from router.rows import lookup_rows, write_rows
from router.rowcache import RowCache
from router.transport import ShardTransport

log = logging.getLogger("router")
MAP_RECHECK_S = 0.05      # an unknown model re-reads the map at most this often
DEADLINE_MARGIN_S = 0.01  # answer DEADLINE_EXCEEDED this long before the caller's deadline


class RouterService(pbg.RouterServicer):
    def __init__(self, config: RouterConfig, maps: MapCache, transport: ShardTransport,
                 coordinator: pbg.CoordinatorStub):
        """``coordinator``: a stub on a grpc.aio channel. Construct inside the event loop."""
        self._cfg = config
        self._maps = maps
        self._transport = transport
        self._coord = coordinator
        self.stats = Stats()
        self.hedger = Hedger(config.hedge, config.hedge_factor, config.hedge_min_delay_ms / 1e3,
                             config.hedge_min_samples,
                             RetryBudget(config.retry_budget_ratio,
                                         config.retry_budget_min_per_s))
        self._requests = 0
        self._id = uuid.uuid4().hex[:12]        # this router's prefix for idempotency keys
        self._write_ids = itertools.count()
        self._batcher = Batcher(self._execute, config.batch_window_ms / 1000.0,
                                config.max_batch_ids)
        self.dense = DenseCache(coordinator)
        self._predict_batcher = Batcher(self._execute_predict, config.predict_window_ms / 1e3,
                                        config.max_predict_batch)
        # Dense parts run on one worker thread: torch releases the GIL in its kernels, so one
        # thread overlaps them with the event loop, and more only contend for the GIL
        # (bench/predict.py: 8-10% more requests/s than asyncio's default pool).
        self._dense_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dense")
        self.metrics_address = ""               # set by the process once it serves them
        self._slow_logged = 0.0
        self.moe = MoeStats()
        self._moe_batcher = StepBatcher(self._execute_moe, config.moe_window_ms / 1e3,
                                        config.max_moe_batch_tokens,
                                        lanes=config.moe_batch_lanes)
        self.row_cache = RowCache(config.row_cache_rows)
        self._cache_map = 0                     # the map version the cache last retained for
        self._map_recheck: asyncio.Future | None = None     # a re-read for an unknown model
        self._map_rechecked = 0.0

    # ------------------------------------------------------------ pooled lookup
    async def Lookup(self, request, context):
        try:
            self._requests += 1
            t0 = time.perf_counter()
            q = self._parse(request, await self._model(
                request.model, request.version, True, request.request_key))
            q.arrived = t0
            values = await self._in_time(
                context.time_remaining(),
                self._batcher.run(q, (q.model.name, q.model.version), q.num_ids),
                f"lookup of {q.num_ids} ids", t0)
            keys, dims = output_keys(q)
            self._counted("Lookup", q.model.name, q.model.version)
            timings = dict(q.timings or {}, total=time.perf_counter() - t0)
            self._traced("lookup", timings, f"lookup of {q.num_ids} ids, model {q.model.name} "
                         f"v{q.model.version}")
            reply = pb.PooledReply(keys=keys, length_per_key=dims, values=pack(values),
                                   version=q.model.version)
            if request.trace:
                reply.timings.update(timings)
            return reply
        except ShoalError as e:
            self._counted("Lookup", request.model, request.version, e)
            await abort_async(context, e)

    def _traced(self, path: str, timings: dict, what: str) -> None:
        """Every request's stages into the histograms; a slow one (over ``slow_request_ms``)
        logged with them, at most one a second."""
        for stage, seconds in timings.items():
            if stage not in ("total", "batch_requests"):
                STAGE_SECONDS.labels(path, stage).observe(seconds)
        total = timings.get("total", 0.0)
        now = time.monotonic()
        if total * 1e3 > self._cfg.slow_request_ms and now - self._slow_logged >= 1.0:
            self._slow_logged = now
            log.warning("slow request (%.1f ms > %.0f ms): %s; %s", total * 1e3,
                        self._cfg.slow_request_ms, what,
                        ", ".join(f"{k} {v * 1e3:.2f} ms" if k != "batch_requests" else
                                  f"{k} {int(v)}" for k, v in timings.items()))

    @staticmethod
    def _counted(rpc: str, model: str, version: int, error: ShoalError | None = None) -> None:
        """A client request answered, per model and version (0: the current one, when it
        failed before the version was known)."""
        MODEL_REQUESTS.labels(model, str(version or "current"), rpc,
                              error.code.name if error is not None else "OK").inc()

    async def _execute(self, queries: list[Query], columns: tuple[str, ...] | None = None
                       ) -> list[np.ndarray]:
        table = self._maps.current()
        if self.row_cache.enabled and table.version != self._cache_map:
            self._cache_map = table.version
            self.row_cache.retain(tr.spec.table_uid for route in table.versions.values()
                                  for tr in route.tables.values())
        return await pooled_lookup(queries, self._maps, self._transport,
                                   self._cfg.rpc_timeout_s, self._cfg.dedup_pooled, self.stats,
                                   self.hedger, self.row_cache, columns)

    async def _in_time(self, left: float | None, work, what: str, t0: float):
        """``await work`` within the caller's deadline, ``left`` seconds from now
        (``context.time_remaining()``; None: ``router.default_deadline_s``): past it,
        DEADLINE_EXCEEDED, never a partial answer. A merged batch goes on for the other
        requests in it; an unmerged call is cancelled."""
        limit = self._cfg.default_deadline_s if left is None else left - DEADLINE_MARGIN_S
        try:
            return await asyncio.wait_for(work, max(limit, 0.0))
        except asyncio.TimeoutError:
            raise ShoalError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"{what}: not answered within the request's deadline "
                             f"({time.perf_counter() - t0:.3f} s)") from None

    async def _model(self, name: str, version: int, readable: bool = False, key: str = ""):
        """The model version a request names (0: the current one, or, with a ``key``, the
        version of an A/B split the key hashes into). Not in this router's map (or not ready
        in it): the map is read again first, since another router may have just created or
        readied it (concurrent requests share one read, at most one per ``MAP_RECHECK_S``)."""
        for attempt in (0, 1):
            try:
                table = self._maps.current()
                model = table.model(name, version or table.pick_version(name, key))
                return model.readable() if readable else model
            except ShoalError as e:
                if attempt or e.code not in (grpc.StatusCode.NOT_FOUND,
                                             grpc.StatusCode.FAILED_PRECONDITION):
                    raise
                task = self._map_recheck
                if task is None or (task.done() and
                                    time.monotonic() - self._map_rechecked > MAP_RECHECK_S):
                    task = self._map_recheck = asyncio.ensure_future(self._recheck_map())
                elif task.done():
                    raise
                await asyncio.shield(task)

    async def _recheck_map(self) -> None:
        try:
            await self._maps.refresh_async()
        finally:
            self._map_rechecked = time.monotonic()

    def _parse(self, r: pb.FeatureBatch, model) -> Query:
        plan = model.plan(tuple(r.keys))
        keys = list(plan.keys)
        values = unpack(r.values, "values", ("int64", "int32"), 1)
        lengths = unpack(r.lengths, "lengths", ("int32", "int64"), 1).astype(np.int64)
        B = r.batch_size
        if B < 0 or len(lengths) != len(keys) * B:
            raise InvalidArgument(f"lengths: {len(lengths)} lengths for {len(keys)} keys x "
                                  f"batch_size {B} (expected {len(keys) * B})")
        if lengths.size and lengths.min() < 0:
            raise InvalidArgument(f"lengths: must be >= 0, got {int(lengths.min())}")
        if lengths.size and lengths.max() > len(values):
            raise InvalidArgument(f"lengths: a bag of {int(lengths.max())} ids is longer than "
                                  f"the {len(values)} values sent")
        total = int(lengths.sum())
        if total != len(values):
            raise InvalidArgument(f"lengths: sum to {total} but there are {len(values)} values")
        if len(values) > self._cfg.max_ids_per_request:
            raise ResourceExhausted(f"values: {len(values)} ids exceed max_ids_per_request "
                                  f"{self._cfg.max_ids_per_request}; split the batch")
        weights = None
        if is_set(r.weights):
            weights = unpack(r.weights, "weights", "float32", 1)
            if len(weights) != len(values):
                raise InvalidArgument(f"weights: {len(weights)} weights for {len(values)} "
                                      "values; must be one per value")
            if not np.isfinite(weights).all():
                i = int(np.flatnonzero(~np.isfinite(weights))[0])
                raise InvalidArgument(f"weights: weights[{i}] is {weights[i]}; weights must be "
                                      "finite")
            mean = [k for k in keys if model.feature(k).spec.pooling == "mean"]
            if mean:
                raise InvalidArgument(f"weights: feature {mean[0]!r} reads a table with mean "
                                      "pooling, and a weighted mean is not defined (torch and "
                                      "torchrec refuse it too); send weights only for sum tables")
        per_key = lengths.reshape(len(keys), B).sum(axis=1) if keys else np.zeros(0, np.int64)
        if values.size and (values.min() < 0 or values.max() >= plan.min_limit):
            bad = np.flatnonzero((values < 0) | (values >= np.repeat(plan.limits, per_key)))
            if bad.size:
                ends = np.cumsum(per_key)
                k = int(np.searchsorted(ends, bad[0], side="right"))
                check_ids(values[ends[k] - per_key[k]:ends[k]], model.feature(keys[k]).spec,
                          f"values of feature {keys[k]!r}")
        return Query(model, keys, values, lengths, weights, B, plan=plan, per_key=per_key)

    # ------------------------------------------------------------ rows
    async def WriteRows(self, request, context):
        try:
            self._requests += 1
            model = await self._model(request.model, request.version)
            spec = model.table(request.table).spec
            ids = unpack(request.ids, "ids", ("int64", "int32"), 1).astype(np.int64, copy=False)
            if request.rows.dtype != spec.dtype:
                raise InvalidArgument(f"rows: dtype {request.rows.dtype} does not match table "
                                      f"{spec.name!r} dtype {spec.dtype}")
            rows = unpack(request.rows, "rows", spec.dtype, 2)
            if rows.shape != (len(ids), spec.dim):
                raise InvalidArgument(f"rows: shape {list(rows.shape)} must be [{len(ids)}, "
                                      f"{spec.dim}] (one row of table {spec.name!r}'s dim "
                                      f"{spec.dim} per id)")
            if len(ids) > self._cfg.max_ids_per_request:
                raise ResourceExhausted(f"ids: {len(ids)} ids exceed max_ids_per_request "
                                      f"{self._cfg.max_ids_per_request}; split the write")
            check_ids(ids, spec, "ids")
            # Duplicate ids: the last row wins, as if written in order.
            uniq, last = np.unique(ids[::-1], return_index=True)
            if len(uniq) != len(ids):
                keep = len(ids) - 1 - last
                ids, rows = ids[keep], rows[keep]
            request_id = request.request_id or f"{self._id}:{next(self._write_ids)}"
            if len(request_id) > 128:
                raise InvalidArgument(f"request_id: {len(request_id)} characters exceed the "
                                      "limit of 128")
            n = await write_rows(request.model, request.table, ids, rows, self._maps,
                                 self._transport, self.stats, request_id,
                                 self._cfg.rpc_timeout_s, self._cfg.write_attempt_timeout_s,
                                 model.version)
            self._counted("WriteRows", model.name, model.version)
            return pb.WriteRowsReply(written=n)
        except ShoalError as e:
            self._counted("WriteRows", request.model, request.version, e)
            await abort_async(context, e)

    async def LookupRows(self, request, context):
        t0 = time.perf_counter()
        try:
            self._requests += 1
            model = await self._model(request.model, request.version)
            spec = model.table(request.table).spec
            ids = unpack(request.ids, "ids", ("int64", "int32"), 1).astype(np.int64, copy=False)
            if len(ids) > self._cfg.max_ids_per_request:
                raise ResourceExhausted(f"ids: {len(ids)} ids exceed max_ids_per_request "
                                      f"{self._cfg.max_ids_per_request}; split the request")
            check_ids(ids, spec, "ids")
            rows = await self._in_time(context.time_remaining(), lookup_rows(
                request.model, request.table, ids, self._maps, self._transport,
                self._cfg.rpc_timeout_s, self.stats, model.readable().version),
                f"lookup_rows of {len(ids)} ids", t0)
            self._counted("LookupRows", model.name, model.version)
            return pb.RouterLookupRowsReply(rows=pack(rows))
        except ShoalError as e:
            self._counted("LookupRows", request.model, request.version, e)
            await abort_async(context, e)

    # ------------------------------------------------------------ MoE
    async def MoeForward(self, request, context):
        try:
            return await self._moe(request, context.time_remaining())
        except ShoalError as e:
            await abort_async(context, e)

    async def MoeForwardStream(self, request_iterator, context):
        """Many ``MoeForward`` calls on one stream (a decode loop's), each answered under its
        id, in any order; each is admitted and limited like a call of its own."""
        async for answer in self._stream(request_iterator, self._moe_call):
            yield answer

    async def _moe_call(self, call: pb.MoeCall) -> pb.MoeAnswer:
        return await self._stream_call("MoeForward", call, self._moe, pb.MoeAnswer)

    async def _moe(self, request: pb.MoeForwardRequest, left: float | None):
        """One moe_forward within ``left`` seconds (None: ``default_deadline_s``), checked on
        its own, then run merged with the concurrent calls of the same layer (``moe_batch``)."""
        t0 = time.perf_counter()
        try:
            self._requests += 1
            model = await self._model(request.model, request.version, True)
            spec, _ = model.expert_layer(request.layer)
            hidden = to_torch(request.hidden, "hidden", spec.dtype, 2)
            check_hidden(spec, hidden, "hidden")
            if hidden.shape[0] > self._cfg.max_moe_tokens:
                raise ResourceExhausted(f"hidden: {hidden.shape[0]} tokens exceed max_moe_tokens "
                                      f"{self._cfg.max_moe_tokens}; split the batch")
            ids = weights = None
            if is_set(request.expert_ids) or is_set(request.expert_weights):
                ids = to_torch(request.expert_ids, "expert_ids", ("int64", "int32"), 2)
                weights = to_torch(request.expert_weights, "expert_weights", "float32", 2)
                check_routing(spec, ids, weights, hidden.shape[0])
            dense = await self.dense.derived(
                model.name, model.version, f"moe.{spec.name}",
                lambda params: ExpertLayerWeights.from_dense(spec, params).check_dense(spec))
            k = spec.top_k if ids is None else ids.shape[1]
            item = (MoeItem(hidden, ids, weights, t0), model, spec.name, dense)
            result = await self._in_time(
                left, self._moe_batcher.run(item, (model.name, model.version, spec.name, k),
                                            hidden.shape[0]),
                f"moe_forward of {hidden.shape[0]} tokens", t0)
            self.moe.requests += 1
            self._traced("moe", dict(result.timings, total=time.perf_counter() - t0),
                         f"moe_forward of {hidden.shape[0]} tokens, model {model.name} "
                         f"v{model.version} layer {spec.name}")
            self._counted("MoeForward", model.name, model.version)
            return pb.MoeForwardReply(out=pack(result.out), version=model.version,
                                      expert_tokens=pack(result.counts),
                                      timings=result.timings)
        except ShoalError as e:
            self._counted("MoeForward", request.model, request.version, e)
            raise

    async def _execute_moe(self, items: list) -> list:
        """A merged batch of one layer's calls; the batch's tokens per expert counted once
        (what hot-expert replication reads)."""
        _, model, layer, dense = items[0]
        results = await moe_batch([it for it, *_ in items], model, layer, dense, self._maps,
                                  self._transport, self._cfg.rpc_timeout_s, self.stats)
        self.moe.add((model.name, model.version, layer), sum(r.counts for r in results))
        return results

    # ------------------------------------------------------------ predict
    async def Predict(self, request, context):
        try:
            return await self._predict(request, context.time_remaining())
        except ShoalError as e:
            await abort_async(context, e)

    async def PredictStream(self, request_iterator, context):
        """Many ``Predict`` calls on one stream, each answered (in any order) under its id;
        each is admitted and limited like a call of its own (``shoal.security``)."""
        async for answer in self._stream(request_iterator, self._predict_call):
            yield answer

    async def _stream(self, request_iterator, answer_call):
        """The answers to a stream's calls, as each is ready (``answer_call(call)``)."""
        answers: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def answer(call) -> None:
            answers.put_nowait(await answer_call(call))

        async def read() -> None:
            try:
                async for call in request_iterator:
                    task = asyncio.create_task(answer(call))
                    running.add(task)
                    task.add_done_callback(running.discard)
            finally:
                if running:
                    await asyncio.gather(*running, return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _predict_call(self, call: pb.PredictCall) -> pb.PredictAnswer:
        return await self._stream_call("Predict", call, self._predict, pb.PredictAnswer)

    async def _stream_call(self, method: str, call, run, answer_type):
        """One call of a stream: admitted (``shoal.security``'s gate and deadline rule),
        ``run(call.request, timeout)``, recorded like an RPC of ``method``."""
        t0 = time.perf_counter()
        entered = False
        try:
            if security.installed().config.require_deadline and call.timeout_s <= 0:
                raise InvalidArgument("timeout_s: none set; this server requires every call "
                                      "to set a deadline (security.require_deadline)")
            gate = security.current_gate()
            if gate is not None:
                gate.enter()
                entered = True
            reply = await run(call.request, call.timeout_s or None)
            record_rpc(method, time.perf_counter() - t0, "OK", call, reply)
            return answer_type(id=call.id, reply=reply)
        except ShoalError as e:
            record_rpc(method, time.perf_counter() - t0, e.code.name, call, None)
            return answer_type(id=call.id, code=e.code.value[0], message=e.message)
        except Exception as e:                  # a bug: the caller still gets an answer
            log.exception("%s call %d failed", method, call.id)
            record_rpc(method, time.perf_counter() - t0, "INTERNAL", call, None)
            return answer_type(id=call.id, code=grpc.StatusCode.INTERNAL.value[0],
                               message=f"{method}: internal error: {e!r}")
        finally:
            if entered:
                gate.leave()

    async def _predict(self, request: pb.PredictRequest, left: float | None) -> pb.PredictReply:
        """One predict request within ``left`` seconds (None: ``default_deadline_s``)."""
        sparse = request.sparse
        try:
            self._requests += 1
            t0 = time.perf_counter()
            q = self._parse(sparse, await self._model(
                sparse.model, sparse.version, True, sparse.request_key))
            scorer = await scorer_for(self.dense, q.model)
            dense = to_torch(request.dense, "dense", "float32", 2)
            check_request(scorer, q.keys, dense, q.batch_size, request.top_k,
                          self._cfg.max_predict_batch)
            item = PredictItem(q, dense, int(request.top_k), t0)
            result = await self._in_time(
                left, self._predict_batcher.run(item, (q.model.name, q.model.version),
                                                q.batch_size),
                f"predict of {q.batch_size} candidates", t0)
            timings = dict(result.timings, total=time.perf_counter() - t0)
            self._traced("predict", timings, f"predict of {q.batch_size} candidates, model "
                         f"{q.model.name} v{q.model.version}")
            self._counted("Predict", q.model.name, q.model.version)
            reply = pb.PredictReply(scores=pack(result.scores), version=q.model.version,
                                    timings=timings if request.trace else None)
            if result.indices is not None:
                reply.indices.CopyFrom(pack(result.indices.astype(np.int64)))
            return reply
        except ShoalError as e:
            self._counted("Predict", sparse.model, sparse.version, e)
            raise

    async def _execute_predict(self, items: list[PredictItem]):
        scorer = await scorer_for(self.dense, items[0].query.model)
        return await predict_batch(items, self._execute, scorer, self._dense_pool)

    # ------------------------------------------------------------ control
    async def CreateModel(self, request, context):
        try:
            reply = await self._coord.CreateModel(request, timeout=30)
        except grpc.RpcError as e:
            await abort_async(context, from_rpc_error(e))
        self._maps.install(reply.map)
        return reply

    async def PutDense(self, request, context):
        try:
            return await self._coord.PutDense(request, timeout=120)
        except grpc.RpcError as e:
            await abort_async(context, from_rpc_error(e))

    async def GetDense(self, request, context):
        try:
            return await self._coord.GetDense(request, timeout=120)
        except grpc.RpcError as e:
            await abort_async(context, from_rpc_error(e))

    async def RebalanceExperts(self, request, context):
        try:
            reply = await self._coord.RebalanceExperts(request, timeout=30)
        except grpc.RpcError as e:
            await abort_async(context, from_rpc_error(e))
        await self._maps.refresh_async(at_least=reply.map_version)
        return reply

    async def UpdateModel(self, request, context):
        try:
            reply = await self._coord.UpdateModel(request, timeout=30)
        except grpc.RpcError as e:
            await abort_async(context, from_rpc_error(e))
        await self._maps.refresh_async(at_least=reply.map_version)
        return reply

    async def Status(self, request, context):
        try:
            m = (await self._coord.GetShardMap(pb.GetShardMapRequest(), timeout=10)).map
        except grpc.RpcError as e:
            await abort_async(context, from_rpc_error(e))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        s = self.stats
        return pb.StatusReply(map=m, router=pb.RouterStats(
            requests=self._requests, batches=s.batches, redirects=s.redirects,
            map_refreshes=self._maps.refreshes, replica_retries=s.replica_retries,
            map_version=self._maps.current().version, hedges=self.hedger.hedges,
            hedge_wins=self.hedger.hedge_wins, metrics_address=self.metrics_address,
            cache_hits=self.row_cache.stats.hits, cache_misses=self.row_cache.stats.misses,
            cache_invalidated=self.row_cache.stats.invalidated,
            cache_bytes=self.row_cache.nbytes, moe_requests=self.moe.requests,
            moe_batches=self._moe_batcher.batches, moe_merged=self._moe_batcher.merged,
            cpu_seconds=usage.ru_utime + usage.ru_stime, pid=os.getpid()))
