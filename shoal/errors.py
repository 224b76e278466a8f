"""Errors as callers see them, and the helpers servers use to raise them.

Two levels (STYLE.md #10): request errors the caller can fix (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION) and server faults (UNAVAILABLE, INTERNAL). Every message names the field,
the value and the limit.
"""
from __future__ import annotations

import grpc

MAP_VERSION_KEY = "shoal-map-version"
EPOCH_KEY = "shoal-epoch"            # the server's epoch of the partition named in the message


class ShoalError(Exception):
    """An error from a Shoal service. ``code`` is a ``grpc.StatusCode``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(ShoalError):
    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


class NotFound(ShoalError):
    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.NOT_FOUND, message)


class ResourceExhausted(ShoalError):
    """A request over a configured limit (ids, tokens, message bytes, calls in flight)."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class StaleMap(ShoalError):
    """The request was routed with a shard map older (or newer) than the server's.

    ``map_version`` is the server's current version; the sender refreshes to at least it and
    retries once.
    """

    def __init__(self, message: str, map_version: int, epoch: int | None = None):
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)
        self.map_version = map_version
        self.epoch = epoch

    def metadata(self) -> tuple:
        md = ((MAP_VERSION_KEY, str(self.map_version)),)
        return md if self.epoch is None else md + ((EPOCH_KEY, str(self.epoch)),)


class Unavailable(ShoalError):
    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


def abort_with(context: grpc.ServicerContext, err: ShoalError) -> None:
    """Abort an RPC with ``err``'s status; a StaleMap also carries the current map version."""
    if isinstance(err, StaleMap):
        context.set_trailing_metadata(err.metadata())
    context.abort(err.code, err.message)


async def abort_async(context: grpc.aio.ServicerContext, err: ShoalError) -> None:
    """``abort_with`` for asyncio servers."""
    if isinstance(err, StaleMap):
        context.set_trailing_metadata(err.metadata())
    await context.abort(err.code, err.message)


def from_rpc_error(e: grpc.RpcError) -> ShoalError:
    """Turn a ``grpc.RpcError`` into the matching ShoalError."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        md = dict(e.trailing_metadata() or ())
        if MAP_VERSION_KEY in md:
            epoch = md.get(EPOCH_KEY)
            return StaleMap(details or "", int(md[MAP_VERSION_KEY]),
                            int(epoch) if epoch is not None else None)
    cls = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
           grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
           grpc.StatusCode.UNAVAILABLE: Unavailable}.get(code)
    return cls(details or "") if cls else ShoalError(code, details or "")
