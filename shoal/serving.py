"""What every Shoal gRPC process shares: the server factory with its interceptor seam, channel
options, and the ready file a parent process waits for."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import pathlib
import signal
import threading
import time
from concurrent import futures

import grpc

from shoal import security
from shoal.config import MAX_MESSAGE_BYTES
from shoal.errors import from_rpc_error

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


MMAP_THRESHOLD = 32 << 20


def tune_malloc(threshold: int = MMAP_THRESHOLD) -> None:
    """Keep buffers below ``threshold`` on the heap instead of fresh mmaps.

    glibc serves every allocation of >= 128 KiB-ish with mmap and returns it with munmap, so a
    1 MiB tensor message page-faults all of its pages on every RPC: building one took 1.6 ms
    here instead of 0.15 ms. Called once by every Shoal process and by the client.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    _mallopt((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, 2 * threshold))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def _mallopt(*settings: tuple[int, int]) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:          # not glibc: nothing to tune
        return
    for param, value in settings:
        libc.mallopt(param, value)


_malloc_tuned = False


def keep_heap(trim_bytes: int = 256 << 20, arenas: int | None = 1) -> None:
    """For a process that takes bulk writes (a shard server): free heap kept up to
    ``trim_bytes`` instead of handed back at once, and (``arenas``) one malloc arena for all
    threads, so each chunk's buffers reuse the last chunk's pages. Fresh pages cost a fault
    each, and on this VM zeroing a fresh page costs ~3 ns a byte: with glibc's defaults a
    server faulted in every byte it received about twice (a load ran at 0.064 GB/s instead of
    0.114). ``trim_heap`` returns the memory once the writes stop."""
    tune_malloc()
    _mallopt(*([(M_ARENA_MAX, arenas)] if arenas else []), (M_TRIM_THRESHOLD, trim_bytes))


@contextlib.contextmanager
def heap_kept(trim_bytes: int):
    """``keep_heap(trim_bytes)`` for the duration (a load streaming chunks), then the heap
    trimmed and glibc's trimming restored."""
    keep_heap(trim_bytes, arenas=None)
    try:
        yield
    finally:
        keep_heap(2 * MMAP_THRESHOLD, arenas=None)
        trim_heap()


def trim_heap() -> None:
    """Give free heap memory back to the OS (after a bulk write's buffers are freed), so a
    server's RSS tracks the rows it holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RequestParsers(grpc.aio.ServerInterceptor):
    """Parses the requests of some methods (full names) with other deserializers than the
    generated ones: bulk methods whose tensors stay in the received bytes
    (``shoal.wire.parse_with_tensor``)."""

    def __init__(self, parsers: dict):
        self._parsers = parsers

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        parse = self._parsers.get(handler_call_details.method)
        if handler is None or parse is None:
            return handler
        return handler._replace(request_deserializer=parse)


class RawReplies(grpc.aio.ServerInterceptor):
    """Lets a handler return its reply already serialised (``bytes``, e.g. from
    ``shoal.wire.serialize_with_tensor``): sent as they are instead of through the method's
    serializer."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.response_serializer is None:
            return handler
        serialize = handler.response_serializer

        def either(reply):
            return reply if isinstance(reply, bytes) else serialize(reply)
        return handler._replace(response_serializer=either)


def _server_options() -> list:
    """Channel options of a serving port: the receive limit is the installed security's."""
    limit = security.installed().config.max_message_bytes
    return [o for o in GRPC_OPTIONS if o[0] != "grpc.max_receive_message_length"] + \
        [("grpc.max_receive_message_length", limit)]


