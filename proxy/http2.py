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
import weakref
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from proxy import engine as engine_mod
from proxy.conn import Address, Direction, Downstream, ProxyContext
from proxy.engine import PENDING, Call, Reply
from proxy.h2conn import Endpoint, Header, Pipe, new_connection, reset_stream
from proxy.h2headers import (
    GRPC_UNAVAILABLE,
    MalformedHeaders,
    encode_grpc_message,
    error_response,
    header_value,
    is_grpc,
    request_headers,
    response_headers,
    trailer_headers,
)
from proxy.h2pool import H2ConnectTimeout, H2Pool, H2UpstreamError, UpstreamConnection
from proxy.headers import new_request_id
from proxy.security import inbound
from proxy.telemetry.telemetry import replace_trace_headers
from proxy.traffic.flags import Flag
from proxy.traffic.retry import Failure

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
# Stop reading from a client that does not read its responses.
WRITE_HIGH_WATER = 1 << 20
# A request body up to this size can be replayed on another connection.
REPLAY_LIMIT = 64 * 1024
MAX_TRANSPARENT_ATTEMPTS = 3
# RequestMirror: a copy's body is buffered up to this size (larger ones are not
# mirrored), and a copy gets this long before it is reset.
MIRROR_BODY_LIMIT = 64 * 1024
MIRROR_TIMEOUT = 10.0
# How often one attempt may find a fresh connection already full before giving up.
MAX_CAPACITY_WAITS = 16

_NO_ERROR = int(h2.errors.ErrorCodes.NO_ERROR)
_REFUSED = int(h2.errors.ErrorCodes.REFUSED_STREAM)
_CANCEL = int(h2.errors.ErrorCodes.CANCEL)
_INTERNAL = int(h2.errors.ErrorCodes.INTERNAL_ERROR)
_PROTOCOL = int(h2.errors.ErrorCodes.PROTOCOL_ERROR)
GRPC_DEADLINE_EXCEEDED = 4

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
        pool.ctx_ref = weakref.ref(ctx)  # proxy.upstream: mTLS with this context's identity
        _pools[ctx] = pool
    return pool


async def close_pool(ctx: ProxyContext) -> None:
    pool = _pools.pop(ctx, None)
    if pool is not None:
        await pool.close()


async def serve(downstream: Downstream, ctx: ProxyContext) -> None:
    """Proxy one h2c client connection until it closes; never raises for bad input."""
    conn = DownstreamConnection(downstream, ctx, pool_for(ctx))
    await conn.run()


