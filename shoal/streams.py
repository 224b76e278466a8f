"""Calls on one long-lived gRPC stream instead of one RPC each (the client's ``predict``).

A unary call costs Python gRPC a fixed ~0.4 ms of the server's CPU and ~0.3 ms of the
client's, whatever it carries (measured here: bench/README figures); a message on an open
stream about half as much on the server. ``CallStream`` multiplexes many threads' calls on one
bidirectional stream: each call gets an id, a reader thread hands each answer to its caller,
and a call raises the same ``grpc.RpcError`` a unary call would (so ``RouterPool`` fails over
and ``RpcClient`` turns it into a ``ShoalError`` alike). A broken stream fails the calls on it
with its status (UNAVAILABLE when the router went away) and the next call opens a new one.
"""
from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

GRACE_S = 1.0     # a call waits this much past its deadline for the router's own answer


class StreamError(grpc.RpcError):
    """A call on a stream that failed, shaped like the RpcError of a unary call."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata=()):
        super().__init__(details)
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._metadata


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class CallStream:
    """``call(request, timeout)`` over the stream method ``open_stream`` (a
    ``channel.stream_stream`` callable): ``wrap(id, request, timeout) -> message`` makes the
    stream's message; the answers' ``id``, ``code``, ``message`` and ``reply`` fields are
    read back. Thread-safe."""

    def __init__(self, open_stream, wrap):
        self._open, self._wrap = open_stream, wrap
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._send: queue.Queue | None = None     # the open stream's outbox; None: closed
        self._rpc = None
        self._closed = False

    def call(self, request, timeout: float | None = None, **_):
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise StreamError(grpc.StatusCode.CANCELLED, "the client was closed")
            i = next(self._ids)
            self._pending[i] = fut
            send = self._send or self._start()
        send.put(self._wrap(i, request, timeout))
        try:
            return fut.result(None if timeout is None else timeout + GRACE_S)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(i, None)
            raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no answer within the call's deadline ({timeout} s)") from None

    __call__ = call

    def _start(self) -> queue.Queue:
        """Open a stream (caller holds the lock)."""
        send: queue.Queue = queue.Queue()

        def outbox():
            while (item := send.get()) is not None:
                yield item

        rpc = self._open(outbox())
        self._send, self._rpc = send, rpc
        threading.Thread(target=self._read, args=(rpc, send), daemon=True,
                         name="shoal-stream").start()
        return send

    def _read(self, rpc, send: queue.Queue) -> None:
        error = StreamError(grpc.StatusCode.UNAVAILABLE, "the stream ended")
        try:
            for ans in rpc:
                with self._lock:
                    fut = self._pending.pop(ans.id, None)
                if fut is None:
                    continue                       # its caller gave up
                if ans.code:
                    fut.set_exception(StreamError(_CODES.get(ans.code, grpc.StatusCode.UNKNOWN),
                                                  ans.message))
                else:
                    fut.set_result(ans.reply)
        except grpc.RpcError as e:
            error = StreamError(e.code(), e.details() or "the stream failed",
                                e.trailing_metadata() or ())
        finally:
            with self._lock:
                if self._send is send:
                    self._send = self._rpc = None
                # Calls sent on this stream and not answered fail with its status; calls that
                # come later open a new stream.
                stranded = list(self._pending.items())
                self._pending.clear()
            send.put(None)
            for _, fut in stranded:
                if not fut.done():
                    fut.set_exception(error)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            send, rpc = self._send, self._rpc
            self._send = self._rpc = None
        if send is not None:
            send.put(None)
        if rpc is not None:
            rpc.cancel()
