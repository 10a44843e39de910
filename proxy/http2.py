"""HTTP/2 (h2c prior knowledge, as gRPC uses it): stream-level proxying with h2.

The client's connection is an h2 server connection (`DownstreamConnection`);
every client stream becomes its own request (`Exchange`) on a shared,
multiplexed upstream connection from `proxy.h2pool`. Bodies flow through
`proxy.h2conn.Pipe`s with end-to-end flow control; trailers, RST_STREAM and
GOAWAY are carried across.

The per-request seam, for routing, balancing and retries to build on:

- `DownstreamConnection.choose_upstream(request_headers)` picks the address of
  one attempt;
- `Exchange.start()` sends the request there (reusing a pooled connection, or
  opening one) and `Exchange.up_*` receive the outcome; `Exchange._attempt_failed`
  decides between another attempt and an error answer. Today the only retry is
  the transparent one for requests the upstream provably never processed (a
  REFUSED_STREAM, or a stream above a GOAWAY's last-stream-id) whose body so far
  is small enough to replay.

Errors are answered once, here: an upstream that cannot be reached gets the
client a `:status 502`, or for gRPC a trailers-only `grpc-status: 14`
(UNAVAILABLE); a failure after the response started resets the client's stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from proxy.conn import Address, Downstream, ProxyContext
from proxy.h2conn import Endpoint, Header, Pipe, new_connection, reset_stream
from proxy.h2headers import (
    GRPC_UNAVAILABLE,
    MalformedHeaders,
    error_response,
    request_headers,
    response_headers,
    trailer_headers,
)
from proxy.h2pool import H2Pool, H2UpstreamError, UpstreamConnection

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
# Stop reading from a client that does not read its responses.
WRITE_HIGH_WATER = 1 << 20
# A request body up to this size can be replayed on another connection.
REPLAY_LIMIT = 64 * 1024
MAX_TRANSPARENT_ATTEMPTS = 3
# How often one attempt may find a fresh connection already full before giving up.
MAX_CAPACITY_WAITS = 16

_NO_ERROR = int(h2.errors.ErrorCodes.NO_ERROR)
_REFUSED = int(h2.errors.ErrorCodes.REFUSED_STREAM)
_CANCEL = int(h2.errors.ErrorCodes.CANCEL)
_INTERNAL = int(h2.errors.ErrorCodes.INTERNAL_ERROR)
_PROTOCOL = int(h2.errors.ErrorCodes.PROTOCOL_ERROR)

_pools: weakref.WeakKeyDictionary[ProxyContext, H2Pool] = weakref.WeakKeyDictionary()


def pool_for(ctx: ProxyContext) -> H2Pool:
    """The upstream connection pool of this context on the running loop."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(ctx)
    if pool is None or pool.loop is not loop or pool.closed:
        pool = H2Pool(
            connect_timeout=ctx.connect_timeout,
            idle_timeout=ctx.pool_idle_timeout,
            max_header_list_size=ctx.max_header_bytes,
            loop=loop,
        )
        _pools[ctx] = pool
    return pool


async def close_pool(ctx: ProxyContext) -> None:
    pool = _pools.pop(ctx, None)
    if pool is not None:
        await pool.close()


