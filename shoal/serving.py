"""What every Shoal gRPC process shares: the server factory with its interceptor seam, channel
options, and the ready file a parent process waits for."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
from concurrent import futures

import grpc

from shoal.config import MAX_MESSAGE_BYTES

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


class AccessInterceptor(grpc.ServerInterceptor):
    """The one place where callers are admitted or refused (authentication, roles and limits
    will live here). Today it admits every caller."""

    def intercept_service(self, continuation, handler_call_details):
        return continuation(handler_call_details)


def make_server(threads: int, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.Server, str]:
    """A gRPC server bound to host:port (port 0: a free one). Returns it and its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
                         interceptors=[AccessInterceptor()], options=GRPC_OPTIONS)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return server, f"{host}:{bound}"


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=GRPC_OPTIONS)


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
