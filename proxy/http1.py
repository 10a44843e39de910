"""HTTP/1.x proxying: one downstream connection, many requests, pooled upstreams.

httptools parses both directions; its callbacks only queue events (a request
or response head, body bytes, the end of a message) and the coroutines below
act on them, so bodies stream through in pieces of at most one read and
pipelined requests wait their turn.

Per request (`_Conn._handle`): choose the upstream (`choose_upstream`, the seam
for routing and balancing), send the head and whatever body has arrived on a
pooled connection (`_exchange`, the seam for retries), stream the rest of the
body in a helper task while waiting for the response head, forward interim 1xx
responses, then stream the response body, re-framed for the client when
needed. A 101 answer to an `Upgrade` turns the connection into a byte tunnel.

Timeouts use one timer per connection (`_arm`/`_touch` move a deadline; the
timer fires late and re-arms itself) instead of one per read. Errors are the
`Http1Error` and `pool.UpstreamError` families; `STATUS` maps them to the
status the client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import weakref
from collections import deque
from http import HTTPStatus
from typing import Final

import httptools

from proxy import engine as engine_mod
from proxy import headers as hdrs
from proxy import pool as upstream_pool
from proxy import tcp, upstream
from proxy.conn import Address, Direction, Downstream, ProxyContext
from proxy.engine import PENDING, Call, Reply
from proxy.headers import Framing
from proxy.pool import UpstreamBroken, UpstreamConnection, UpstreamError, UpstreamTimeout
from proxy.security import inbound
from proxy.telemetry.record import RequestRecord
from proxy.telemetry.telemetry import replace_trace_headers
from proxy.traffic.flags import Flag
from proxy.traffic.retry import MAX_RETRIABLE_BODY, Failure

log = logging.getLogger(__name__)

READ_SIZE: Final = 256 * 1024
MIRROR_TIMEOUT: Final = 10.0
# A request body is buffered for a mirror up to this size; larger ones are not mirrored.
MIRROR_BODY_LIMIT: Final = 64 * 1024
_CRLF: Final = b"\r\n"


class Http1Error(Exception):
    """The downstream side of an HTTP/1.x connection failed."""


class BadRequest(Http1Error):
    """Not HTTP/1.x, or HTTP/1.x that breaks the framing rules."""


class HeadersTooLarge(Http1Error):
    pass


class RequestTimeout(Http1Error):
    """The head (or the body) did not arrive in time."""


class ClientGone(Http1Error):
    """The client closed or reset the connection; nobody is left to answer."""


class _QuietClose(Http1Error):
    """Idle keep-alive connection timed out or the proxy drains: close, no answer."""


class DeadlineExceeded(UpstreamTimeout):
    """The request's deadline (caller's header or route timeout) passed."""


class TryTimeout(UpstreamTimeout):
    """One attempt took longer than its per-try timeout."""


class ResponseTimeout(UpstreamTimeout):
    """The route's request timeout passed while the response body was still streaming."""


# The one place errors become statuses. Looked up along the exception's MRO,
# so a subclass added later inherits its family's status unless listed.
STATUS: Final[dict[type[Exception], int]] = {
    BadRequest: 400,
    RequestTimeout: 408,
    HeadersTooLarge: 431,
    # Envoy's answer to a connect timeout (flag UF); a refused connect stays 502.
    upstream_pool.ConnectTimeout: 503,
    upstream_pool.ConnectFailed: 502,
    UpstreamBroken: 502,
    UpstreamTimeout: 504,
    UpstreamError: 502,
}

_REASONS: Final = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def status_for(exc: BaseException) -> int | None:
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)  # type: ignore[call-overload]
        if status is not None:
            return status
    return None


def _reason(status: int) -> bytes:
    reason = _REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Error"
    return reason


def error_response(
    status: int,
    *,
    close: bool,
    head: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
    message: str = "",
) -> bytes:
    reason = _reason(status)
    body = b"%d %s\n" % (status, reason)
    if message:
        body += message.encode("utf-8", "replace")[:1024] + b"\n"
    extra = [b"%s: %s\r\n" % (n, v) for n, v in headers] if headers else []
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            *extra,
            b"Content-Type: text/plain\r\nContent-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n" if close else _CRLF,
            b"" if head else body,
        )
    )


# ---------------------------------------------------------------------------
# Parsing: httptools callbacks -> events


class _End:
    """Marks the end of a message in an event queue."""

    __slots__ = ()


_END: Final = _End()


class _Request:
    __slots__ = (
        "headers",
        "http11",
        "keep_alive",
        "meta",
        "method",
        "target",
        "trailers",
        "upgrade",
    )

    def __init__(self) -> None:
        self.target = b""
        self.headers: hdrs.Headers = []
        self.trailers: hdrs.Headers | None = None
        self.method = b""
        self.http11 = True
        self.keep_alive = True
        self.upgrade = False
        self.meta = hdrs.RequestMeta()


class _Response:
    __slots__ = ("headers", "http11", "keep_alive", "reason", "status", "trailers")

    def __init__(self) -> None:
        self.reason = b""
        self.headers: hdrs.Headers = []
        self.trailers: hdrs.Headers | None = None
        self.status = 0
        self.http11 = True
        self.keep_alive = True