def new_request_id() -> bytes:
    """A random UUID (version 4) as text, as x-request-id carries it."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()


async def serve(downstream: Downstream, ctx: ProxyContext) -> None:
    """Proxy one h2c client connection until it closes; never raises for bad input."""
    conn = DownstreamConnection(downstream, ctx, pool_for(ctx))
    await conn.run()


class Exchange:
    """One client stream: one request, sent upstream as one (or, transparently, more) attempts."""

    __slots__ = (
        "attempts",
        "closed",
        "down",
        "down_id",
        "req",
        "request",
        "resp",
        "responded",
        "up",
        "up_id",
        "waits",
    )

    def __init__(
        self, down: DownstreamConnection, down_id: int, headers: list[Header], ended: bool
    ) -> None:
        self.down = down
        self.down_id = down_id
        self.request = request_headers(headers, new_request_id)
        self.req = Pipe(down, down_id)
        self.req.ended = ended
        self.req.sent_log = []
        self.req.sent_log_limit = REPLAY_LIMIT
        self.req.on_done = self._pipe_done
        self.resp: Pipe | None = None
        self.up: UpstreamConnection | None = None
        self.up_id = 0
        self.responded = False
        self.attempts = 0
        self.waits = 0
        self.closed = False

    # -- one attempt -----------------------------------------------------------

    def start(self) -> None:
        """Choose the upstream for this request and send it there."""
        self.attempts += 1
        self.waits = 0
        self._dispatch(self.down.choose_upstream(self.request))

    def _dispatch(self, target: Address) -> None:
        conn = self.down.pool.ready(target)
        if conn is not None:
            self._send(conn)
        else:
            self.down.pool.connect(target).add_done_callback(self._connected)

    def _connected(self, fut: asyncio.Future[UpstreamConnection]) -> None:
        if self.closed:
            return
        if fut.cancelled():
            self._attempt_failed(False, "connect cancelled", retry=False)
        elif (exc := fut.exception()) is not None:
            self._attempt_failed(False, str(exc), retry=False)
        else:
            conn = fut.result()
            if conn.has_capacity:
                self._send(conn)
            elif self.waits < MAX_CAPACITY_WAITS:
                # More streams waited for this connection than the server allows
                # on it: the rest go to another one (opened if need be).
                self.waits += 1
                self._dispatch(conn.address)
            else:
                self._attempt_failed(
                    False, "no upstream connection with a free stream", retry=False
                )

    def _send(self, conn: UpstreamConnection) -> None:
        req = self.req
        end = req.ended and not req.pending and req.trailers is None
        try:
            up_id = conn.open_stream(self, self.request, end)
        except H2UpstreamError as exc:
            self._attempt_failed(True, str(exc))
            return
        self.up = conn
        self.up_id = up_id
        resp = Pipe(conn, up_id)
        resp.on_done = self._pipe_done
        resp.attach(self.down, self.down_id)
        self.resp = resp
        if end:
            req.done = True
        else:
            req.attach(conn, up_id)

    def _attempt_failed(self, unprocessed: bool, reason: str, *, retry: bool = True) -> None:
        if self.closed:
            return
        if self.up is not None:
            self.up.stream_done(self.up_id)
        if self.resp is not None:
            self.resp.abandon()
            self.resp = None
        if (
            retry
            and unprocessed
            and not self.responded
            and self.req.sent_log is not None
            and self.attempts < MAX_TRANSPARENT_ATTEMPTS
        ):
            log.debug("stream %d: retrying, upstream never processed it (%s)", self.down_id, reason)
            self.req = self.req.replay()
            self.req.on_done = self._pipe_done
            self.up = None
            self.start()
            return
        if self.responded:
            reset_stream(self.down, self.down_id, _INTERNAL)
        else:
            self._respond_error(502, GRPC_UNAVAILABLE, f"upstream unavailable: {reason}")
        self._finish()

    def _respond_error(self, status: int, grpc_status: int, message: str) -> None:
        self.responded = True
        down = self.down
        if not down.alive:
            return
        try:
            down.h2.send_headers(
                self.down_id,
                error_response(self.request, status, grpc_status, message),
                end_stream=True,
            )
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        if not self.req.ended:
            # RFC 9113 8.1: a complete answer, then ask the client to stop sending.
            reset_stream(down, self.down_id, _NO_ERROR)
        down.mark()

    # -- from the upstream stream (proxy.h2pool.UpstreamStream) ----------------

    def up_response(self, headers: list[Header], ended: bool) -> None:
        try:
            forward = response_headers(headers)
        except MalformedHeaders as exc:
            self._bad_upstream_headers(exc)
            return
        self.responded = True
        self.req.sent_log = None
        down = self.down
        try:
            down.h2.send_headers(self.down_id, forward, end_stream=ended)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._cancel_upstream(_CANCEL)
            return
        down.mark()
        if ended:
            resp = self.resp
            assert resp is not None
            resp.ended = resp.done = True
            self._pipe_done()

    def up_informational(self, headers: list[Header]) -> None:
        try:
            forward = response_headers(headers)
        except MalformedHeaders as exc:
            self._bad_upstream_headers(exc)
            return
        try:
            self.down.h2.send_headers(self.down_id, forward)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.down.mark()

    def _bad_upstream_headers(self, exc: MalformedHeaders) -> None:
        log.info("upstream %s sent malformed headers: %s", self.up and self.up.address, exc)
        if self.responded:
            self._reset_both(_PROTOCOL)
            return
        if self.up is not None:
            reset_stream(self.up, self.up_id, _PROTOCOL)
        self._attempt_failed(False, f"malformed response: {exc}", retry=False)

    def _reset_both(self, error_code: int) -> None:
        if self.up is not None:
            reset_stream(self.up, self.up_id, error_code)
        reset_stream(self.down, self.down_id, error_code)
        self._finish()

    def up_data(self, data: bytes, flow_len: int, ended: bool) -> None:
        resp = self.resp
        assert resp is not None
        resp.feed(data, flow_len, ended)

    def up_trailers(self, headers: list[Header]) -> None:
        resp = self.resp
        assert resp is not None
        try:
            resp.finish(trailer_headers(headers))
        except MalformedHeaders as exc:
            log.info("upstream %s sent malformed trailers: %s", self.up and self.up.address, exc)
            self._reset_both(_PROTOCOL)

    def up_ended(self) -> None:
        resp = self.resp
        if resp is not None and not resp.ended:
            resp.finish(None)

    def up_reset(self, error_code: int) -> None:
        if self.closed:
            return
        self.up = None  # h2pool already dropped the stream
        if error_code == _REFUSED and not self.responded:
            self._attempt_failed(True, "upstream refused the stream")
            return
        resp = self.resp
        if error_code == _NO_ERROR and resp is not None and resp.ended:
            # RFC 9113 8.1: the server answered in full and wants no more of the
            # request. The answer may still be on its way to the client.
            self.req.abandon()
            self._pipe_done()
            return
        reset_stream(self.down, self.down_id, error_code)
        self._finish()

    def up_failed(self, unprocessed: bool, reason: str) -> None:
        self.up = None  # h2pool already dropped the stream
        self._attempt_failed(unprocessed, reason)

    # -- from the client stream ------------------------------------------------

    def down_trailers(self, headers: list[Header]) -> None:
        try:
            self.req.finish(trailer_headers(headers))
        except MalformedHeaders as exc:
            log.info("client %s sent malformed trailers: %s", self.down.downstream.peer, exc)
            self._reset_both(_PROTOCOL)

    def down_ended(self) -> None:
        if not self.req.ended:
            self.req.finish(None)

    def down_reset(self, error_code: int) -> None:
        """The client reset its stream (a cancelled gRPC call): reset ours upstream too."""
        self._cancel_upstream(error_code)

    def down_lost(self) -> None:
        self._cancel_upstream(_CANCEL)

    # -- bookkeeping ------------------------------------------------------------

    def _cancel_upstream(self, error_code: int) -> None:
        if self.closed:
            return
        up = self.up
        if up is not None:
            resp = self.resp
            if resp is None or not (resp.done and self.req.done):
                reset_stream(up, self.up_id, error_code)
        self._finish()

    def _pipe_done(self) -> None:
        resp = self.resp
        if resp is not None and resp.done and self.req.done and not self.closed:
            if not self.req.ended:
                # The request was cut short (the upstream wants no more of it):
                # after the complete answer, ask the client to stop sending.
                reset_stream(self.down, self.down_id, _NO_ERROR)
            self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.req.abandon()
        if self.resp is not None:
            self.resp.abandon()
        if self.up is not None:
            self.up.stream_done(self.up_id)
        self.down.exchange_done(self.down_id)


_EV_REQUEST = h2.events.RequestReceived
_EV_DATA = h2.events.DataReceived
_EV_ENDED = h2.events.StreamEnded
_EV_WINDOW = h2.events.WindowUpdated
_EV_TRAILERS = h2.events.TrailersReceived
_EV_RESET = h2.events.StreamReset
_EV_SETTINGS = h2.events.RemoteSettingsChanged
_EV_GOAWAY = h2.events.ConnectionTerminated


class DownstreamConnection(Endpoint):
    """The client's h2c connection, served by h2 in server mode."""

    def __init__(self, downstream: Downstream, ctx: ProxyContext, pool: H2Pool) -> None:
        super().__init__(
            new_connection(client_side=False, max_header_list_size=ctx.max_header_bytes),
            pool.batcher,
        )
        self.downstream = downstream
        self.ctx = ctx
        self.pool = pool
        self.loop = pool.loop
        self.transport = downstream.writer.transport
        self.stats = downstream.stats
        self.exchanges: dict[int, Exchange] = {}
        # Highest stream id accepted once we sent GOAWAY (drain or idle).
        self.goaway_last: int | None = None
        self.client_goaway = False
        self.last_active = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    def choose_upstream(self, request: list[Header]) -> Address:
        """Where this request goes; per-request routing and balancing replace this."""
        return self.downstream.upstream

    def write(self, data: bytes) -> None:
        self.stats.bytes_to_downstream += len(data)
        self.transport.write(data)

    async def run(self) -> None:
        drain_watch = self.loop.create_task(self._watch_drain())
        self._idle_timer = self.loop.call_later(self.ctx.idle_timeout, self._idle_tick)
        reader = self.downstream.reader
        try:
            self.mark()
            if self.downstream.preread:
                self.receive(self.downstream.preread)
            while self.alive:
                try:
                    data = await reader.read(READ_SIZE)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                self.receive(data)
                if self.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    self.batcher.flush()
                    try:
                        await self.downstream.writer.drain()
                    except (ConnectionError, OSError):
                        break
        finally:
            drain_watch.cancel()
            self._shutdown()

    def receive(self, data: bytes) -> None:
        self.stats.bytes_from_downstream += len(data)
        self.last_active = self.loop.time()
        try:
            events: list[Any] = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("client %s broke the HTTP/2 protocol: %s", self.downstream.peer, exc)
            self.flush_now()
            self._close()
            return
        exchanges = self.exchanges
        for ev in events:
            kind = type(ev)
            if kind is _EV_DATA:
                ex = exchanges.get(ev.stream_id)
                if ex is not None:
                    ex.req.feed(ev.data, ev.flow_controlled_length, ev.stream_ended is not None)
                else:
                    self.ack(ev.stream_id, ev.flow_controlled_length)
            elif kind is _EV_REQUEST:
                self._request(ev.stream_id, ev.headers, ev.stream_ended is not None)
            elif kind is _EV_ENDED:
                ex = exchanges.get(ev.stream_id)
                if ex is not None:
                    ex.down_ended()
            elif kind is _EV_WINDOW:
                self.window_updated(ev.stream_id)
            elif kind is _EV_TRAILERS:
                ex = exchanges.get(ev.stream_id)
                if ex is not None:
                    ex.down_trailers(ev.headers)
            elif kind is _EV_RESET:
                ex = exchanges.get(ev.stream_id)
                if ex is not None:
                    ex.down_reset(int(ev.error_code))
            elif kind is _EV_SETTINGS:
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                    self.window_updated(0)
            elif kind is _EV_GOAWAY:
                # The client opens no more streams; the open ones still finish.
                self.client_goaway = True
                if not exchanges:
                    self._close()
        self.mark()

    def _request(self, stream_id: int, headers: list[Header], ended: bool) -> None:
        if self.goaway_last is not None and stream_id > self.goaway_last:
            reset_stream(self, stream_id, _REFUSED)
            return
        self.stats.requests += 1
        try:
            ex = Exchange(self, stream_id, headers, ended)
        except MalformedHeaders as exc:
            log.info("client %s sent a malformed request: %s", self.downstream.peer, exc)
            reset_stream(self, stream_id, _PROTOCOL)
            return
        self.exchanges[stream_id] = ex
        ex.start()

    def exchange_done(self, stream_id: int) -> None:
        self.exchanges.pop(stream_id, None)
        if not self.exchanges and (self.goaway_last is not None or self.client_goaway):
            self._close()

    # -- drain, idle, close --------------------------------------------------

    async def _watch_drain(self) -> None:
        await self.ctx.draining.wait()
        self.send_goaway()

    def send_goaway(self) -> None:
        """Graceful GOAWAY: the streams opened so far finish, later ones are refused.

        Written beside h2 rather than through it, because h2 stops serving a
        connection once it has sent GOAWAY itself.
        """
        if self.goaway_last is not None or not self.alive:
            return
        self.goaway_last = self.h2.highest_inbound_stream_id
        self.flush_now()
        self.write(
            GoAwayFrame(0, last_stream_id=self.goaway_last, error_code=_NO_ERROR).serialize()
        )
        if not self.exchanges:
            self._close()

    def _idle_tick(self) -> None:
        self._idle_timer = None
        if not self.alive:
            return
        idle_for = self.loop.time() - self.last_active
        if not self.exchanges and idle_for >= self.ctx.idle_timeout:
            log.debug("closing idle HTTP/2 connection from %s", self.downstream.peer)
            self.send_goaway()
            return
        # Streams in flight keep the connection; look again a full period later.
        wait = (
            self.ctx.idle_timeout if self.exchanges else max(self.ctx.idle_timeout - idle_for, 0.05)
        )
        self._idle_timer = self.loop.call_later(wait, self._idle_tick)

    def _close(self) -> None:
        if not self.alive:
            return
        self.flush_now()
        self.alive = False
        self.downstream.writer.close()

    def _shutdown(self) -> None:
        self.alive = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for ex in list(self.exchanges.values()):
            ex.down_lost()
        self.exchanges.clear()
        self.blocked.clear()
        if not self.downstream.writer.is_closing():
            self.downstream.writer.close()