class Exchange:
    """One client stream: one request, sent upstream as one (or, transparently, more) attempts."""

    __slots__ = (
        "attempts",
        "call",
        "closed",
        "down",
        "down_id",
        "grpc",
        "headers",
        "mirrors",
        "rec",
        "req",
        "request",
        "resp",
        "responded",
        "timer",
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
        ds = down.downstream
        self.rec, trace = down.telemetry.begin(
            ds.direction,
            "http",
            self.request,
            method=header_value(self.request, b":method") or b"",
            authority=header_value(self.request, b":authority") or b"",
            path=header_value(self.request, b":path") or b"",
            http_version="2",
            peer=ds.peer,
        )
        down.telemetry.note_peer(self.rec, ds.peer_identity, ds.upstream, ds.original_dst)
        if trace:
            self.request = replace_trace_headers(self.request, trace)
        self.headers = self.request  # of the current attempt
        self.call: Call | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.grpc = False
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
        # RequestMirror copies waiting for the end of the request body.
        self.mirrors: list[MirrorCopy] | None = None

    # -- one attempt -----------------------------------------------------------

    def start(self) -> None:
        """Ask the traffic engine about this request, then send the first attempt."""
        down = self.down
        if down.downstream.direction is Direction.INBOUND:
            # Who called, over mTLS (x-synchro-peer-workload, stripped).
            self.request = down.telemetry.take_peer_workload(
                self.rec, down.downstream.peer_identity, self.request
            )
            # Authorization and x-forwarded-client-cert (proxy.security.inbound).
            checked = inbound.http_request(
                down.ctx,
                down.downstream,
                header_value(self.request, b":method") or b"",
                header_value(self.request, b":path") or b"",
                self.request,
            )
            if not isinstance(checked, list):
                self._local_reply(inbound.denied_reply())
                return
            self.request = self.headers = checked
        engine = down.engine
        if engine is not None and engine.registry is not None:
            ds = down.downstream
            request = self.request
            self.grpc = is_grpc(request)
            decision = engine.request(
                ds.direction,
                ds.upstream,
                header_value(request, b":method") or b"GET",
                header_value(request, b":path") or b"/",
                request,
                now=down.loop.time(),
                grpc=self.grpc,
                peer=ds.peer,
            )
            if type(decision) is Reply:
                self._local_reply(decision)
                return
            if decision is not None:
                assert isinstance(decision, Call)
                call = self.call = decision
                self.rec.destination_service = call.service
                self.rec.route = call.route
                if call.touches_headers:
                    self.request = call.rewrite_headers(request)
                if call.mirrors:
                    self._start_mirrors(call)
                if call.delay:  # fault injection
                    self.timer = down.loop.call_later(call.delay, self._attempt)
                    return
        self._attempt()

    def _attempt(self) -> None:
        """Send one attempt: where the engine says (or the original destination)."""
        self.timer = None
        if self.closed:
            return
        self.attempts += 1
        self.waits = 0
        call = self.call
        if call is None:
            self.headers = self.request
            self._dispatch(self.down.choose_upstream(self.request))
            return
        loop = self.down.loop
        now = loop.time()
        target = call.next_address(now, self._slot_granted)
        if target is PENDING:
            left = call.deadline.remaining(now)
            if left is not None:
                self.timer = loop.call_later(max(left, 0.0), self._pending_timed_out)
            return
        if type(target) is Reply:
            self._local_reply(target)
            return
        assert isinstance(target, Address)
        extra = call.deadline_headers(now)
        self.headers = self.request + extra if extra else self.request
        timeout = call.try_timeout(now)
        if timeout is not None:
            self.timer = loop.call_later(timeout, self._try_timed_out)
        self._dispatch(target)

    def _slot_granted(self) -> None:
        """The breaker handed this pending request a connection slot: attempt now
        (from the loop, not from inside whoever released the slot)."""
        self._cancel_timer()
        self.timer = self.down.loop.call_later(0, self._attempt)

    def _pending_timed_out(self) -> None:
        self.timer = None
        call = self.call
        if self.closed or call is None:
            return
        call.cancel_wait()
        self._local_reply(call.deadline_reply())

    def _response_timed_out(self) -> None:
        """The route's request timeout covers the whole exchange (Gateway API): a
        response still streaming when it passes is reset on both sides, flag UT.
        (The per-try timeout, HTTPRoute `backendRequest`, ends at the response
        head, like Envoy's per_try_timeout.)"""
        self.timer = None
        if self.closed or self.call is None:
            return
        self.call.flag_set.add(Flag.UPSTREAM_TIMEOUT)
        log.debug("stream %d: request timeout passed mid-response", self.down_id)
        if self.grpc and self._end_grpc_with_deadline_exceeded():
            return
        self._reset_both(_CANCEL)

    def _end_grpc_with_deadline_exceeded(self) -> bool:
        """A gRPC client reads a call's outcome from its trailers and takes a bare
        RST_STREAM for CANCELLED: end the stream with DEADLINE_EXCEEDED trailers
        instead, so the answer is the same whether the client's own deadline timer
        or the proxy's wins the race. Data still queued behind flow control is
        dropped (a partial message is discarded by the client anyway)."""
        down, resp = self.down, self.resp
        if not down.alive or resp is None or resp.ended:
            return False
        resp.abandon()  # later upstream data is acknowledged and dropped
        trailers = [
            (b"grpc-status", str(GRPC_DEADLINE_EXCEEDED).encode()),
            (b"grpc-message", encode_grpc_message("request timeout passed mid-response")),
        ]
        try:
            down.h2.send_headers(self.down_id, trailers, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        self.rec.grpc_status = str(GRPC_DEADLINE_EXCEEDED)
        if self.up is not None:
            reset_stream(self.up, self.up_id, _CANCEL)
        if not self.req.ended:
            reset_stream(down, self.down_id, _NO_ERROR)
        down.mark()
        self._finish()
        return True

    def _try_timed_out(self) -> None:
        self.timer = None
        if self.closed or self.responded:
            return
        if self.up is not None:
            reset_stream(self.up, self.up_id, _CANCEL)
        self._attempt_failed(False, "upstream did not answer in time", failure=Failure.TIMEOUT)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _replay_size(self) -> int | None:
        log = self.req.sent_log
        if log is None:
            return None
        return sum(map(len, log)) + sum(len(chunk[0]) for chunk in self.req.pending)

    def _retry_later(self, pause: float) -> None:
        self.req = self.req.replay()
        self.req.on_done = self._pipe_done
        self.up = None
        if pause > 0:
            self.timer = self.down.loop.call_later(pause, self._attempt)
        else:
            self._attempt()

    def _local_reply(self, reply: Reply) -> None:
        self.rec.flags = reply.flags
        grpc_status = reply.grpc_status if reply.grpc_status is not None else GRPC_UNAVAILABLE
        self._respond_error(reply.status, grpc_status, reply.message, extra=reply.headers)
        self._finish()

    def _dispatch(self, target: Address) -> None:
        conn = self.down.pool.ready(target)
        if conn is not None:
            self._send(conn)
            return
        b = self.call.backend if self.call is not None else None
        if b is None:
            fut = self.down.pool.connect(target)
        else:  # the service's TrafficPolicy timeouts
            fut = self.down.pool.connect(target, b.connect_timeout, b.idle_timeout)
        fut.add_done_callback(self._connected)

    def _connected(self, fut: asyncio.Future[UpstreamConnection]) -> None:
        if self.closed:
            return
        if fut.cancelled():
            self._attempt_failed(False, "connect cancelled", retry=False)
        elif (exc := fut.exception()) is not None:
            self._attempt_failed(
                False,
                str(exc),
                retry=False,
                failure=Failure.CONNECT_FAILURE,
                connect_timeout=isinstance(exc, H2ConnectTimeout),
            )
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
            headers = self.down.telemetry.tag_http2(self.headers, conn.transport)
            up_id = conn.open_stream(self, headers, end)
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

    def _attempt_failed(
        self,
        unprocessed: bool,
        reason: str,
        *,
        retry: bool = True,
        failure: Failure | None = None,
        connect_timeout: bool = False,
    ) -> None:
        if self.closed:
            return
        self._cancel_timer()
        if self.up is not None:
            self.up.stream_done(self.up_id)
        if self.resp is not None:
            self.resp.abandon()
            self.resp = None
        call = self.call
        if call is not None and not self.responded:
            self._engine_failed(call, unprocessed, reason, retry, failure, connect_timeout)
            return
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
            status = 503 if connect_timeout else 502
            self._respond_error(status, GRPC_UNAVAILABLE, f"upstream unavailable: {reason}")
        self._finish()

    def _engine_failed(
        self,
        call: Call,
        unprocessed: bool,
        reason: str,
        retry: bool,
        failure: Failure | None,
        connect_timeout: bool = False,
    ) -> None:
        """An attempt failed before a response: the engine decides what comes next."""
        failure = failure or (Failure.REFUSED_STREAM if unprocessed else Failure.RESET)
        call.body_size = self._replay_size()
        now = self.down.loop.time()
        pause = call.result(now, failure=failure)
        if (
            pause is not None
            and (retry or failure is not Failure.RESET)
            and self.req.sent_log is not None
        ):
            log.debug("stream %d: retrying after %s", self.down_id, reason)
            self._retry_later(pause)
            return
        if call.expired(now):
            call.flag_set.add(Flag.DEADLINE_EXCEEDED)
            self._respond_error(504, GRPC_DEADLINE_EXCEEDED, "request deadline exceeded")
        elif failure is Failure.TIMEOUT:
            self._respond_error(504, GRPC_DEADLINE_EXCEEDED, f"upstream timeout: {reason}")
        elif connect_timeout:  # Envoy's answer to a connect timeout (flag UF)
            self._respond_error(503, GRPC_UNAVAILABLE, f"upstream connect timeout: {reason}")
        else:
            self._respond_error(502, GRPC_UNAVAILABLE, f"upstream unavailable: {reason}")
        self._finish()

    def _respond_error(
        self, status: int, grpc_status: int, message: str, *, extra: list[Header] | None = None
    ) -> None:
        self.responded = True
        self.rec.status = status
        down = self.down
        if not down.alive:
            return
        block = error_response(self.request, status, grpc_status, message)
        if block[0][1] == b"200":
            self.rec.grpc_status = str(grpc_status)
        elif extra:
            block += extra
        try:
            down.h2.send_headers(self.down_id, block, end_stream=True)
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
        call = self.call
        if call is not None:
            if self._retry_response(call, forward, ended):
                return
            if call.response_ops is not None:
                forward = call.response_headers(forward)
        self.rec.status = int(forward[0][1])
        self.responded = True
        self.req.sent_log = None
        if not ended and call is not None and call.deadline.at is not None:
            self.timer = self.down.loop.call_at(call.deadline.at, self._response_timed_out)
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

    def _retry_response(self, call: Call, forward: list[Header], ended: bool) -> bool:
        """Judge a response head; True when it is dropped for another attempt."""
        self._cancel_timer()
        grpc_status = None
        if ended:  # trailers-only: a gRPC status without a body
            value = header_value(forward, b"grpc-status")
            if value is not None and value.isdigit():
                grpc_status = int(value)
                self.rec.grpc_status = value.decode()
        call.body_size = self._replay_size()
        pause = call.result(
            self.down.loop.time(), status=int(forward[0][1]), grpc_status=grpc_status
        )
        if pause is None or self.req.sent_log is None:
            return False
        if self.up is not None:
            if not ended:
                reset_stream(self.up, self.up_id, _CANCEL)
            self.up.stream_done(self.up_id)
        if self.resp is not None:
            self.resp.abandon()
            self.resp = None
        self._retry_later(pause)
        return True

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
        self.rec.response_bytes += len(data)
        resp.feed(data, flow_len, ended)

    def up_trailers(self, headers: list[Header]) -> None:
        resp = self.resp
        assert resp is not None
        value = header_value(headers, b"grpc-status")
        if value is not None:
            self.rec.grpc_status = value.decode("latin-1")
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
            trailers = trailer_headers(headers)
            self.req.finish(trailers)
        except MalformedHeaders as exc:
            log.info("client %s sent malformed trailers: %s", self.down.downstream.peer, exc)
            self._reset_both(_PROTOCOL)
            return
        if self.mirrors is not None:
            self._fire_mirrors(trailers)

    def down_ended(self) -> None:
        if not self.req.ended:
            self.req.finish(None)
        if self.mirrors is not None:
            self._fire_mirrors(None)

    def down_data(self, data: bytes) -> None:
        """Request body for the mirrors (the request's own pipe has it already)."""
        mirrors = self.mirrors
        assert mirrors is not None
        for m in list(mirrors):
            if not m.buffer(data):
                mirrors.remove(m)
        if not mirrors:
            self.mirrors = None

    def down_reset(self, error_code: int) -> None:
        """The client reset its stream (a cancelled gRPC call): reset ours upstream too."""
        self._drop_mirrors()
        self._cancel_upstream(error_code)

    # -- mirrors (RequestMirror) -------------------------------------------------

    def _start_mirrors(self, call: Call) -> None:
        down = self.down
        engine = down.engine
        assert engine is not None
        headers = self.request + call.deadline_headers(down.loop.time())
        copies = []
        for address in call.mirrors:
            if not engine.mirror_slot():
                log.debug("http2: mirror to %s skipped: too many in flight", address)
                continue
            copies.append(MirrorCopy(down, engine, address, headers))
        if not copies:
            return
        if self.req.ended:  # no body: send the copies now
            for m in copies:
                m.fire(None)
        else:
            self.mirrors = copies

    def _fire_mirrors(self, trailers: list[Header] | None) -> None:
        mirrors, self.mirrors = self.mirrors, None
        for m in mirrors or ():
            m.fire(trailers)

    def _drop_mirrors(self) -> None:
        mirrors, self.mirrors = self.mirrors, None
        for m in mirrors or ():
            m.drop()

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
        self._cancel_timer()
        rec = self.rec
        call = self.call
        if call is not None:
            call.finish(self.down.loop.time())
            rec.flags = call.flags
            rec.attempts = call.attempts
            rec.upstream_host = call.upstream
        self.down.telemetry.end(rec)
        if self.mirrors is not None and not self.req.ended:
            self._drop_mirrors()  # the request never ended: no whole copy to send
        self.req.abandon()
        if self.resp is not None:
            self.resp.abandon()
        if self.up is not None:
            self.up.stream_done(self.up_id)
        self.down.exchange_done(self.down_id)


class MirrorCopy:
    """One fire-and-forget copy of a request (RequestMirror) on its own upstream
    stream. The body is buffered up to MIRROR_BODY_LIMIT (a larger one drops the
    copy) and sent once the client's request ended; the answer is read and
    dropped at once (its flow-control window given straight back), and the copy
    is reset after MIRROR_TIMEOUT. Nothing here touches the primary request: a
    slow or dead mirror costs the client nothing.
    """

    __slots__ = (
        "address",
        "body",
        "conn",
        "down",
        "engine",
        "finished",
        "headers",
        "pipe",
        "size",
        "stream_id",
        "timer",
    )

    def __init__(
        self,
        down: DownstreamConnection,
        engine: engine_mod.Engine,
        address: Address,
        headers: list[Header],
    ) -> None:
        self.down = down
        self.engine = engine  # holds the copy's in-flight slot (mirror_slot)
        self.address = address
        self.headers = headers
        self.body: list[bytes] = []
        self.size = 0
        self.conn: UpstreamConnection | None = None
        self.stream_id = 0
        self.pipe: Pipe | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False

    def buffer(self, data: bytes) -> bool:
        """Keep request body for the copy; False (and the copy dropped) past the limit."""
        self.size += len(data)
        if self.size > MIRROR_BODY_LIMIT:
            log.debug("http2: mirror to %s dropped: body over %d bytes", self.address, self.size)
            self.drop()
            return False
        if data:
            self.body.append(data)
        return True

    def fire(self, trailers: list[Header] | None) -> None:
        if self.finished:
            return
        pool = self.down.pool
        self.timer = pool.loop.call_later(MIRROR_TIMEOUT, self._timed_out)
        try:
            conn = pool.ready(self.address)
            if conn is not None:
                self._send(conn, trailers)
            else:
                pool.connect(self.address).add_done_callback(
                    lambda fut: self._connected(fut, trailers)
                )
        except Exception:
            # Whatever goes wrong with a copy must not touch the client's connection.
            log.exception("http2: mirror to %s failed", self.address)
            self.drop()

    def _connected(
        self, fut: asyncio.Future[UpstreamConnection], trailers: list[Header] | None
    ) -> None:
        if self.finished:
            return
        if fut.cancelled() or fut.exception() is not None:
            log.debug("http2: mirror to %s: cannot connect", self.address)
            self.drop()
        elif fut.result().has_capacity:
            self._send(fut.result(), trailers)
        else:
            self.drop()  # a copy never waits for a stream

    def _send(self, conn: UpstreamConnection, trailers: list[Header] | None) -> None:
        end = not self.body and trailers is None
        try:
            self.stream_id = conn.open_stream(self, self.headers, end)
        except H2UpstreamError as exc:
            log.debug("http2: mirror to %s: %s", self.address, exc)
            self.drop()
            return
        self.conn = conn
        if not end:
            # Nothing to acknowledge to the client: its window came back through
            # the request's own pipe. Hence flow-controlled lengths of 0.
            pipe = self.pipe = Pipe(self.down, 0)
            pipe.pending.extend([data, 0] for data in self.body)
            pipe.ended = True
            pipe.trailers = trailers
            pipe.attach(conn, self.stream_id)
        self.body = []

    def _timed_out(self) -> None:
        self.timer = None
        log.debug("http2: mirror to %s did not finish in %ss", self.address, MIRROR_TIMEOUT)
        self.drop()

    def drop(self) -> None:
        """Done with the copy (answered, failed, timed out, or not sendable)."""
        if self.finished:
            return
        self.finished = True
        self.body = []
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pipe is not None:
            self.pipe.abandon()
        conn = self.conn
        if conn is not None and self.stream_id in conn.streams:
            reset_stream(conn, self.stream_id, _CANCEL)
            conn.stream_done(self.stream_id)
        self.engine.mirror_done()

    # -- proxy.h2pool.UpstreamStream: the mirror's answer, ignored -----------------

    def up_response(self, headers: list[Header], ended: bool) -> None:
        if ended:
            self._ended()

    def up_informational(self, headers: list[Header]) -> None:
        pass

    def up_data(self, data: bytes, flow_len: int, ended: bool) -> None:
        if self.conn is not None:
            self.conn.ack(self.stream_id, flow_len)

    def up_trailers(self, headers: list[Header]) -> None:
        pass  # the stream's end follows

    def up_ended(self) -> None:
        self._ended()

    def up_reset(self, error_code: int) -> None:
        self.conn = None  # the pool dropped the stream already
        self.drop()

    def up_failed(self, unprocessed: bool, reason: str) -> None:
        self.conn = None
        self.drop()

    def _ended(self) -> None:
        conn = self.conn
        if conn is not None and (self.pipe is None or self.pipe.done):
            # Complete both ways: nothing to reset.
            conn.stream_done(self.stream_id)
            self.conn = None
        self.drop()


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
        self.engine = engine_mod.engine_for(ctx)
        self.telemetry = ctx.telemetry
        # Highest stream id accepted once we sent GOAWAY (drain or idle).
        self.goaway_last: int | None = None
        self.client_goaway = False
        self.last_active = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        # Without streams: the called service's TrafficPolicy idle timeout, if any.
        self.idle_timeout = ctx.idle_timeout
        if self.engine is not None:
            service_idle = self.engine.downstream_idle_timeout(
                downstream.direction, downstream.upstream
            )
            if service_idle is not None:
                self.idle_timeout = service_idle

    def choose_upstream(self, request: list[Header]) -> Address:
        """Where this request goes; per-request routing and balancing replace this."""
        return self.downstream.upstream

    def write(self, data: bytes) -> None:
        self.stats.bytes_to_downstream += len(data)
        self.transport.write(data)

    async def run(self) -> None:
        drain_watch = self.loop.create_task(self._watch_drain())
        self._idle_timer = self.loop.call_later(self.idle_timeout, self._idle_tick)
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
                    if ex.mirrors is not None:
                        ex.down_data(ev.data)
                    ex.rec.request_bytes += len(ev.data)
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
        if not self.exchanges and idle_for >= self.idle_timeout:
            log.debug("closing idle HTTP/2 connection from %s", self.downstream.peer)
            self.send_goaway()
            return
        # Streams in flight keep the connection; look again a full period later.
        wait = self.idle_timeout if self.exchanges else max(self.idle_timeout - idle_for, 0.05)
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
