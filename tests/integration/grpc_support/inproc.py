"""`proxy.http2.serve` behind a plain loopback listener, on its own uvloop thread.

The listener stands in for proxy.listener: it reads the 24-byte preface the way
detection does and hands a `Downstream` to the handler, so tests can reach the
handler's state (stats, the upstream pool, the drain signal) directly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from proxy import http2
from proxy.conn import Address, Direction, Downstream, Protocol, ProxyContext

PREFACE_LEN = 24
T = TypeVar("T")


class InProcessH2Proxy:
    def __init__(self, upstream: tuple[str, int], **ctx_options: Any) -> None:
        self.upstream = Address(*upstream)
        self.ctx = ProxyContext(**ctx_options)
        self.downstreams: list[Downstream] = []
        self.handler_errors: list[BaseException] = []
        self.port = 0
        self.loop = uvloop.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            preread = await reader.readexactly(PREFACE_LEN)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        host, port = writer.get_extra_info("peername")[:2]
        downstream = Downstream(
            reader=reader,
            writer=writer,
            preread=preread,
            direction=Direction.OUTBOUND,
            protocol=Protocol.HTTP2,
            original_dst=self.upstream,
            peer=Address(host, port),
            upstream=self.upstream,
        )
        self.downstreams.append(downstream)
        try:
            await http2.serve(downstream, self.ctx)
        except BaseException as exc:  # the handler must never raise; record it for the test
            self.handler_errors.append(exc)
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = int(self._server.sockets[0].getsockname()[1])

        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    def __enter__(self) -> InProcessH2Proxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("in-process proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            await http2.close_pool(self.ctx)

        if self._thread.is_alive():
            self.call(stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def drain(self) -> None:
        self.loop.call_soon_threadsafe(self.ctx.draining.set)

    def upstream_connections(self) -> int:
        async def count() -> int:
            return len(http2.pool_for(self.ctx).connections(self.upstream))

        return self.call(count())
