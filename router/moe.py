"""One MoE layer through the cluster: gate, dispatch, one ExpertForward per server, combine.

The router gates the hidden states (or takes the caller's routing), sorts the token slots by
expert, and sends each server the rows for all of the experts it is asked to run, in one
request; every request goes out at once. The tokens of an expert with several replicas are cut
into one contiguous piece per live replica, so a hot expert's replicas share its work. Replies
are scattered back into expert order, and ``experts.compute.combine`` adds each token's slots
with their gate weights; the shared expert (if any) runs on the router meanwhile, in a thread.

A server that fails is left out and its pieces go to the experts' other replicas; a redirect
refreshes the map and re-plans only the pieces it refused. Python loops here run over experts
and servers, never over tokens.

Decode traffic (many callers, a few tokens each) is merged: ``moe_batch`` runs the requests the
router's MoE batcher gathered for one (model, version, layer, k) as one layer call (one gate
run, one ``ExpertForward`` per server) and splits the output back per caller. Each request was
checked on its own before it joined, so a bad one fails alone. An expert's tokens are split
across its replicas only in pieces of at least ``MIN_PIECE_TOKENS``: a small piece costs a
server as much as a large one (it reads the expert's whole weights), so an expert with few
tokens runs on one replica, the least loaded one.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from experts.compute import combine, dispatch, shared_expert
from experts.gating import route as gate
from experts.specs import ExpertLayerSpec, ExpertLayerWeights
from shoal.errors import ShoalError, StaleMap, Unavailable
from shoal.proto import shoal_pb2 as pb
from shoal.wire import pack, to_torch

from router.mapcache import MapCache
from router.pooled import MAX_ATTEMPTS, MAX_REDIRECTS, RETRYABLE, Stats
from router.routing import ModelRoute
from router.transport import ShardTransport

STAGES = ("gate", "dispatch", "servers", "expert_compute", "combine")
MIN_PIECE_TOKENS = 32


@dataclass
class MoeItem:
    """One caller's request, checked: ``hidden`` [T, d_model] in the layer's dtype; its own
    routing ([T, k] ids and float32 weights) or None for the router's gate."""
    hidden: torch.Tensor
    expert_ids: torch.Tensor | None
    expert_weights: torch.Tensor | None
    arrived: float


@dataclass
class MoeStats:
    """Tokens routed to each expert, by (model, version, layer): what hot-expert replication
    reads."""
    tokens: dict[tuple[str, int, str], np.ndarray] = field(default_factory=dict)
    requests: int = 0

    def add(self, key: tuple[str, int, str], counts: np.ndarray) -> None:
        have = self.tokens.get(key)
        self.tokens[key] = counts.copy() if have is None else have + counts


@dataclass
class MoeResult:
    out: torch.Tensor                   # [T, d_model], the hidden states' dtype
    counts: np.ndarray                  # int64 [E]: tokens (slots) per expert
    timings: dict[str, float]           # seconds per stage (STAGES)
    ids: torch.Tensor | None = None     # int64 [T, k]: the experts each token went to


