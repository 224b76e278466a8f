"""A userspace TCP proxy on 127.0.0.1 that delays one direction, for fault tests (the kernel
here has no tc netem)."""
from __future__ import annotations

import asyncio
import threading
import time


class DelayProxy:
    """Listens on 127.0.0.1:<port> and forwards to ``target``; bytes coming back from the
    target are held ``delay_s`` before they are passed on (order kept)."""

    def __init__(self, target: str, delay_s: float):
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self.delay_s = delay_s
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.address = ""

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self):
        asyncio.set_event_loop(self._loop)

        async def start():
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            self._ready.set()
            return server

        server = self._loop.run_until_complete(start())
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _handle(self, client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.close()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def upstream():
            while data := await client_r.read(1 << 16):
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream_read():
            while data := await server_r.read(1 << 16):
                await queue.put((time.monotonic() + self.delay_s, data))
            await queue.put((0.0, b""))

        async def downstream_write():
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(upstream(), downstream_read(), downstream_write())
        except (ConnectionError, asyncio.CancelledError, OSError):
            pass
        finally:
            for w in (client_w, server_w):
                w.close()
