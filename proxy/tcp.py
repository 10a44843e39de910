"""Opaque TCP: relay bytes both ways, with backpressure and half-close.

Also the fallback for every protocol the proxy does not (yet) understand,
including TLS from a client. A failed upstream connect resets the client, so
that it sees the same error as without a proxy in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Final

from proxy import upstream
from proxy.conn import Address, ConnectionStats, Direction, Downstream, ProxyContext
from proxy.engine import Call, Reply, engine_for
from proxy.traffic.retry import Failure

log = logging.getLogger(__name__)

# Large reads keep the per-byte Python work down: one read, one write per chunk.
READ_SIZE: Final = 256 * 1024
STREAM_LIMIT: Final = 256 * 1024
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    transport = writer.transport
    if transport.is_closing():
        # Already going away; its descriptor may be gone (uvloop then refuses setsockopt).
        transport.abort()
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


async def connect(
    address: Address, ctx: ProxyContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to an upstream within the connect timeout (OSError on failure);
    mTLS to meshed endpoints (proxy.upstream decides)."""
    try:
        return await upstream.open_connection(
            address, ctx, alpn="tcp", timeout=ctx.connect_timeout, limit=STREAM_LIMIT
        )
    except TimeoutError as exc:
        raise ConnectionRefusedError(f"connect to {address} timed out") from exc


class _Relay:
    """Both directions of one connection and the idle watchdog shared by them."""

    __slots__ = ("active", "down_w", "idle_handle", "idle_timeout", "stats", "up_w")

    def __init__(
        self,
        down_w: asyncio.StreamWriter,
        up_w: asyncio.StreamWriter,
        stats: ConnectionStats,
        idle_timeout: float,
    ) -> None:
        self.down_w = down_w
        self.up_w = up_w
        self.stats = stats
        self.idle_timeout = idle_timeout
        # Set on traffic, cleared by the watchdog: one timer per connection
        # instead of one per read.
        self.active = True
        self.idle_handle: asyncio.TimerHandle | None = None

    def start_watchdog(self) -> None:
        if self.idle_timeout > 0:
            loop = asyncio.get_running_loop()
            self.idle_handle = loop.call_later(self.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        if not self.active:
            log.debug("tcp: idle for %.0fs, closing", self.idle_timeout)
            self.abort()
            return
        self.active = False
        self.idle_handle = asyncio.get_running_loop().call_later(
            self.idle_timeout, self._check_idle
        )

    def abort(self) -> None:
        reset(self.down_w)
        reset(self.up_w)

    def stop(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()

    async def pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_downstream: bool
    ) -> None:
        stats = self.stats
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                self.active = True
                writer.write(data)
                if from_downstream:
                    stats.bytes_from_downstream += len(data)
                else:
                    stats.bytes_to_downstream += len(data)
                await writer.drain()
            # Half-close: pass the FIN on and keep the other direction open. On
            # the mesh's opaque TCP leg the FIN travels as TLS close_notify
            # (proxy.security.tlsstream).
            if not writer.is_closing():
                if writer.can_write_eof():
                    writer.write_eof()
                elif not from_downstream:
                    # asyncio's and uvloop's TLS transports (an HTTP leg that turned
                    # into a tunnel, e.g. a WebSocket upgrade) cannot carry a
                    # half-close: once the server side is done, close the
                    # connection so the client sees the end instead of waiting for
                    # the idle timeout.
                    writer.close()
        except (ConnectionError, OSError, RuntimeError) as exc:
            # A reset on one side becomes a reset on the other. (uvloop raises
            # RuntimeError for a write to a transport that is already closed.)
            log.debug("tcp: %s", exc)
            self.abort()


async def relay(
    downstream: Downstream,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    ctx: ProxyContext,
) -> None:
    """Relay until both directions are done; closes both sides."""
    state = _Relay(downstream.writer, up_w, downstream.stats, ctx.idle_timeout)
    state.start_watchdog()
    try:
        if downstream.preread:
            up_w.write(downstream.preread)
            downstream.stats.bytes_from_downstream += len(downstream.preread)
        upward = asyncio.ensure_future(state.pump(downstream.reader, up_w, from_downstream=True))
        try:
            await state.pump(up_r, downstream.writer, from_downstream=False)
            await upward
        finally:
            if not upward.done():
                upward.cancel()
    finally:
        state.stop()
        up_w.close()
        downstream.writer.close()


async def serve(downstream: Downstream, ctx: ProxyContext) -> None:
    """Opaque TCP to `downstream.upstream`, or, for a service's ClusterIP, to one of
    its endpoints (picked per connection, another one after a connect failure)."""
    engine = engine_for(ctx)
    call: Call | Reply | None = None
    loop = asyncio.get_running_loop()
    if (
        engine is not None
        and engine.registry is not None
        and downstream.direction is Direction.OUTBOUND
    ):
        call = engine.tcp_call(downstream.upstream, loop.time())
    if type(call) is Reply:
        log.info("tcp: refusing %s to %s: %s", downstream.peer, downstream.upstream, call.message)
        reset(downstream.writer)
        return
    rec = ctx.telemetry.tcp_open(
        downstream.direction,
        peer=downstream.peer,
        upstream_host=downstream.upstream,
        destination_service=call.service if isinstance(call, Call) else "",
        peer_identity=downstream.peer_identity,
        local=downstream.original_dst,
    )
    try:
        if call is None:
            try:
                up_r, up_w = await connect(downstream.upstream, ctx)
            except OSError as exc:
                log.info(
                    "tcp: upstream %s unavailable for %s: %s; resetting client",
                    downstream.upstream,
                    downstream.peer,
                    exc,
                )
                reset(downstream.writer)
                return
        else:
            assert isinstance(call, Call)
            while True:
                target = call.next_address(loop.time())
                if isinstance(target, Reply):
                    log.info("tcp: %s: %s; resetting client", downstream.peer, target.message)
                    reset(downstream.writer)
                    return
                try:
                    up_r, up_w = await connect(target, ctx)
                except OSError as exc:
                    pause = call.result(loop.time(), failure=Failure.CONNECT_FAILURE)
                    if pause is None:
                        log.info(
                            "tcp: %s unavailable for %s: %s; resetting client",
                            target,
                            downstream.peer,
                            exc,
                        )
                        reset(downstream.writer)
                        return
                    await asyncio.sleep(pause)
                    continue
                call.result(loop.time())  # connected: feeds the balancer's latency
                rec.upstream_host = str(target)
                break
        await relay(downstream, up_r, up_w, ctx)
    finally:
        if isinstance(call, Call):
            call.finish(loop.time())
            rec.flags = call.flags
        rec.request_bytes = downstream.stats.bytes_from_downstream
        rec.response_bytes = downstream.stats.bytes_to_downstream
        ctx.telemetry.tcp_close(rec)