async def moe_forward(model: ModelRoute, layer: str, weights: ExpertLayerWeights,
                      hidden: torch.Tensor, expert_ids: torch.Tensor | None,
                      expert_weights: torch.Tensor | None, maps: MapCache,
                      transport: ShardTransport, timeout: float, stats: Stats) -> MoeResult:
    """``hidden`` and the caller's routing, if any, checked (``check_hidden``,
    ``check_routing``: the router checks each call before it is merged); ``weights`` the
    layer's dense part (gate, correction bias, shared expert)."""
    spec, _ = model.expert_layer(layer)
    t0 = time.perf_counter()
    T = hidden.shape[0]
    if expert_ids is None:
        expert_ids, expert_weights = gate(spec, weights.gate, hidden, weights.bias)
    else:
        expert_ids = expert_ids.long()
    t1 = time.perf_counter()
    k = expert_ids.shape[1]
    order, counts = dispatch(expert_ids, spec.num_experts)
    x_sorted = hidden.index_select(0, order // k)
    loop = asyncio.get_running_loop()
    shared = loop.run_in_executor(None, shared_expert, spec, weights, hidden) \
        if spec.shared_d_ff and T else None
    t2 = time.perf_counter()
    out_sorted, compute_s = await _run_experts(model, spec, x_sorted, counts.numpy(), maps,
                                               transport, timeout, stats)
    t3 = time.perf_counter()
    y = combine(out_sorted, order, expert_weights, T)
    if shared is not None:
        y = y + await shared
    t4 = time.perf_counter()
    timings = {"gate": t1 - t0, "dispatch": t2 - t1, "servers": t3 - t2,
               "expert_compute": compute_s, "combine": t4 - t3}
    return MoeResult(y, counts.numpy(), timings, expert_ids)


async def moe_batch(items: list[MoeItem], model: ModelRoute, layer: str,
                    weights: ExpertLayerWeights, maps: MapCache, transport: ShardTransport,
                    timeout: float, stats: Stats) -> list[MoeResult]:
    """``items`` (same layer, same k) as one layer call; one result per item (its rows of the
    output, its tokens per expert, the batch's timings plus ``batching`` (its wait) and
    ``batch_requests``)."""
    t0 = time.perf_counter()
    if len(items) == 1:
        it = items[0]
        r = await moe_forward(model, layer, weights, it.hidden, it.expert_ids,
                              it.expert_weights, maps, transport, timeout, stats)
        r.timings.update(batching=t0 - it.arrived, batch_requests=1.0)
        return [r]
    spec, _ = model.expert_layer(layer)
    sizes = [it.hidden.shape[0] for it in items]
    hidden = torch.cat([it.hidden for it in items])
    ids = weights_ = None
    routed = [it.expert_ids is not None for it in items]
    if any(routed):
        gated = [it.hidden for it, r in zip(items, routed) if not r]
        gids = gw = None
        if gated:
            gids, gw = gate(spec, weights.gate, torch.cat(gated), weights.bias)
        id_parts, w_parts, at = [], [], 0
        for it, r, n in zip(items, routed, sizes):
            if r:
                id_parts.append(it.expert_ids.long())
                w_parts.append(it.expert_weights)
            else:
                id_parts.append(gids[at:at + n])
                w_parts.append(gw[at:at + n])
                at += n
        ids, weights_ = torch.cat(id_parts), torch.cat(w_parts)
    r = await moe_forward(model, layer, weights, hidden, ids, weights_, maps, transport,
                          timeout, stats)
    out, at = [], 0
    for it, n in zip(items, sizes):
        ids_n = r.ids[at:at + n]
        counts = np.bincount(ids_n.reshape(-1).numpy(), minlength=spec.num_experts)
        timings = dict(r.timings, batching=t0 - it.arrived, batch_requests=float(len(items)))
        out.append(MoeResult(r.out[at:at + n], counts, timings, ids_n))
        at += n
    return out


def _pieces(counts: np.ndarray, todo: np.ndarray, replicas: np.ndarray, exclude: set[int],
            rotation: int, layer: str) -> list[tuple[int, int, int, int]]:
    """(server, expert, start, length) pieces of the expert-sorted slots: the run of
    ``counts[e]`` slots of each expert in ``todo`` (starting where the runs before it end)
    cut into contiguous pieces, one per live replica but none under ``MIN_PIECE_TOKENS``,
    sizes differing by at most one. An expert run whole goes to its live replica with the
    fewest slots so far (ties: ``rotation``); split ones start at a replica ``rotation``
    picks."""
    ends = np.cumsum(counts)
    out = []
    load: dict[int, int] = {}
    experts = np.flatnonzero(todo & (counts > 0))
    for e in experts[np.argsort(-counts[experts], kind="stable")].tolist():   # big first
        live = [int(s) for s in replicas[e] if s >= 0 and int(s) not in exclude]
        if not live:
            raise Unavailable(f"expert {e} of layer {layer!r} has no live replica")
        n = int(counts[e])
        start = int(ends[e]) - n
        shift = (rotation + e) % len(live)
        live = live[shift:] + live[:shift]
        r = max(1, min(len(live), n // MIN_PIECE_TOKENS))
        if r < len(live):
            live = sorted(live, key=lambda s: load.get(s, 0))[:r]
        for i, s in enumerate(live):
            size = n // r + (i < n % r)
            if size:
                out.append((s, e, start, size))
                load[s] = load.get(s, 0) + size
                start += size
    return out


async def _run_experts(model: ModelRoute, spec: ExpertLayerSpec, x_sorted: torch.Tensor,
                       counts: np.ndarray, maps: MapCache, transport: ShardTransport,
                       timeout: float, stats: Stats) -> tuple[torch.Tensor, float]:
    """Every expert's slots run on its servers: (outputs in expert order, the longest
    compute time a server reported). An expert one of whose pieces failed runs again whole
    in the next round, on the replicas left."""
    out = torch.empty_like(x_sorted)
    table_name = model.expert_layer(spec.name)[1].spec.name
    rotation = next(stats.rotation)
    todo = counts > 0
    exclude: set[int] = set()
    compute_s = 0.0
    failed_rounds = redirected_rounds = 0
    while todo.any():
        if failed_rounds >= MAX_ATTEMPTS or redirected_rounds >= MAX_REDIRECTS:
            raise Unavailable(f"layer {spec.name!r}: experts {np.flatnonzero(todo).tolist()} "
                              f"not run after {failed_rounds} rounds with failures and "
                              f"{redirected_rounds} redirects")
        rt = maps.current()
        tr = rt.model(model.name, model.version).table(table_name)
        pieces = _pieces(counts, todo, tr.replicas, exclude, rotation, spec.name)
        by_server: dict[int, list[tuple[int, int, int]]] = {}
        for s, e, start, n in pieces:
            by_server.setdefault(s, []).append((e, start, n))
        calls, plans = [], []
        for s, segs in by_server.items():
            idx = torch.from_numpy(np.concatenate([np.arange(a, a + n) for _, a, n in segs]))
            experts = np.array([e for e, _, _ in segs], np.int32)
            req = pb.ExpertForwardRequest(
                map_version=rt.version, table_uid=tr.spec.table_uid,
                routed=pb.PartitionEpochs(partitions=pack(experts),
                                          epochs=pack(tr.epochs[experts])),
                experts=pack(experts), counts=pack(np.array([n for *_, n in segs], np.int64)),
                hidden=pack(x_sorted.index_select(0, idx)), d_ff=spec.d_ff, gated=spec.gated)
            calls.append(transport.expert_forward(rt.addresses[s], req, timeout))
            plans.append((s, experts, idx))
        bad = np.zeros(len(counts), bool)
        failed = redirected = False
        for (s, experts, idx), reply in zip(plans, await asyncio.gather(
                *calls, return_exceptions=True)):
            if isinstance(reply, StaleMap):
                stats.redirects += 1
                redirected = True
                bad[experts] = True
                await maps.refresh_async(at_least=reply.map_version)
            elif isinstance(reply, ShoalError) and reply.code in RETRYABLE:
                stats.replica_retries += 1
                exclude.add(s)
                failed = True
                bad[experts] = True
            elif isinstance(reply, BaseException):
                raise reply
            else:
                out.index_copy_(0, idx, to_torch(reply.out, "out", spec.dtype, 2))
                compute_s = max(compute_s, reply.compute_s)
        todo &= bad
        failed_rounds += failed
        redirected_rounds += redirected and not failed
    return out, compute_s
