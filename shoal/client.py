"""The Python client: ``shoal.connect(address)``.

Tensors go over the wire as packed bytes; results come back as torch tensors (torchrec
``KeyedTensor`` for pooled lookups). Every error is raised as ``shoal.ShoalError`` with a
``grpc.StatusCode`` in ``.code``.
"""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

import grpc
import numpy as np
import torch

from embeddings.specs import TableSpec, to_spec
from shoal.errors import InvalidArgument, ShoalError
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import RpcClient, tune_malloc
from shoal.wire import pack

WRITE_CHUNK_BYTES = 64 << 20
WRITE_CHUNK_IDS = 262_144
WRITE_TRIES = 3


def _np(x) -> np.ndarray:
    """numpy of ``x``; a bfloat16 tensor as its 16-bit patterns (uint16, sent as bfloat16)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    return np.asarray(x)


class Client(RpcClient):
    def __init__(self, address: str | list[str], timeout: float = 120.0, creds=None):
        """``address``: a router, or several: requests are spread over them, and a request
        a router cannot take (UNAVAILABLE: it is down) goes to the next one, for every call
        that is safe to send twice (queries, and writes, which carry idempotency keys).
        ``creds``: a ``shoal.security.Credentials`` (TLS files and / or a bearer token) for a
        cluster with security on; also used for the loader's direct calls to servers."""
        tune_malloc()
        self.credentials = creds
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses:
            raise InvalidArgument("address: no router address given")
        super().__init__(addresses[0], pbg.RouterStub, timeout, creds=creds)
        self.addresses = addresses
        self._extra = []
        if len(addresses) > 1:
            from shoal.serving import channel
            self._extra = [channel(a, creds) for a in addresses[1:]]
            self._stub = RouterPool([self._stub] + [pbg.RouterStub(ch) for ch in self._extra],
                                    addresses)
        # Predict and MoeForward calls go on one stream each per router (see shoal.streams),
        # spread and failed over like the other calls.
        self._streams = [_PredictStream(ch) for ch in [self._channel] + self._extra]
        self._predict_via = self._streams[0] if len(self._streams) == 1 else \
            RouterPool(self._streams, addresses)
        self._no_stream: set[str] = set()     # methods the router has no stream for

    def close(self) -> None:
        for st in self._streams:
            st.Predict.close()
            st.MoeForward.close()
        for ch in self._extra:
            ch.close()
        super().close()

    # ------------------------------------------------------------ models
    def create_model(self, name: str, tables: Iterable = (), replication: int = 0,
                     memory_quota_bytes: int = 0, server_quota_bytes: int = 0,
                     loading: bool = False, expert_layers: Iterable = ()) -> list[TableSpec]:
        """Register a model from TableSpecs or torchrec EmbeddingBagConfig / EmbeddingConfig,
        and ``experts.specs.ExpertLayerSpec``s (each adds the table of its routed experts,
        ``experts.layout.table_for``). Returns the tables as placed (with partition counts and
        uids). Quotas (0 = none): the bytes of this model the cluster may hold, every replica
        counted, and the bytes of it one server may hold (placement and the rebalancer keep to
        it). ``loading``: version 1 is created loading (not servable) for ``load(...,
        version=1)`` or ``put_expert_layer(..., version=1)`` to fill."""
        from experts.layout import table_for
        layers = [(s, table_for(s)) for s in expert_layers]
        spec = pb.ModelSpec(name=name, replication=replication,
                            tables=[to_spec(t).to_proto() for t in tables] +
                            [t.to_proto() for _, t in layers],
                            expert_layers=[s.to_proto(t.name) for s, t in layers],
                            memory_quota_bytes=memory_quota_bytes,
                            server_quota_bytes=server_quota_bytes,
                            state="loading" if loading else "")
        reply = self._call(self._stub.CreateModel, pb.CreateModelRequest(spec=spec))
        return [TableSpec.from_proto(t) for t in reply.model.tables]

    def models(self) -> list[pb.ModelSpec]:
        """Every version of every model (``state``: "ready" | "loading"; ``current``)."""
        return list(self.status().map.models)

    def create_model_spec(self, spec: pb.ModelSpec) -> pb.ModelSpec:
        """Create a model from a full ``pb.ModelSpec`` (e.g. ``state="loading"``: not servable
        until a load readies it). Returns the spec as placed."""
        return self._call(self._stub.CreateModel, pb.CreateModelRequest(spec=spec)).model

    def put_dense(self, model: str, version: int, params: dict, dense_part=None) -> int:
        """Store a loading version's dense parameters (name -> tensor), replacing any stored
        before, and its ``dense_part`` (a ``shoal.DensePart``: what ``predict`` runs);
        returns bytes."""
        params = dict(params)
        if dense_part is not None:
            params.update(dense_part.check().to_params())
        names = list(params)
        msg = pb.DenseParams(model=model, version=version, names=names,
                             tensors=[pack(_dense_np(params[n])) for n in names])
        return self._call(self._stub.PutDense, msg).bytes

    def dense(self, model: str, version: int = 0) -> dict[str, torch.Tensor]:
        """A version's dense parameters (0: the current version's)."""
        from shoal.wire import unpack
        reply = self._call(self._stub.GetDense, pb.GetDenseRequest(model=model, version=version))
        return {n: torch.from_numpy(unpack(t, n).copy()) for n, t in
                zip(reply.names, reply.tensors)}

    def load(self, path: str, model: str, **kw):
        """Load a sharded checkpoint (DCP, per-rank torch.save, safetensors) as a new version
        of ``model``, verified, then made current; see ``shoal.loader.load`` for the options.
        Returns a ``shoal.loader.LoadResult``."""
        from shoal.loader import load
        return load(self, path, model, **kw)

    def create_version(self, name: str, tables: Iterable = (), replication: int = 0) -> pb.ModelSpec:
        """A new version of model ``name``: "loading" (writable with ``version=``, not
        servable), with ``tables`` (default: the current version's tables, same shapes)."""
        spec = pb.ModelSpec(name=name, replication=replication,
                            tables=[to_spec(t).to_proto() for t in tables])
        return self._call(self._stub.CreateModel,
                          pb.CreateModelRequest(spec=spec, new_version=True)).model

    def set_traffic_share(self, name: str, version: int, share: float) -> pb.ModelSpec:
        """A/B and canaries: ready, not current version ``version`` answers ``share`` (0..1)
        of the requests for ``name`` that name no version, chosen by each request's key
        (sticky: the same key, the same version, on every router); 0 ends it. Making a version
        current (or rolling back to the old one) is one atomic switch."""
        return self._call(self._stub.UpdateModel, pb.UpdateModelRequest(
            model=name, version=version, set_traffic_share=True, traffic_share=share)).model

    def update_version(self, name: str, version: int, ready: bool = False,
                       make_current: bool = False, drop: bool = False) -> pb.ModelSpec:
        """Mark a version ready, make it current (atomic: one map version), or drop it."""
        return self._call(self._stub.UpdateModel, pb.UpdateModelRequest(
            model=name, version=version, ready=ready, make_current=make_current,
            drop=drop)).model

    def status(self) -> pb.StatusReply:
        return self._call(self._stub.Status, pb.StatusRequest())

    # ------------------------------------------------------------ rows
    def write_rows(self, model: str, table: str, ids, rows, version: int = 0,
                   request_id: str | None = None) -> int:
        """Write ``rows[i]`` as row ``ids[i]``; rows must be in the table's dtype. Large writes
        are sent in chunks; each chunk is durable on every in-sync replica when it returns.

        ``request_id`` (default: a fresh one per call) is the write's idempotency key: a chunk
        that fails with UNAVAILABLE is resent under the same key, and calling again with the
        same key and rows applies them once, however often the first call's replies were
        lost."""
        ids, rows = _np(ids), _np(rows)
        if rows.ndim != 2 or len(rows) != len(ids):
            raise InvalidArgument(f"rows: shape {list(rows.shape)} must be [{len(ids)}, dim]")
        step = max(1, min(WRITE_CHUNK_IDS, WRITE_CHUNK_BYTES // max(1, rows[:1].nbytes)))
        key = request_id or uuid.uuid4().hex
        written = 0
        for i, lo in enumerate(range(0, max(len(ids), 1), step)):
            req = pb.RouterWriteRowsRequest(model=model, version=version, table=table,
                                            ids=pack(ids[lo:lo + step]),
                                            rows=pack(rows[lo:lo + step]),
                                            request_id=f"{key}/{i}")
            for attempt in range(WRITE_TRIES):
                try:
                    written += self._call(self._stub.WriteRows, req).written
                    break
                except ShoalError as e:
                    if e.code != grpc.StatusCode.UNAVAILABLE or attempt == WRITE_TRIES - 1:
                        raise
        return written

    def update(self, model: str, table: str, ids, rows, version: int = 0) -> int:
        """Online update of a serving version (0: the current one): ``rows[i]`` becomes row
        ``ids[i]``. Once it returns, every replica holds the new rows (written to RocksDB and
        the memory tier on each in-sync replica before the leader acknowledges), so every
        later query sees them; a query never sees a row half old, half new."""
        return self.write_rows(model, table, ids, rows, version)

    def update_stream(self, model: str, table: str, batches, version: int = 0,
                      in_flight: int = 4) -> int:
        """``update`` for a stream of ``(ids, rows)`` batches (a model trained online): up to
        ``in_flight`` batches are written at once, and a batch that shares an id with one in
        flight waits for it, so each id's rows apply in stream order. Returns the rows
        written; the first error stops the stream and is raised."""
        from concurrent.futures import ThreadPoolExecutor
        written, pending = 0, []          # [(future, ids)]
        with ThreadPoolExecutor(max(1, in_flight)) as pool:
            try:
                for ids, rows in batches:
                    ids, rows = _np(ids).astype(np.int64, copy=False), _np(rows)
                    while pending and (len(pending) >= in_flight or any(
                            np.intersect1d(ids, mine, assume_unique=False).size
                            for _, mine in pending)):
                        fut, _ = pending.pop(0)
                        written += fut.result()
                    pending.append((pool.submit(self.write_rows, model, table, ids, rows,
                                                version), ids))
                for fut, _ in pending:
                    written += fut.result()
            except BaseException:
                for fut, _ in pending:
                    fut.cancel()
                raise
        return written

    def lookup_rows(self, model: str, table: str, ids, version: int = 0,
                    timeout: float | None = None) -> torch.Tensor:
        """Unpooled rows ``[len(ids), dim]`` in the table's dtype. ``timeout``: the request's
        deadline in seconds (default: the client's); past it, DEADLINE_EXCEEDED."""
        req = pb.RouterLookupRowsRequest(model=model, version=version, table=table,
                                         ids=pack(_np(ids)))
        from shoal.wire import to_torch
        return to_torch(self._call(self._stub.LookupRows, req, timeout).rows, "rows").clone()

    def lookup(self, model: str, kjt, version: int = 0, timings: dict | None = None,
               key: str = "", answered: dict | None = None):
        """Pooled embeddings of a torchrec ``KeyedJaggedTensor``, as a ``KeyedTensor`` equal to
        what a local ``EmbeddingBagCollection`` with the same weights returns. ``timings`` (a
        dict), if given, receives the request's seconds per stage in the router. ``key``
        (e.g. a user id) picks the version under an A/B split (``set_traffic_share``);
        ``answered`` (a dict), if given, receives ``version``: the version that answered."""
        from torchrec.sparse.jagged_tensor import KeyedTensor

        values = _np(kjt.values())
        if values.size and 0 <= values.min() and values.max() < 2**31:
            values = values.astype(np.int32)      # half the bytes on the wire
        req = pb.FeatureBatch(model=model, version=version, keys=kjt.keys(),
                              values=pack(values), lengths=pack(kjt.lengths()),
                              batch_size=kjt.stride(), trace=timings is not None,
                              request_key=key)
        weights = kjt.weights_or_none()
        if weights is not None:
            req.weights.CopyFrom(pack(weights, "float32"))
        reply = self._call(self._stub.Lookup, req)
        if timings is not None:
            timings.update(reply.timings)
        if answered is not None:
            answered["version"] = reply.version
        values = np.frombuffer(reply.values.data, np.float32).reshape(tuple(reply.values.shape))
        return KeyedTensor(keys=list(reply.keys), length_per_key=list(reply.length_per_key),
                           values=torch.from_numpy(values.copy()))


    def predict(self, model: str, dense, kjt, top_k: int | None = None, version: int = 0,
                timings: dict | None = None, timeout: float | None = None,
                key: str = "") -> "Prediction":
        """Scores of candidates by the model's dense part (``shoal.DensePart``): row i of
        ``dense`` [B, dense_in_features] and bag i of each feature of ``kjt`` (a torchrec
        ``KeyedJaggedTensor`` of stride B) are candidate i. ``top_k``: only the k best, best
        first, with their candidate indices. ``version`` 0: the current one. ``timeout``:
        this call's deadline in seconds (default: the client's); past it DEADLINE_EXCEEDED,
        never a partial answer. ``key`` (e.g. a user id): picks the version under an A/B
        split (``set_traffic_share``), the same one every time."""
        from shoal.wire import unpack
        values = _np(kjt.values())
        if values.size and 0 <= values.min() and values.max() < 2**31:
            values = values.astype(np.int32)
        call = pb.PredictCall()           # the request is built in place (no copies of it)
        req = call.request
        req.top_k, req.trace = top_k or 0, timings is not None
        req.dense.CopyFrom(pack(torch.as_tensor(dense), "float32"))
        sparse = req.sparse
        sparse.model, sparse.version, sparse.batch_size = model, version, kjt.stride()
        sparse.request_key = key
        sparse.keys.extend(kjt.keys())
        sparse.values.CopyFrom(pack(values))
        sparse.lengths.CopyFrom(pack(kjt.lengths()))
        if kjt.weights_or_none() is not None:
            sparse.weights.CopyFrom(pack(kjt.weights(), "float32"))
        reply = self._on_stream("Predict", call, req, timeout)
        if timings is not None:
            timings.update(reply.timings)
        scores = torch.from_numpy(unpack(reply.scores, "scores", "float32", 1).copy())
        indices = torch.from_numpy(unpack(reply.indices, "indices", "int64", 1).copy()) \
            if top_k else None
        return Prediction(scores, indices, reply.version)

    def _on_stream(self, method: str, call, request, timeout):
        """``method``'s reply: ``call`` on the router's stream, or ``request`` as a unary
        call to a router without that stream (found out once, on its UNIMPLEMENTED)."""
        if method not in self._no_stream:
            try:
                return self._call(getattr(self._predict_via, method), call, timeout)
            except ShoalError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._no_stream.add(method)
        return self._call(getattr(self._stub, method), request, timeout)

    # ------------------------------------------------------------ MoE
    def moe_forward(self, model: str, layer: str, hidden_states, expert_ids=None,
                    expert_weights=None, version: int = 0, timings: dict | None = None,
                    timeout: float | None = None):
        """Expert layer ``layer`` of ``model`` on ``hidden_states`` [tokens, d_model] (the
        layer's dtype): the router gates them, runs each token's top-k experts on the servers
        that hold them and combines the outputs, plus the shared expert. Callers that gate
        themselves pass ``expert_ids`` [tokens, k] and ``expert_weights`` [tokens, k].
        Returns [tokens, d_model] in the hidden states' dtype; ``timings`` (a dict), if given,
        receives the seconds per stage."""
        from shoal.wire import to_torch
        call = pb.MoeCall()               # the request is built in place (no copies of it)
        req = call.request
        req.model, req.version, req.layer = model, version, layer
        req.hidden.CopyFrom(pack(hidden_states))
        if expert_ids is not None or expert_weights is not None:
            if expert_ids is None or expert_weights is None:
                raise InvalidArgument("expert_ids and expert_weights: give both or neither")
            req.expert_ids.CopyFrom(pack(expert_ids))
            req.expert_weights.CopyFrom(pack(expert_weights, "float32"))
        reply = self._on_stream("MoeForward", call, req, timeout)
        if timings is not None:
            timings.update(reply.timings)
        return to_torch(reply.out, "out").clone()

    def rebalance_experts(self, model: str = "", layer: str = "",
                          dry_run: bool = False) -> pb.RebalanceExpertsReply:
        """Give hot experts redundant replicas now (the coordinator also does it every
        ``expert_rebalance_s``): per layer, the experts' token rates, the replicas added and
        dropped, and the imbalance (max / mean tokens per server) measured and as planned."""
        return self._call(self._stub.RebalanceExperts, pb.RebalanceExpertsRequest(
            model=model, layer=layer, dry_run=dry_run))

    def create_expert_version(self, model: str, specs, replication: int = 0) -> pb.ModelSpec:
        """A new loading version of ``model`` (its first, if it does not exist) with these
        expert layers (``ExpertLayerSpec``s) and their experts' tables."""
        from experts.layout import table_for
        tables = [table_for(s) for s in specs]
        spec = pb.ModelSpec(name=model, replication=replication,
                            tables=[t.to_proto() for t in tables],
                            expert_layers=[s.to_proto(t.name) for s, t in zip(specs, tables)],
                            state="loading")
        exists = any(m.name == model for m in self.models())
        return self._call(self._stub.CreateModel,
                          pb.CreateModelRequest(spec=spec, new_version=exists)).model

    def put_expert_layers(self, model: str, layers, replication: int = 0) -> pb.ModelSpec:
        """A new version of ``model`` (the first, if it does not exist) with these expert
        layers, ``[(ExpertLayerSpec, ExpertLayerWeights)]``: the routed experts written to
        their tables an expert at a time, the gates and shared experts stored as the
        version's dense parameters; then made ready and current. Returns the version."""
        from experts.layout import expert_row_ids, pack_expert, table_for
        layers = [(spec.validate(), w.check(spec)) for spec, w in layers]
        md = self.create_expert_version(model, [s for s, _ in layers], replication)
        dense = {}
        for s, w in layers:
            t = table_for(s)
            for e in range(s.num_experts):
                self.write_rows(model, t.name, expert_row_ids(s, e),
                                pack_expert(w.w1[e], w.w2[e],
                                            w.w3[e] if w.w3 is not None else None,
                                            s.torch_dtype),
                                version=md.version)
            dense.update(w.dense(s))
        self.put_dense(model, md.version, dense)
        return self.update_version(model, md.version, ready=True, make_current=True)


def connect(address: str | list[str], timeout: float = 120.0, creds=None) -> Client:
    """A client of the router at ``address`` (or of several routers: a list); ``creds``
    (``shoal.security.Credentials``) where the cluster has TLS or tokens on."""
    return Client(address, timeout, creds)


class _PredictStream:
    """A router's ``Predict`` and ``MoeForward`` as calls on its ``PredictStream`` and
    ``MoeForwardStream``: ``Predict(call)`` takes a ``PredictCall`` (``MoeForward(call)`` a
    ``MoeCall``; the id and deadline set here) and returns the reply."""

    def __init__(self, channel):
        from shoal.streams import CallStream

        def wrap(i: int, call, timeout: float | None):
            call.id, call.timeout_s = i, timeout or 0.0
            return call
        stub = pbg.RouterStub(channel)
        self.Predict = CallStream(stub.PredictStream, wrap)
        self.MoeForward = CallStream(stub.MoeForwardStream, wrap)


class RouterPool:
    """Router stubs used in turn; a call a router could not take (UNAVAILABLE) is sent to the
    next, and that router is skipped for ``DOWN_S`` while others are up."""

    RETRY = frozenset({"Lookup", "LookupRows", "Predict", "MoeForward", "Status", "GetDense",
                       "WriteRows"})
    DOWN_S = 5.0

    def __init__(self, stubs: list, addresses: list[str]):
        self._stubs, self._addresses = stubs, addresses
        self._turn = itertools.count()
        self._down = [0.0] * len(stubs)
        self.failovers = 0

    def __getattr__(self, method: str):
        def call(request, **kw):
            n, first = len(self._stubs), next(self._turn)
            order = [(first + i) % n for i in range(n)]
            now = time.monotonic()
            order.sort(key=lambda j: self._down[j] > now)       # routers up first
            for i, j in enumerate(order):
                try:
                    return getattr(self._stubs[j], method)(request, **kw)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or method not in self.RETRY \
                            or i == n - 1:
                        raise
                    self._down[j] = time.monotonic() + self.DOWN_S
                    self.failovers += 1
        return call


@dataclass
class Prediction:
    scores: torch.Tensor             # float32 [B], or the top k best first
    indices: torch.Tensor | None     # int64: with top_k, the candidates of those scores
    version: int                     # the version that answered


def _dense_np(t) -> np.ndarray:
    """A dense parameter as a numpy array of a wire dtype (floats as float32 unless float16;
    integers and bools as int64)."""
    t = torch.as_tensor(t).detach().cpu()
    if t.dtype == torch.float16:
        return t.numpy()
    if t.is_floating_point():
        return t.float().numpy()
    return t.to(torch.int64).numpy()
