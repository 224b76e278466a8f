"""How the router reaches shard servers. A small interface so a test can swap the transport
(e.g. in-process servicers) while the same router logic runs over real gRPC in production."""
from __future__ import annotations

import abc
import threading
from concurrent.futures import Future

import grpc

from shoal.errors import from_rpc_error
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import channel


class ShardTransport(abc.ABC):
    """Each call starts an RPC and returns at once. ``result()`` of the returned future gives
    the reply or raises a ShoalError (StaleMap for a redirect, Unavailable for a dead server)."""

    @abc.abstractmethod
    def lookup_pooled(self, address: str, request: pb.LookupPooledRequest,
                      timeout: float) -> "RpcFuture": ...

    @abc.abstractmethod
    def lookup_rows(self, address: str, request: pb.LookupRowsRequest,
                    timeout: float) -> "RpcFuture": ...

    @abc.abstractmethod
    def write_rows(self, address: str, request: pb.WriteRowsRequest,
                   timeout: float) -> "RpcFuture": ...


class RpcFuture:
    """Wraps a grpc future so ``result()`` raises ShoalError, not grpc.RpcError."""

    def __init__(self, fut):
        self._fut = fut

    def result(self):
        try:
            return self._fut.result()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class GrpcShardTransport(ShardTransport):
    def __init__(self):
        self._stubs: dict[str, pbg.ShardServerStub] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> pbg.ShardServerStub:
        stub = self._stubs.get(address)
        if stub is None:
            with self._lock:
                stub = self._stubs.get(address)
                if stub is None:
                    stub = self._stubs[address] = pbg.ShardServerStub(channel(address))
        return stub

    def lookup_pooled(self, address, request, timeout):
        return RpcFuture(self._stub(address).LookupPooled.future(request, timeout=timeout))

    def lookup_rows(self, address, request, timeout):
        return RpcFuture(self._stub(address).LookupRows.future(request, timeout=timeout))

    def write_rows(self, address, request, timeout):
        return RpcFuture(self._stub(address).WriteRows.future(request, timeout=timeout))


def done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
