"""How the router reaches shard servers. A small interface so a test can swap the transport
(e.g. in-process servicers) while the same router logic runs over real gRPC in production.

The router runs on one asyncio event loop; every call here is a coroutine that returns the reply
or raises a ShoalError (StaleMap for a redirect, Unavailable for a dead server)."""
from __future__ import annotations

import abc

import grpc

from shoal.errors import from_rpc_error
from shoal.proto import shoal_pb2 as pb
from shoal.proto import shoal_pb2_grpc as pbg
from shoal.serving import AioStubs
from shoal.wire import parse_with_tensor

# A shard call that failed with one of these may succeed on another replica.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


class ShardTransport(abc.ABC):
    @abc.abstractmethod
    async def lookup_pooled(self, address: str, request: pb.LookupPooledRequest,
                            timeout: float) -> pb.LookupPooledReply: ...

    @abc.abstractmethod
    async def lookup_rows(self, address: str, request: pb.LookupRowsRequest,
                          timeout: float) -> pb.LookupRowsReply: ...

    @abc.abstractmethod
    async def write_rows(self, address: str, request: pb.WriteRowsRequest,
                         timeout: float) -> pb.WriteRowsReply: ...

    @abc.abstractmethod
    async def expert_forward(self, address: str, request: pb.ExpertForwardRequest,
                             timeout: float) -> pb.ExpertForwardReply: ...


class _ShardStub(pbg.ShardServerStub):
    """The generated stub, but ``LookupPooled`` replies are parsed with their ``all_sums``
    left in the received bytes (``WithTensor``)."""

    def __init__(self, channel):
        super().__init__(channel)
        self.LookupPooled = channel.unary_unary(
            "/shoal.v1.ShardServer/LookupPooled",
            request_serializer=pb.LookupPooledRequest.SerializeToString,
            response_deserializer=parse_with_tensor(pb.LookupPooledReply, 2))


class GrpcShardTransport(ShardTransport):
    """One grpc.aio channel per server address, created on first use (inside the loop)."""

    def __init__(self):
        self._stub = AioStubs(_ShardStub)

    @staticmethod
    async def _call(method, request, timeout):
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def lookup_pooled(self, address, request, timeout):
        return await self._call(self._stub(address).LookupPooled, request, timeout)

    async def lookup_rows(self, address, request, timeout):
        return await self._call(self._stub(address).LookupRows, request, timeout)

    async def write_rows(self, address, request, timeout):
        return await self._call(self._stub(address).WriteRows, request, timeout)

    async def expert_forward(self, address, request, timeout):
        return await self._call(self._stub(address).ExpertForward, request, timeout)