def make_aio_server(host: str = "127.0.0.1", port: int = 0, parsers: dict | None = None,
                    role: str = "server") -> tuple[grpc.aio.Server, str]:
    """An asyncio gRPC server bound to host:port, behind the access check (``shoal.security``)
    and the metrics. Create it inside the running loop. ``parsers``: request deserializers by
    full method name (``RequestParsers``)."""
    from shoal.metrics import AsyncMetricsInterceptor
    tune_malloc()
    interceptors = [security.AsyncAccessInterceptor(), AsyncMetricsInterceptor(), RawReplies()] + \
        ([RequestParsers(parsers)] if parsers else [])
    server = grpc.aio.server(interceptors=interceptors, options=_server_options())
    bound = security.add_port(server, host, port, role)
    return server, f"{host}:{bound}"


def make_server(threads: int, host: str = "127.0.0.1", port: int = 0,
                role: str = "coordinator") -> tuple[grpc.Server, str]:
    """A gRPC server bound to host:port (port 0: a free one), behind the access check and the
    metrics. Returns it and its address."""
    from shoal.metrics import MetricsInterceptor
    tune_malloc()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
                         interceptors=[security.AccessInterceptor(), MetricsInterceptor()],
                         options=_server_options())
    bound = security.add_port(server, host, port, role)
    return server, f"{host}:{bound}"


def channel(address: str, creds: "security.Credentials | None" = None) -> grpc.Channel:
    """A channel to a Shoal process with ``creds`` (default: this process's own)."""
    return security.channel(address, GRPC_OPTIONS, creds)


class RpcClient:
    """A synchronous stub on its own channel; every failure is raised as a ShoalError."""

    def __init__(self, address: str, stub_class, timeout: float, wait_for_ready: bool = False,
                 creds: "security.Credentials | None" = None):
        self.address = address
        self._timeout = timeout
        self._wait = wait_for_ready
        self._channel = channel(address, creds)
        self._creds = creds
        self._stub = stub_class(self._channel)

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self._timeout, wait_for_ready=self._wait)
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            c = self._creds
            if err.code == grpc.StatusCode.UNAVAILABLE and c is not None and c.ca and \
                    not c.cert and "Socket closed" in err.message:
                err = type(err)(err.message + f" (the TLS handshake with {self.address} was "
                                "refused: it requires a client certificate signed by the "
                                "cluster's CA; give one, e.g. --cert/--key)")
            raise err from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AioStubs:
    """One grpc.aio channel and stub per address, made on first use (inside the running loop)."""

    def __init__(self, stub_class):
        self._cls = stub_class
        self._stubs: dict[str, object] = {}

    def __call__(self, address: str):
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = self._cls(
                security.aio_channel(address, GRPC_OPTIONS))
        return stub


def write_ready(path: str | os.PathLike, **info) -> None:
    """Atomically write the ready file that LocalCluster waits for."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    os.replace(tmp, path)


def serve_until_signalled(server: grpc.Server, on_stop=None) -> None:
    """Block until SIGTERM / SIGINT, then stop gracefully."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    if on_stop:
        on_stop()
    server.stop(grace=1.0).wait()


def call_until_up(call, deadline_s: float = 60.0):
    """``call()``, retried every 0.1 s while it fails with UNAVAILABLE (a peer still starting),
    for at most ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                raise
            time.sleep(0.1)


async def watch_loop_lag(threshold_s: float = 0.1, period_s: float = 0.05) -> None:
    """Log a warning whenever this event loop could not run a timer for more than
    ``threshold_s`` (something held the loop or the GIL): every request waited as long."""
    loop = asyncio.get_running_loop()
    log = logging.getLogger("loop")
    while True:
        t0 = loop.time()
        await asyncio.sleep(period_s)
        lag = loop.time() - t0 - period_s
        if lag > threshold_s:
            log.warning("event loop stalled %.0f ms", lag * 1e3)


async def until_signalled() -> None:
    """Return when the process gets SIGTERM or SIGINT (asyncio processes)."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()


def process_args(prog: str, server_id: bool = False) -> argparse.Namespace:
    """The command line every role process takes (``python -m shards|router``)."""
    ap = argparse.ArgumentParser(prog=prog)
    if server_id:
        ap.add_argument("--server-id", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--config", default="")
    return ap.parse_args()
