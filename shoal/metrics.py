"""Prometheus metrics: every Shoal process serves its own on one /metrics port.

``serve_metrics(host)`` starts the endpoint (a free port unless given); the process puts the
address in its ready.json and its registration, so ``shoal status`` lists every endpoint. RPCs
are counted and timed in one place, the servers' interceptors (``MetricsInterceptor``,
``AsyncMetricsInterceptor``), by method and status code; the router counts requests per model
and version (``MODEL_REQUESTS``). Names follow Prometheus conventions: ``shoal_`` prefix,
``_total`` counters, ``_seconds`` histograms.
"""
from __future__ import annotations

import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
           30.0)

RPC_REQUESTS = Counter("shoal_rpc_requests", "RPCs served, by method and status code",
                       ["role", "method", "code"], registry=REGISTRY)
RPC_SECONDS = Histogram("shoal_rpc_seconds", "Time to answer an RPC, by method",
                        ["role", "method"], buckets=BUCKETS, registry=REGISTRY)
MODEL_REQUESTS = Counter("shoal_model_requests",
                         "Client requests a router answered, by model, version and RPC",
                         ["model", "version", "rpc", "code"], registry=REGISTRY)

_role = "process"


def serve_metrics(role: str, host: str = "127.0.0.1", port: int = 0) -> str:
    """Start this process's /metrics endpoint; its address (host:port)."""
    global _role
    _role = role
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return f"{host}:{server.server_port}"


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _record(method: str, t0: float, context, failed: bool) -> None:
    """Count one RPC under its status code (an exception with no code set: UNKNOWN)."""
    code = context.code() if hasattr(context, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "OK"
    if failed and name == "OK":
        name = "UNKNOWN"
    RPC_REQUESTS.labels(_role, method, name).inc()
    RPC_SECONDS.labels(_role, method).observe(time.perf_counter() - t0)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times the unary RPCs of a threaded gRPC server."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, _short(details.method)

        def behavior(request, context):
            t0 = time.perf_counter()
            try:
                out = inner(request, context)
            except BaseException:
                _record(method, t0, context, failed=True)
                raise
            _record(method, t0, context, failed=False)
            return out

        return handler._replace(unary_unary=behavior)


class AsyncMetricsInterceptor(grpc.aio.ServerInterceptor):
    """``MetricsInterceptor`` for asyncio servers (the router, the shard servers)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, method = handler.unary_unary, _short(details.method)

        async def behavior(request, context):
            t0 = time.perf_counter()
            try:
                out = await inner(request, context)
            except BaseException:
                _record(method, t0, context, failed=True)
                raise
            _record(method, t0, context, failed=False)
            return out

        return handler._replace(unary_unary=behavior)