def _add_field(msg: _Request | _Response, in_head: bool, name: bytes, value: bytes) -> None:
    """A header field, or a trailer field once the head is complete."""
    if in_head:
        msg.headers.append((name, value))
    elif msg.trailers is None:
        msg.trailers = [(name, value)]
    else:
        msg.trailers.append((name, value))


class _RequestReader:
    """Feeds a downstream's bytes to httptools; queues `_Request`, bytes, `_END`."""

    __slots__ = (
        "cur",
        "error",
        "events",
        "head_size",
        "in_head",
        "limit",
        "parser",
        "pending",
        "rest",
    )

    def __init__(self, limit: int) -> None:
        self.events: deque[_Request | bytes | _End] = deque()
        self.parser = httptools.HttpRequestParser(self)
        self.limit = limit
        self.cur = _Request()
        self.in_head = False
        self.head_size = 0
        self.pending = 0
        self.error: Http1Error | None = None
        # Bytes after an Upgrade/CONNECT head; the parser stops there.
        self.rest: bytes | None = None

    def on_message_begin(self) -> None:
        self.cur = _Request()
        self.in_head = True
        self.head_size = 0
        self.pending = 0

    def on_url(self, url: bytes) -> None:
        self.cur.target += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.cur.headers.append((name, value))
        else:
            _add_field(self.cur, False, name, value)
        self._grow(len(name) + len(value) + 4)

    def _grow(self, n: int) -> None:
        self.head_size += n
        if self.head_size > self.limit:
            self.error = HeadersTooLarge(f"request head over {self.limit} bytes")
            raise self.error

    def on_headers_complete(self) -> None:
        p = self.parser
        cur = self.cur
        cur.method = p.get_method()
        cur.http11 = p.get_http_version() == "1.1"
        cur.keep_alive = p.should_keep_alive()
        cur.upgrade = p.should_upgrade()
        self.in_head = False
        self.head_size = 0
        self.events.append(cur)

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(_END)

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.rest = data[exc.args[0] :]
        except httptools.HttpParserCallbackError as exc:
            raise (self.error or BadRequest(str(exc))) from None
        except httptools.HttpParserError as exc:
            raise BadRequest(str(exc) or type(exc).__name__) from None
        if self.in_head:
            # A field still incomplete at the end of `data` is not counted by the
            # callbacks yet; count the bytes instead (may overcount by one read).
            self.pending += len(data)
            if self.pending > self.limit:
                raise HeadersTooLarge(f"request head over {self.limit} bytes")


class _ResponseReader:
    """Feeds an upstream's bytes to httptools; queues `_Response`, bytes, `_END`.

    Interim (1xx) responses are queued as heads without an `_END`.
    """

    __slots__ = (
        "cur",
        "error",
        "events",
        "head_size",
        "in_head",
        "limit",
        "parser",
        "received",
        "rest",
    )

    def __init__(self, limit: int) -> None:
        self.events: deque[_Response | bytes | _End] = deque()
        self.parser = httptools.HttpResponseParser(self)
        self.limit = limit
        self.cur = _Response()
        self.in_head = False
        self.head_size = 0
        self.error: UpstreamError | None = None
        self.rest: bytes | None = None
        # Bytes read for the current exchange: 0 means a reused connection that
        # failed at once was stale, not answering.
        self.received = 0

    def on_message_begin(self) -> None:
        self.cur = _Response()
        self.in_head = True
        self.head_size = 0

    def on_status(self, reason: bytes) -> None:
        self.cur.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.cur.headers.append((name, value))
        else:
            _add_field(self.cur, False, name, value)
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.limit:
            self.error = UpstreamBroken(f"response head over {self.limit} bytes")
            raise self.error

    def on_headers_complete(self) -> None:
        p = self.parser
        cur = self.cur
        cur.status = p.get_status_code()
        cur.http11 = p.get_http_version() == "1.1"
        cur.keep_alive = p.should_keep_alive()
        self.in_head = False
        self.head_size = 0
        self.events.append(cur)

    def on_body(self, body: bytes) -> None:
        if body:
            self.events.append(body)

    def on_message_complete(self) -> None:
        if self.cur.status >= 200:
            self.events.append(_END)

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.rest = data[exc.args[0] :]
        except httptools.HttpParserCallbackError as exc:
            raise (self.error or UpstreamBroken(str(exc))) from None
        except httptools.HttpParserError as exc:
            raise UpstreamBroken(f"bad response: {exc}") from None


# ---------------------------------------------------------------------------
# Draining: idle keep-alive connections close at once


_live: weakref.WeakKeyDictionary[ProxyContext, set[_Conn]] = weakref.WeakKeyDictionary()


def _register(conn: _Conn) -> set[_Conn]:
    conns = _live.get(conn.ctx)
    if conns is None:
        conns = _live[conn.ctx] = set()
        waiter = asyncio.ensure_future(_close_idle_on_drain(conn.ctx.draining, conns))
        # Held by the set's owner so it is not collected; cancelled with the loop.
        _waiters.add(waiter)
        waiter.add_done_callback(_waiters.discard)
    conns.add(conn)
    return conns


_waiters: set[asyncio.Future[None]] = set()


