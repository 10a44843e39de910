"""Upstream HTTP/2 connections, shared by the client streams that go to one address.

Each upstream address gets one multiplexed h2c connection (prior knowledge),
and more only when the open ones have no stream left under the server's
MAX_CONCURRENT_STREAMS. A connection counts as ready once the server's first
SETTINGS frame arrived, so its limits are known and the peer is known to speak
HTTP/2. A GOAWAY takes a connection out of the pool: its streams up to the
GOAWAY's last-stream-id finish there, the later ones are handed back to their
owners as "unprocessed" so that they can go to a fresh connection.

A stream's owner implements `UpstreamStream`; this module never looks into
the requests it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any, Protocol, cast

import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from proxy import upstream
from proxy.conn import Address, ProxyContext
from proxy.h2conn import Endpoint, Header, WriteBatcher, new_connection

log = logging.getLogger(__name__)


class H2UpstreamError(Exception):
    """An upstream HTTP/2 connection could not be opened or used."""


class H2ConnectTimeout(H2UpstreamError):
    """The connection (TCP, TLS and the server's SETTINGS) did not open in time."""


class UpstreamStream(Protocol):
    """What an upstream connection tells the owner of one of its streams."""

    def up_response(self, headers: list[Header], ended: bool) -> None: ...
    def up_informational(self, headers: list[Header]) -> None: ...
    def up_data(self, data: bytes, flow_len: int, ended: bool) -> None: ...
    def up_trailers(self, headers: list[Header]) -> None: ...
    def up_ended(self) -> None: ...
    def up_reset(self, error_code: int) -> None: ...
    def up_failed(self, unprocessed: bool, reason: str) -> None:
        """The stream is lost with its connection; `unprocessed` if the server never saw it."""


_EV_DATA = h2.events.DataReceived
_EV_RESPONSE = h2.events.ResponseReceived
_EV_ENDED = h2.events.StreamEnded
_EV_WINDOW = h2.events.WindowUpdated
_EV_TRAILERS = h2.events.TrailersReceived
_EV_RESET = h2.events.StreamReset
_EV_INFO = h2.events.InformationalResponseReceived
_EV_SETTINGS = h2.events.RemoteSettingsChanged
_EV_GOAWAY = h2.events.ConnectionTerminated
_EV_PUSH = h2.events.PushedStreamReceived


class UpstreamConnection(Endpoint, asyncio.Protocol):
    """One client-side h2 connection to an upstream, as an asyncio protocol."""

    def __init__(self, pool: H2Pool, address: Address) -> None:
        Endpoint.__init__(
            self,
            new_connection(client_side=True, max_header_list_size=pool.max_header_list_size),
            pool.batcher,
        )
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, UpstreamStream] = {}
        # After a GOAWAY (sent or received) no stream is opened here any more.
        self.goaway = False
        self.idle_since = pool.loop.time()
        # How long it may stay open without streams (the service's idle timeout);
        # None: the pool's.
        self.idle_timeout: float | None = None
        # Resolves with the server's first SETTINGS; fails if the connection dies first.
        self.settled: asyncio.Future[None] = pool.loop.create_future()
        # The server's MAX_CONCURRENT_STREAMS, kept here because every dispatch
        # reads it (through h2's Settings it is two Python calls).
        self.max_streams = self.h2.remote_settings.max_concurrent_streams

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.mark()

    def data_received(self, data: bytes) -> None:
        try:
            events: list[Any] = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("upstream %s broke the HTTP/2 protocol: %s", self.address, exc)
            self.flush_now()
            self._lost(f"upstream protocol error: {exc}")
            return
        try:
            self._dispatch(events)
        except Exception:
            # A bug of ours must not leave the streams of this connection hanging.
            log.exception("upstream %s: failed handling HTTP/2 events", self.address)
            self._lost("internal error")
            return
        self.mark()

    def _dispatch(self, events: list[Any]) -> None:
        streams = self.streams
        for ev in events:
            kind = type(ev)
            if kind is _EV_DATA:
                owner = streams.get(ev.stream_id)
                if owner is not None:
                    owner.up_data(ev.data, ev.flow_controlled_length, ev.stream_ended is not None)
                else:
                    self.ack(ev.stream_id, ev.flow_controlled_length)
            elif kind is _EV_RESPONSE:
                owner = streams.get(ev.stream_id)
                if owner is not None:
                    owner.up_response(ev.headers, ev.stream_ended is not None)
            elif kind is _EV_ENDED:
                owner = streams.get(ev.stream_id)
                if owner is not None:
                    owner.up_ended()
            elif kind is _EV_WINDOW:
                self.window_updated(ev.stream_id)
            elif kind is _EV_TRAILERS:
                owner = streams.get(ev.stream_id)
                if owner is not None:
                    owner.up_trailers(ev.headers)
            elif kind is _EV_RESET:
                owner = streams.pop(ev.stream_id, None)
                if owner is not None:
                    owner.up_reset(int(ev.error_code))
                    self._maybe_idle()
            else:
                self._other_event(ev)

    def _other_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, _EV_INFO):
            owner = self.streams.get(ev.stream_id)
            if owner is not None:
                owner.up_informational(ev.headers)
        elif isinstance(ev, _EV_SETTINGS):
            self.max_streams = self.h2.remote_settings.max_concurrent_streams
            if not self.settled.done():
                self.settled.set_result(None)
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                self.window_updated(0)
        elif isinstance(ev, _EV_GOAWAY):
            self._goaway_received(ev.last_stream_id or 0, ev.error_code)
        elif isinstance(ev, _EV_PUSH) and ev.pushed_stream_id is not None:
            # Push is disabled in our SETTINGS; a server that pushes anyway is refused.
            self.h2.reset_stream(ev.pushed_stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"upstream connection lost: {exc}" if exc else "upstream closed the connection")

    def pause_writing(self) -> None:
        # h2 flow control already bounds what we write; nothing else to hold back.
        pass

    def resume_writing(self) -> None:
        pass

    # -- used by the pool and by stream owners ------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    @property
    def has_capacity(self) -> bool:
        return self.alive and not self.goaway and len(self.streams) < self.max_streams

    def open_stream(self, owner: UpstreamStream, headers: list[Header], end_stream: bool) -> int:
        """Send the request headers on a new stream; raises H2UpstreamError when it cannot."""
        if not self.alive or self.goaway:
            raise H2UpstreamError("connection is closing")
        try:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.NoAvailableStreamIDError as exc:
            self.goaway = True
            self.pool.forget(self)
            raise H2UpstreamError("stream ids exhausted") from exc
        except h2.exceptions.ProtocolError as exc:
            raise H2UpstreamError(str(exc)) from exc
        self.streams[stream_id] = owner
        self.mark()
        return stream_id

    def stream_done(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self._maybe_idle()

    def close(self) -> None:
        """Close now, telling the server with a GOAWAY."""
        self.goaway = True
        self.pool.forget(self)
        if self.alive and self.transport is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush_now()
            self.transport.close()

    # -- internals ----------------------------------------------------------

    def _maybe_idle(self) -> None:
        if not self.streams:
            self.idle_since = self.pool.loop.time()
            if self.goaway:
                self.close()

    def _goaway_received(self, last_stream_id: int, error_code: object) -> None:
        log.debug(
            "upstream %s sent GOAWAY (last stream %d, %s)", self.address, last_stream_id, error_code
        )
        self.goaway = True
        self.pool.forget(self)
        unprocessed = [sid for sid in self.streams if sid > last_stream_id]
        for sid in unprocessed:
            owner = self.streams.pop(sid)
            owner.up_failed(True, "upstream sent GOAWAY")
        self._maybe_idle()

    def _lost(self, reason: str) -> None:
        if not self.alive:
            return
        self.alive = False
        self.blocked.clear()
        self.pool.forget(self)
        if not self.settled.done():
            self.settled.set_exception(H2UpstreamError(reason))
        if self.transport is not None:
            self.transport.close()
        streams, self.streams = self.streams, {}
        for owner in streams.values():
            owner.up_failed(False, reason)


class H2Pool:
    """Upstream h2c connections by address, for one event loop."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_header_list_size: int = 64 * 1024,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.batcher = WriteBatcher(self.loop)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_header_list_size = max_header_list_size
        self._conns: dict[Address, list[UpstreamConnection]] = {}
        self._connecting: dict[Address, asyncio.Future[UpstreamConnection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False
        # Whose security settings (certificate, config) upstream connections use.
        self.ctx_ref: weakref.ref[ProxyContext] | None = None

    def ready(self, address: Address) -> UpstreamConnection | None:
        """An open connection to `address` that can take one more stream, if any."""
        conns = self._conns.get(address)
        if conns:
            for conn in conns:
                if conn.has_capacity:
                    return conn
        return None

    def connect(
        self,
        address: Address,
        connect_timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> asyncio.Future[UpstreamConnection]:
        """A new connection to `address` (shared with other callers while it opens),
        opened within `connect_timeout` and closed after `idle_timeout` without
        streams (the pool's when None)."""
        fut = self._connecting.get(address)
        if fut is None:
            if self.closed:
                fut = self.loop.create_future()
                fut.set_exception(H2UpstreamError("pool closed"))
                return fut
            fut = self.loop.create_future()
            # Mark a failure as retrieved even when every waiter has gone.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._connecting[address] = fut
            task = self.loop.create_task(
                self._open(address, fut, connect_timeout or self.connect_timeout, idle_timeout)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def _open(
        self,
        address: Address,
        fut: asyncio.Future[UpstreamConnection],
        connect_timeout: float,
        idle_timeout: float | None,
    ) -> None:
        conn: UpstreamConnection | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                # proxy.upstream decides mTLS (meshed endpoint) or plaintext.
                _, conn = await upstream.create_connection(
                    lambda: UpstreamConnection(self, address),
                    address,
                    self.ctx_ref() if self.ctx_ref is not None else None,
                    alpn="h2",
                    timeout=connect_timeout,
                )
                conn.idle_timeout = idle_timeout
                await conn.settled
        except (OSError, TimeoutError, H2UpstreamError) as exc:
            if conn is not None:
                conn.close()
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            )
            log.info("cannot open HTTP/2 connection to %s: %s", address, reason)
            error = H2ConnectTimeout if isinstance(exc, TimeoutError) else H2UpstreamError
            fut.set_exception(error(f"connect to {address}: {reason}"))
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if not fut.done():
                fut.set_exception(H2UpstreamError(f"connect to {address} aborted"))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            self._conns.setdefault(address, []).append(conn)
            self._schedule_sweep()
            fut.set_result(conn)
        finally:
            if self._connecting.get(address) is fut:
                del self._connecting[address]

    def forget(self, conn: UpstreamConnection) -> None:
        conns = self._conns.get(conn.address)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.address]

    def _schedule_sweep(self) -> None:
        if self.closed:
            return
        shortest = min(
            (c.idle_timeout or self.idle_timeout for cs in self._conns.values() for c in cs),
            default=self.idle_timeout,
        )
        period = max(0.05, min(shortest / 2, 10.0))
        at = self.loop.time() + period
        if self._sweeper is not None:
            if self._sweeper.when() <= at:
                return
            # A connection with a shorter idle timeout arrived: look sooner.
            self._sweeper.cancel()
        self._sweeper = self.loop.call_at(at, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        for conns in list(self._conns.values()):
            for conn in list(conns):
                idle = conn.idle_timeout or self.idle_timeout
                if not conn.streams and conn.idle_since <= now - idle:
                    conn.close()
        if self._conns:
            self._schedule_sweep()

    def connections(self, address: Address) -> list[UpstreamConnection]:
        return list(self._conns.get(address, ()))

    async def close(self) -> None:
        """Close every connection (GOAWAY first) and stop opening new ones."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
        self._conns.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