async def _close_idle_on_drain(draining: asyncio.Event, conns: set[_Conn]) -> None:
    await draining.wait()
    for conn in list(conns):
        if conn.wd_kind == _IDLE:
            conn.abort(_QuietClose("draining"))


# ---------------------------------------------------------------------------
# The connection

# Watchdog phases: what a timeout means depends on what we were waiting for.
_OFF, _IDLE, _HEAD, _EXCHANGE, _STREAM = range(5)


class _Conn:
    def __init__(self, ds: Downstream, ctx: ProxyContext) -> None:
        self.ds = ds
        self.ctx = ctx
        self.reader = ds.reader
        self.writer = ds.writer
        self.transport = ds.writer.transport
        self.stats = ds.stats
        self.pool = upstream_pool.pool_for(ctx)
        self.rr = _RequestReader(ctx.max_header_bytes)
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.default_host = str(ds.upstream).encode()
        self.engine = engine_mod.engine_for(ctx)
        # 0 means "no limit" in the proxy's settings.
        self.idle_timeout = ctx.idle_timeout if ctx.idle_timeout > 0 else 1e9
        # Between requests: the called service's TrafficPolicy idle timeout, if any.
        self.keepalive_timeout = self.idle_timeout
        if self.engine is not None:
            service_idle = self.engine.downstream_idle_timeout(ds.direction, ds.upstream)
            if service_idle is not None:
                self.keepalive_timeout = service_idle
        self.header_timeout = ctx.header_timeout if ctx.header_timeout > 0 else 1e9
        # Watchdog state.
        self.wd_kind = _OFF
        self.wd_deadline = 0.0
        self.wd_at = 0.0
        self.wd_handle: asyncio.TimerHandle | None = None
        self.abort_reason: BaseException | None = None
        # Per-request state.
        self.up: UpstreamConnection | None = None
        self.pump: asyncio.Task[None] | None = None
        self.body_done = True
        self.up_write_failed = False
        self.continue_sent = False
        self.response_started = False
        self.head_started = 0.0
        # The backend service's connect and pooled-idle timeouts (None: the pool's).
        self.up_connect: float | None = None
        self.up_idle: float | None = None
        self.pending: asyncio.Future[None] | None = None
        self.telemetry = ctx.telemetry
        self.rec: RequestRecord | None = None

    # -- watchdog -----------------------------------------------------------

    def _arm(self, kind: int, timeout: float) -> None:
        self._arm_at(kind, self.loop.time() + timeout)

    def _arm_at(self, kind: int, deadline: float) -> None:
        self.wd_kind = kind
        self.wd_deadline = deadline
        if self.wd_handle is None or self.wd_at > deadline:
            if self.wd_handle is not None:
                self.wd_handle.cancel()
            self.wd_at = deadline
            self.wd_handle = self.loop.call_at(deadline, self._wd_fire)

    def _touch(self, timeout: float) -> None:
        """Progress: push the deadline out without changing the phase."""
        self.wd_deadline = self.loop.time() + timeout

    def _wd_fire(self) -> None:
        self.wd_handle = None
        kind = self.wd_kind
        if kind == _OFF:
            return
        if self.loop.time() < self.wd_deadline:
            self.wd_at = self.wd_deadline
            self.wd_handle = self.loop.call_at(self.wd_deadline, self._wd_fire)
            return
        self.wd_kind = _OFF
        exc: BaseException
        if kind == _IDLE:
            exc = _QuietClose("idle keep-alive connection timed out")
        elif kind == _HEAD:
            exc = RequestTimeout(f"request head not complete within {self.header_timeout}s")
        elif kind == _EXCHANGE and not self.body_done:
            exc = RequestTimeout("request body stalled")
        else:
            exc = UpstreamTimeout("upstream did not answer in time")
        self.abort(exc)

    def abort(self, exc: BaseException) -> None:
        """Stop the connection's task with `exc` as the reason (first reason wins)."""
        if self.abort_reason is None:
            self.abort_reason = exc
            self.task.cancel()

    # -- I/O helpers ----------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if self._send(data):
            await self._drain()

    def _send(self, data: bytes) -> bool:
        """Write to the client without a coroutine; True when the caller must
        `_drain()` (the transport kept bytes back: flow control)."""
        transport = self.transport
        if transport.is_closing():
            raise ClientGone("client connection closed")
        transport.write(data)
        self.stats.bytes_to_downstream += len(data)
        # Most writes go out at once; only wait (for flow control) when they did not.
        return bool(transport.get_write_buffer_size())

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from None

    # -- the connection loop --------------------------------------------------

    async def run(self) -> None:
        try:
            if self.ds.preread:
                self.stats.bytes_from_downstream += len(self.ds.preread)
                self.head_started = self.loop.time()
                self.rr.feed(self.ds.preread)
            while True:
                req = await self._next_request()
                if req is None:
                    return
                self.stats.requests += 1
                if not await self._handle(req):
                    return
        except asyncio.CancelledError:
            reason = self.abort_reason
            if reason is None:
                raise
            self.task.uncancel()
            await self._fail(reason)
        except (Http1Error, UpstreamError) as exc:
            await self._fail(exc)
        except (ConnectionError, OSError) as exc:
            log.debug("http1: %s: %s", self.ds.peer, exc)

    async def _next_request(self) -> _Request | None:
        rr = self.rr
        events = rr.events
        ctx = self.ctx
        while True:
            if events:
                ev = events.popleft()
                if type(ev) is _Request:
                    return ev
                continue  # leftovers of a request we gave up on cannot happen; skip
            if rr.rest is not None:
                return None
            if rr.in_head:
                self._arm_at(_HEAD, self.head_started + self.header_timeout)
            else:
                if ctx.draining.is_set():
                    return None
                self._arm(_IDLE, self.keepalive_timeout)
            try:
                data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                return None
            if not data:
                return None
            self.stats.bytes_from_downstream += len(data)
            if not rr.in_head:
                self.head_started = self.loop.time()
            rr.feed(data)

    async def _fail(self, exc: BaseException) -> None:
        status = status_for(exc)
        if status is None or self.response_started:
            log.debug("http1: %s: closing: %s", self.ds.peer, exc)
            return
        # Client mistakes are the client's business; a flood of them must not flood the log.
        log.log(
            logging.DEBUG if status < 500 else logging.INFO,
            "http1: %s: %d: %s",
            self.ds.peer,
            status,
            exc,
        )
        self.response_started = True
        data = error_response(status, close=True)
        self.writer.write(data)
        self.stats.bytes_to_downstream += len(data)
        await self._lingering_close()

    async def _lingering_close(self) -> None:
        """Half-close, then read what the client still sends, so that our answer is
        not lost to a reset caused by unread data."""
        self.wd_kind = _OFF
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(2.0):
                left = 1 << 20
                while left > 0:
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        break
                    left -= len(data)
        except (TimeoutError, ConnectionError, OSError):
            pass

    def finish(self) -> None:
        self.wd_kind = _OFF
        if self.wd_handle is not None:
            self.wd_handle.cancel()
            self.wd_handle = None
        if self.pump is not None and not self.pump.done():
            self.pump.cancel()
        if self.up is not None:
            self.pool.release(self.up, reusable=False)
            self.up = None
        if not self.writer.is_closing():
            self.writer.close()

    # -- one request ----------------------------------------------------------

    def choose_upstream(self, req: _Request) -> Address:
        """Where this request goes. Routing and balancing plug in here."""
        return self.ds.upstream

    async def _handle(self, req: _Request) -> bool:
        """Proxy one request; True when the downstream connection stays open."""
        self.response_started = False
        self.continue_sent = False
        self.up_write_failed = False
        ds = self.ds
        stats = self.stats
        in0, out0 = stats.bytes_from_downstream, stats.bytes_to_downstream
        rec, trace = self.telemetry.begin(
            ds.direction,
            "http",
            req.headers,
            method=req.method,
            path=req.target,
            http_version="1.1" if req.http11 else "1.0",
            peer=ds.peer,
        )
        self.telemetry.note_peer(rec, ds.peer_identity, ds.upstream, ds.original_dst)
        self.rec = rec
        call: Call | None = None
        try:
            headers = replace_trace_headers(req.headers, trace) if trace else req.headers
            if ds.direction is Direction.INBOUND:
                headers = self.telemetry.take_peer_workload(rec, ds.peer_identity, headers)
                # Authorization and x-forwarded-client-cert (proxy.security.inbound).
                checked = inbound.http_request(self.ctx, ds, req.method, req.target, headers)
                if not isinstance(checked, list):
                    return await self._reply(req, inbound.denied_reply())
                headers = checked
            engine = self.engine
            if engine is not None and req.method != b"CONNECT":
                decision = engine.request(
                    ds.direction,
                    ds.upstream,
                    req.method,
                    req.target,
                    headers,
                    now=self.loop.time(),
                    peer=ds.peer,
                )
                if decision is not None:
                    if type(decision) is Reply:
                        return await self._reply(req, decision)
                    assert isinstance(decision, Call)
                    call = decision
                    rec.destination_service = call.service
                    rec.route = call.route
                    if call.touches_headers:
                        headers = call.rewrite_headers(headers)
            # Forwarded from here, not from a coroutine of its own: each nested
            # coroutine level costs every request's suspensions a step.
            head = self._head(req, headers)
            if call is not None:
                if call.target is not None:
                    head[2] = call.target
                b = call.backend
                if b is not None:
                    self.up_connect, self.up_idle = b.connect_timeout, b.idle_timeout
                return await self._attempts(req, head, call)
            if req.method == b"CONNECT":
                await self._connect_tunnel(req, head)
                return False
            head.append(_CRLF)
            try:
                up, resp = await self._exchange(self.choose_upstream(req), req, head)
            except UpstreamError as exc:
                return await self._answer_error(req, exc)
            return await self._respond(req, resp, up)
        finally:
            if call is not None:
                self.up_connect = self.up_idle = None
                call.finish(self.loop.time())
                # (`call.flags` renders the set; most requests have none.)
                rec.flags = call.flags if call.flag_set else "-"
                rec.attempts = call.attempts
                rec.upstream_host = call.upstream
            rec.request_bytes = stats.bytes_from_downstream - in0
            rec.response_bytes = stats.bytes_to_downstream - out0
            self.telemetry.end(rec)
            self.rec = None

    async def _reply(self, req: _Request, reply: Reply) -> bool:
        """Answer locally (a redirect, a refusal, a limit, an injected fault)."""
        if self.rec is not None:
            self.rec.status = reply.status
            self.rec.flags = reply.flags
        log.log(
            logging.DEBUG if reply.status < 500 else logging.INFO,
            "http1: %s %s -> %d (local): %s",
            req.method.decode(),
            req.target[:200].decode(errors="replace"),
            reply.status,
            reply.message,
        )
        keep = self.body_done_for(req) and req.keep_alive and not self.ctx.draining.is_set()
        self.response_started = True
        self.wd_kind = _STREAM
        self._touch(self.idle_timeout)
        await self._write(
            error_response(
                reply.status,
                close=not keep,
                head=req.method == b"HEAD",
                headers=reply.headers,
                message=reply.message,
            )
        )
        if not keep and not self.body_done_for(req):
            await self._lingering_close()
        return keep

    def body_done_for(self, req: _Request) -> bool:
        """Whether the request's whole body has been read (before the head was forwarded)."""
        if not req.meta.has_body:
            return True
        return any(ev is _END for ev in self.rr.events)

    def _head(self, req: _Request, headers: hdrs.Headers) -> list[bytes]:
        """The request head to send upstream without its final CRLF; for CONNECT,
        only its header lines."""
        try:
            pieces, meta = hdrs.forward_request(
                headers, new_request_id=hdrs.new_request_id, default_host=self.default_host
            )
        except ValueError as exc:
            raise BadRequest(f"bad header value: {exc}") from None
        req.meta = meta
        self.body_done = not meta.has_body
        if req.method == b"CONNECT":
            return pieces
        head = [req.method, b" ", req.target, b" HTTP/1.1\r\n", *pieces]
        if meta.upgrade is not None:
            head += (b"Connection: upgrade\r\nUpgrade: ", meta.upgrade, _CRLF)
        elif meta.te_trailers:
            head.append(b"TE: trailers\r\nConnection: te\r\n")
        if meta.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        return head

    async def _attempts(self, req: _Request, head: list[bytes], call: Call) -> bool:
        """Send `req` as the engine says: attempt, judge the outcome, maybe again.

        `head` is the request head without its final CRLF; each attempt adds the
        remaining deadline. A body is replayed only when it was read whole first.
        """
        loop = self.loop
        if call.delay:
            await asyncio.sleep(call.delay)  # fault injection
        body: list[bytes] | tuple[()] = ()
        if not self.body_done:
            meta = req.meta
            retry = call.retry
            if (
                meta.content_length is not None
                and not meta.expect_continue
                and (
                    (
                        retry is not None
                        and retry.attempts > 1
                        and meta.content_length <= MAX_RETRIABLE_BODY
                    )
                    or (call.mirrors and meta.content_length <= MIRROR_BODY_LIMIT)
                )
            ):
                await self._read_whole_body(req)
            body = []
            self.body_done = self._take_body(body, meta.chunked, req)
            call.body_size = sum(map(len, body)) if self.body_done else None
        # (else no body: `call.body_size` stays 0.)
        if call.mirrors and call.body_size is not None and call.body_size <= MIRROR_BODY_LIMIT:
            self._mirror(call, head, body)
        # Without a deadline or per-try timeout every attempt sends the same bytes.
        same: list[bytes] | None = None
        if call.deadline.at is None and call.per_try is None:
            same = [*head, _CRLF, *body]
        while True:
            now = loop.time()
            target = call.next_address(now, self._slot_granted)
            if target is PENDING:
                refused = await self._wait_pending(call)
                if refused is None:
                    continue  # a connection slot is ours now: ask again
                target = refused
            if type(target) is Reply:
                return await self._reply(req, target)
            assert isinstance(target, Address)
            timeout = None
            if same is not None:
                attempt = same
            else:
                attempt = head + [b"%s: %s\r\n" % h for h in call.deadline_headers(now)]
                attempt.append(_CRLF)
                attempt += body
                timeout = call.try_timeout(now)
            failure: Failure | None = None
            error: UpstreamError | None = None
            try:
                if timeout is None:
                    up, resp = await self._exchange(target, req, attempt)
                else:
                    async with asyncio.timeout(timeout):
                        up, resp = await self._exchange(target, req, attempt)
            except TimeoutError:
                failure, error = Failure.TIMEOUT, TryTimeout(f"{target} did not answer in time")
            except upstream_pool.ConnectFailed as exc:
                failure, error = Failure.CONNECT_FAILURE, exc
            except UpstreamTimeout as exc:
                failure, error = Failure.TIMEOUT, exc
            except UpstreamError as exc:
                failure, error = Failure.RESET, exc
            now = loop.time()
            if error is None:
                pause = call.result(now, status=resp.status)
                if pause is None:
                    if call.response_ops is not None:
                        resp.headers = call.response_headers(resp.headers)
                    if call.deadline.at is None or resp.status == 101:
                        return await self._respond(req, resp, up)
                    return await self._respond_within(req, resp, up, call)
                self.up = None
                self.pool.release(up, reusable=False)
            else:
                self._drop_attempt()
                pause = call.result(now, failure=failure)
                if pause is None:
                    if call.expired(now):
                        error = DeadlineExceeded(f"deadline passed after {call.attempts} attempts")
                    return await self._answer_error(req, error)
            if pause > 0:
                await asyncio.sleep(pause)

    def _slot_granted(self) -> None:
        """The breaker handed this request a connection slot (it was pending)."""
        fut = self.pending
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_pending(self, call: Call) -> Reply | None:
        """Wait, as a pending request, for a connection slot: None once it is ours,
        a Reply (504) when the request's deadline passes first."""
        fut = self.pending = self.loop.create_future()
        # Waiting for the upstream is not the client being slow with its head.
        self.wd_kind = _OFF
        try:
            async with asyncio.timeout(call.deadline.remaining(self.loop.time())):
                await fut
        except TimeoutError:
            call.cancel_wait()
            return call.deadline_reply()
        finally:
            self.pending = None
        return None

    async def _respond_within(
        self, req: _Request, resp: _Response, up: UpstreamConnection, call: Call
    ) -> bool:
        """`_respond`, cut off when the request's deadline (the route's request
        timeout, Gateway API: the whole exchange) passes mid-body: the client's
        connection closes after the partial body, flag UT.

        (The per-try timeout, HTTPRoute `backendRequest`, bounds an attempt only
        until the response head, like Envoy's per_try_timeout: once a response
        is chosen there is no other attempt to make.)"""
        assert call.deadline.at is not None
        timer = self.loop.call_at(call.deadline.at, self._response_timed_out, call)
        try:
            return await self._respond(req, resp, up)
        finally:
            timer.cancel()

    def _response_timed_out(self, call: Call) -> None:
        call.flag_set.add(Flag.UPSTREAM_TIMEOUT)
        self.abort(ResponseTimeout("request timeout passed while the response was streaming"))

    def _drop_attempt(self) -> None:
        self._stop_pump()
        if self.up is not None:
            self.pool.release(self.up, reusable=False)
            self.up = None

    async def _read_whole_body(self, req: _Request) -> None:
        """Read a small request body to its end before sending, so that it can be replayed."""
        events = self.rr.events
        self._arm(_EXCHANGE, self.idle_timeout)
        while not any(ev is _END for ev in events):
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise ClientGone("client closed in the middle of the request body")
            self._touch(self.idle_timeout)
            self.stats.bytes_from_downstream += len(data)
            self.rr.feed(data)

    def _mirror(self, call: Call, head: list[bytes], body: list[bytes] | tuple[()]) -> None:
        """Fire-and-forget copies (RequestMirror); their answers are read and dropped."""
        engine = self.engine
        assert engine is not None
        data = b"".join((*head, b"Connection: close\r\n\r\n", *body))
        for address in call.mirrors:
            if not engine.mirror_slot():
                log.debug("http1: mirror to %s skipped: too many in flight", address)
                continue
            task = asyncio.ensure_future(_send_mirror(engine, address, data, self.ctx))
            _mirrors.add(task)
            task.add_done_callback(_mirrors.discard)

    async def _answer_error(self, req: _Request, exc: UpstreamError) -> bool:
        self._stop_pump()
        if self.up is not None:
            self.pool.release(self.up, reusable=False)
            self.up = None
        status = status_for(exc) or 502
        if self.rec is not None:
            self.rec.status = status
        keep = self.body_done and req.keep_alive and not self.ctx.draining.is_set()
        log.info(
            "http1: %s %s -> %d: %s",
            req.method.decode(),
            req.target[:200].decode(errors="replace"),
            status,
            exc,
        )
        self.response_started = True
        self.wd_kind = _STREAM
        self._touch(self.idle_timeout)
        await self._write(error_response(status, close=not keep, head=req.method == b"HEAD"))
        if not self.body_done:
            # Unread body bytes would make our close a reset that can eat the answer.
            await self._lingering_close()
        return keep

    def _take_body(self, out: list[bytes], chunked: bool, req: _Request) -> bool:
        """Move already-parsed body of `req` into `out`; True once it is complete."""
        events = self.rr.events
        while events:
            ev = events[0]
            if ev is _END:
                events.popleft()
                if chunked:
                    out.append(hdrs.trailer_block(req.trailers))
                return True
            if type(ev) is not bytes:
                raise BadRequest("request head inside a body")
            events.popleft()
            if chunked:
                out += hdrs.chunk(ev)
            else:
                out.append(ev)
        return False

    async def _exchange(
        self, address: Address, req: _Request, head: list[bytes]
    ) -> tuple[UpstreamConnection, _Response]:
        """Send `req` to `address` and return the connection and the final response head.

        A pooled connection the upstream closed while idle fails before any
        answer; a request without a body is then sent once more on a new one.
        """
        meta = req.meta
        pieces = head
        if not self.body_done:
            pieces = list(head)
            self.body_done = self._take_body(pieces, meta.chunked, req)
        up = self.pool.take(address) or await self.pool.connect(address, self.up_connect)
        # Over mesh mTLS, name our workload to the peer (Telemetry.tag_http1).
        data = b"".join(self.telemetry.tag_http1(pieces, up.writer))
        while True:
            self.up = up
            up.idle_timeout = self.up_idle
            if up.codec is None:
                up.codec = _ResponseReader(self.ctx.max_header_bytes)
            up.codec.received = 0
            reused = up.requests > 0
            up.requests += 1
            up.writer.write(data)
            if not self.body_done:
                self.pump = asyncio.ensure_future(self._pump_body(up, req))
            try:
                return up, await self._response_head(up, req)
            except UpstreamBroken:
                if not (reused and not meta.has_body and up.codec.received == 0):
                    raise
            log.debug("http1: pooled connection to %s was stale; reconnecting", address)
            self.pool.release(up, reusable=False)
            self.up = None
            up = await self.pool.connect(address, self.up_connect)

    async def _pump_body(self, up: UpstreamConnection, req: _Request) -> None:
        """Helper task: the rest of the request body, downstream to upstream."""
        chunked = req.meta.chunked
        idle = self.idle_timeout
        out: list[bytes] = []
        try:
            while True:
                self._touch(idle)
                data = await self.reader.read(READ_SIZE)
                if not data:
                    raise ClientGone("client closed in the middle of the request body")
                self.stats.bytes_from_downstream += len(data)
                self.rr.feed(data)
                done = self._take_body(out, chunked, req)
                if out:
                    up.writer.write(out[0] if len(out) == 1 else b"".join(out))
                    out.clear()
                    try:
                        await up.writer.drain()
                    except (ConnectionError, OSError) as exc:
                        # The upstream answers (or fails) on its own; the main task sees it.
                        log.debug("http1: upstream stopped reading the body: %s", exc)
                        self.up_write_failed = True
                        return
                if done:
                    self.body_done = True
                    return
        except Http1Error as exc:
            self.abort(exc)
        except (ConnectionError, OSError) as exc:
            self.abort(ClientGone(str(exc)))

    def _stop_pump(self) -> None:
        pump = self.pump
        if pump is not None:
            self.pump = None
            if not pump.done():
                pump.cancel()

    async def _response_head(self, up: UpstreamConnection, req: _Request) -> _Response:
        """Read until the final response head; 1xx heads go to the client as they come."""
        codec: _ResponseReader = up.codec
        events = codec.events
        timeout = self.idle_timeout
        self._arm(_EXCHANGE, timeout)
        while True:
            while events:
                ev = events.popleft()
                if type(ev) is not _Response:
                    raise UpstreamBroken("response data before a response head")
                if ev.status < 200 and ev.status != 101:
                    await self._interim(ev, req)
                    continue
                return ev
            if codec.rest is not None:
                raise UpstreamBroken("upstream switched protocols without a 101 head")
            try:
                data = await up.reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise UpstreamBroken(f"upstream {up.address}: {exc}") from None
            if not data:
                raise UpstreamBroken(
                    f"upstream {up.address} closed the connection before answering"
                )
            self._touch(timeout)
            codec.feed(data)

    async def _interim(self, resp: _Response, req: _Request) -> None:
        if not req.http11:
            return  # HTTP/1.0 clients do not understand 1xx
        pieces, _ = hdrs.forward_response(resp.headers)
        if resp.status == 100:
            if not req.meta.expect_continue or self.continue_sent:
                return
            self.continue_sent = True
        await self._write(
            b"".join((b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason), *pieces, _CRLF))
        )

    async def _respond(self, req: _Request, resp: _Response, up: UpstreamConnection) -> bool:
        """Forward the final response; True when the downstream connection stays open."""
        codec: _ResponseReader = up.codec
        pieces, rmeta = hdrs.forward_response(resp.headers)
        status = resp.status
        if self.rec is not None:
            self.rec.status = status
        if req.meta.upgrade is not None:
            if status == 101:
                await self._upgrade(req, resp, up, pieces, rmeta)
                return False
        elif status == 101:
            raise UpstreamBroken("101 Switching Protocols without an Upgrade request")
        head_request = req.method == b"HEAD"
        up_framing = hdrs.upstream_response_framing(status, head_request, rmeta)
        framing = hdrs.downstream_response_framing(up_framing, req.http11)
        keep = (
            req.keep_alive
            and framing is not Framing.CLOSE
            and req.meta.upgrade is None
            and not self.ctx.draining.is_set()
            # The client may or may not send a body it was not invited to send.
            and not (req.meta.expect_continue and not self.continue_sent and not self.body_done)
        )
        head = [b"HTTP/1.1 %d %s\r\n" % (status, resp.reason), *pieces]
        if not keep:
            head.append(b"Connection: close\r\n")
        elif not req.http11:
            head.append(b"Connection: keep-alive\r\n")
        if framing is Framing.CHUNKED or (head_request and rmeta.chunked and req.http11):
            # (A HEAD answer says how the GET answer would be framed.)
            head.append(b"Transfer-Encoding: chunked\r\n")
        head.append(_CRLF)
        self.response_started = True
        self.wd_kind = _STREAM
        keep_up = resp.keep_alive
        if up_framing is Framing.NONE:
            if self._send(b"".join(head)):
                await self._drain()
            events = codec.events
            if events and events[0] is _END:
                events.popleft()
            if head_request:
                # httptools cannot be told the request was HEAD and may wait for the
                # body the headers announce: the next exchange starts a new parser.
                up.codec = None
                keep_up = resp.http11 and not _says_close(resp.headers)
            complete = not events
        else:
            complete = await self._stream_body(head, framing, up_framing, up)
        reusable = (
            complete
            and keep_up
            and up_framing is not Framing.CLOSE
            and self.body_done
            and not self.up_write_failed
            and req.meta.upgrade is None
        )
        if not self.body_done:
            self._stop_pump()
            keep = False
        self.pump = None
        self.up = None
        self.pool.release(up, reusable=reusable)
        return keep and complete

    async def _stream_body(
        self, out: list[bytes], framing: Framing, up_framing: Framing, up: UpstreamConnection
    ) -> bool:
        """Forward the response body after the head in `out`; True if it ended cleanly."""
        codec: _ResponseReader = up.codec
        events = codec.events
        chunked = framing is Framing.CHUNKED
        timeout = self.idle_timeout
        while True:
            while events:
                ev = events.popleft()
                if ev is _END:
                    if chunked:
                        out.append(hdrs.trailer_block(codec.cur.trailers))
                    if self._send(b"".join(out)):
                        await self._drain()
                    return True
                if type(ev) is not bytes:
                    raise UpstreamBroken("response head inside a body")
                if chunked:
                    out += hdrs.chunk(ev)
                else:
                    out.append(ev)
            if out:
                if self._send(out[0] if len(out) == 1 else b"".join(out)):
                    await self._drain()
                out.clear()
            self._touch(timeout)
            try:
                try:
                    data = await up.reader.read(READ_SIZE)
                except (ConnectionError, OSError) as exc:
                    raise UpstreamBroken(f"upstream {up.address}: {exc}") from None
                if not data and up_framing is not Framing.CLOSE:
                    raise UpstreamBroken(f"upstream {up.address} closed in the middle of a body")
            except UpstreamBroken:
                # Cut short: the client must see a broken body, not a complete one.
                self.writer.transport.abort()
                raise
            if not data:
                if chunked:
                    await self._write(b"0\r\n\r\n")
                return True
            codec.feed(data)

    # -- tunnels --------------------------------------------------------------

    async def _upgrade(
        self,
        req: _Request,
        resp: _Response,
        up: UpstreamConnection,
        pieces: list[bytes],
        rmeta: hdrs.ResponseMeta,
    ) -> None:
        codec: _ResponseReader = up.codec
        protocol = rmeta.upgrade or req.meta.upgrade or b""
        head = [
            b"HTTP/1.1 101 %s\r\n" % (resp.reason or b"Switching Protocols"),
            *pieces,
            b"Connection: upgrade\r\nUpgrade: ",
            protocol,
            b"\r\n\r\n",
        ]
        # Bytes the upstream sent right behind its 101 belong to the new protocol.
        if codec.rest:
            head.append(codec.rest)
        self.response_started = True
        self.wd_kind = _OFF
        await self._write(b"".join(head))
        await self._tunnel(up, self.rr.rest or b"")

    async def _connect_tunnel(self, req: _Request, pieces: list[bytes]) -> None:
        """CONNECT: pass the request on and relay bytes both ways from then on."""
        up = await self.pool.connect(self.choose_upstream(req))
        self.up = up
        up.writer.write(b"".join((b"CONNECT ", req.target, b" HTTP/1.1\r\n", *pieces, _CRLF)))
        self.response_started = True
        await self._tunnel(up, self.rr.rest or b"")

    async def _tunnel(self, up: UpstreamConnection, rest: bytes) -> None:
        self.wd_kind = _OFF
        self.up = None  # the relay owns and closes it
        ds = dataclasses.replace(self.ds, preread=rest)
        await tcp.relay(ds, up.reader, up.writer, self.ctx)


_mirrors: set[asyncio.Future[None]] = set()


async def _send_mirror(
    engine: engine_mod.Engine, address: Address, data: bytes, ctx: ProxyContext
) -> None:
    writer: asyncio.StreamWriter | None = None
    codec = _ResponseReader(64 * 1024)
    try:
        async with asyncio.timeout(MIRROR_TIMEOUT):
            # Over mTLS when the mirror's endpoint runs a sidecar, like any upstream.
            reader, writer = await upstream.open_connection(
                address, ctx, alpn="http/1.1", timeout=ctx.connect_timeout
            )
            writer.write(data)
            # Read the answer to its end (not every server honours Connection: close).
            while _END not in codec.events:
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    break
                codec.feed(chunk)
    except (OSError, TimeoutError, UpstreamError) as exc:
        log.debug("http1: mirror to %s failed: %s", address, exc)
    finally:
        if writer is not None:
            writer.close()
        engine.mirror_done()


def _says_close(headers: hdrs.Headers) -> bool:
    for name, value in headers:
        if name.lower() == b"connection" and b"close" in hdrs.connection_tokens((value,)):
            return True
    return False


async def serve(downstream: Downstream, ctx: ProxyContext) -> None:
    """Proxy HTTP/1.x requests from `downstream` until either side is done; closes it."""
    sock = downstream.writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = _Conn(downstream, ctx)
    conns = _register(conn)
    try:
        await conn.run()
    finally:
        conns.discard(conn)
        conn.finish()
