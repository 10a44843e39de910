"""Machinery shared by both sides of the HTTP/2 proxy: connections, batched writes, pipes.

A proxied stream moves bytes from one h2 connection (the source) to another
(the destination) through a `Pipe`. Flow control is end to end: received DATA
is acknowledged to the source only once the destination's h2 connection has
accepted it within the destination's window, so a slow reader on one side slows
the writer on the other instead of filling the proxy's memory.

Writes are batched: anything that changes an h2 connection marks its
`Endpoint` dirty, and one callback per event-loop turn writes each dirty
connection's pending bytes in a single transport write.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from h2.settings import SettingCodes
from hyperframe.frame import RstStreamFrame

from proxy.h2tuning import CachingDecoder, PlainConfig, StatelessEncoder

Header = tuple[bytes, bytes]

# Receive windows: a stream may have STREAM_WINDOW bytes and a connection
# CONNECTION_WINDOW bytes in flight through the proxy, which bounds its buffers.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 4 << 20
MAX_FRAME_SIZE = 1 << 14
MAX_CONCURRENT_STREAMS = 1000
# At most this many new streams between two walks of h2's stream table.
_SCAN_EVERY = 16


def _uses(function: Any, *names: str) -> bool:
    """Whether h2's `function` still works with these internals (the overrides
    below copy it, tested with h2 4.4); if not, h2's own is kept."""
    return set(names) <= set(function.__code__.co_names)


_H2 = h2.connection.H2Connection
_OWN_RECEIVE_FRAME = _uses(
    _H2._receive_frame,
    "_frame_dispatch_table",
    "_stream_is_closed_by_reset",
    "_stream_is_closed_by_end",
    "_prepare_for_sending",
)
_OWN_PREPARE_FOR_SENDING = _uses(_H2._prepare_for_sending, "_data_to_send")


class GracefulH2Connection(h2.connection.H2Connection):
    """An H2Connection that keeps working after a GOAWAY is received.

    h2 treats a received GOAWAY as the end of the connection: it drops pending
    output and refuses every later frame. RFC 9113 section 6.8 says streams up to
    the GOAWAY's last-stream-id still complete, which is what a draining upstream
    or client expects, so only the event is kept; the owner stops opening streams.
    """

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = h2.errors.ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    # How many closed streams h2 remembers (and how: reset or ended), to answer
    # a frame that arrives late for one of them correctly. h2's default, 2**16,
    # grows a long-lived connection by ~5 MB (an upstream connection carries
    # every request to its address); late frames come within a round trip, when
    # at most about MAX_CONCURRENT_STREAMS plus the streams of one RTT closed.
    MAX_CLOSED_STREAMS = 4 * MAX_CONCURRENT_STREAMS

    # h2 counts open streams, to enforce MAX_CONCURRENT_STREAMS, by walking all
    # of its streams (and dropping the closed ones) for every new stream: with
    # dozens of streams multiplexed on one upstream connection that walk is a
    # large share of a request. len(self.streams) bounds the count from above,
    # so the walk is only needed when that bound reaches the limit checked, and
    # every few new streams to drop closed ones.
    _scan_at = 0

    def _open_streams(self, remainder: int) -> int:
        n = len(self.streams)
        if n < self._scan_at:
            settings = (
                self.remote_settings
                if remainder == int(self.config.client_side)  # outbound: the peer's limit
                else self.local_settings
            )
            if n < settings.max_concurrent_streams:
                return n
        count = super()._open_streams(remainder)
        self._scan_at = len(self.streams) + _SCAN_EVERY
        return count

    if _OWN_PREPARE_FOR_SENDING:

        def _prepare_for_sending(self, frames: list[Any]) -> None:
            """h2's, without a generator per call and without its debug assertion
            that no frame exceeds the peer's frame size (h2 splits HEADERS and our
            pipes split DATA at `max_outbound_frame_size` before this)."""
            for frame in frames:
                self._data_to_send += frame.serialize()

    if _OWN_RECEIVE_FRAME:

        def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
            """h2's own, less its `trace("Received frame: %s", repr(frame))`: the
            repr is built eagerly for a logger that drops it, several microseconds
            per frame."""
            try:
                frames, events = self._frame_dispatch_table[frame.__class__](frame)
            except h2.exceptions.StreamClosedError as e:
                # Closed by our RST_STREAM: a stream error, answered with RST_STREAM;
                # otherwise a connection error.
                if not self._stream_is_closed_by_reset(e.stream_id):
                    raise
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                return e._events  # type: ignore[no-any-return]
            except h2.exceptions.StreamIDTooLowError as e:
                # A frame for a stream already cleaned up, or implicitly closed by a
                # higher stream id: a stream error after our RST_STREAM, a
                # connection error otherwise.
                if self._stream_is_closed_by_reset(e.stream_id):
                    f = RstStreamFrame(e.stream_id)
                    f.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                    self._prepare_for_sending([f])
                    return []
                if self._stream_is_closed_by_end(e.stream_id):
                    raise h2.exceptions.StreamClosedError(e.stream_id) from e
                raise
            self._prepare_for_sending(frames)
            return events  # type: ignore[no-any-return]


def new_connection(*, client_side: bool, max_header_list_size: int) -> GracefulH2Connection:
    config = PlainConfig(
        client_side=client_side,
        header_encoding=None,
        # Inbound blocks are validated once, in one pass, by proxy.h2headers as
        # it builds the block to forward (h2's own checks cost several times
        # more): field names and values (RFC 9113 8.2.1), pseudo-headers (8.3),
        # connection-specific fields (8.2.2), TE. h2 itself still enforces what
        # protects the framing whatever these flags say: content-length against
        # the DATA received (8.1.1), HPACK limits (MAX_HEADER_LIST_SIZE), stream
        # states and flow control. Outbound blocks are the validated inbound
        # ones or the proxy's own, so h2 need not check them again.
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )
    conn = GracefulH2Connection(config=config)
    conn.encoder = StatelessEncoder()
    conn.decoder = CachingDecoder()
    settings = {
        SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
    }
    if client_side:
        settings[SettingCodes.ENABLE_PUSH] = 0
    conn.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
    conn.max_inbound_frame_size = MAX_FRAME_SIZE
    conn.decoder.max_header_list_size = max_header_list_size
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    return conn


class WriteBatcher:
    """Collects dirty endpoints and flushes each once per event-loop turn."""

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Endpoint] = []
        self._scheduled = False

    def mark(self, endpoint: Endpoint) -> None:
        if not endpoint.dirty:
            endpoint.dirty = True
            self._dirty.append(endpoint)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for endpoint in dirty:
            endpoint.dirty = False
            endpoint.flush_now()


class Endpoint:
    """One h2 connection and its transport, as seen by the pipes that use it."""

    def __init__(self, h2conn: GracefulH2Connection, batcher: WriteBatcher) -> None:
        self.h2 = h2conn
        self.batcher = batcher
        self.dirty = False
        self.alive = True
        # Pipes waiting for send window on this connection, by our stream id.
        self.blocked: dict[int, Pipe] = {}

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def mark(self) -> None:
        self.batcher.mark(self)

    def flush_now(self) -> None:
        data = self.h2.data_to_send()
        if data and self.alive:
            self.write(data)

    def window_updated(self, stream_id: int) -> None:
        """A WINDOW_UPDATE (or a SETTINGS change) may let blocked pipes send again."""
        if stream_id:
            pipe = self.blocked.pop(stream_id, None)
            if pipe is not None:
                pipe.flush()
        elif self.blocked:
            pipes = list(self.blocked.values())
            self.blocked.clear()
            for pipe in pipes:
                pipe.flush()

    def ack(self, stream_id: int, size: int) -> None:
        """Return `size` flow-controlled bytes of `stream_id` to the peer's windows."""
        if self.alive and size:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except h2.exceptions.ProtocolError:
                return
            self.mark()


class Pipe:
    """One direction of one proxied stream: DATA, end of stream, trailers.

    `dst` is None until the destination stream exists (the upstream connection
    may still be opening); received data waits, unacknowledged, until then.
    """

    __slots__ = (
        "done",
        "dst",
        "dst_id",
        "ended",
        "on_done",
        "pending",
        "sent_log",
        "sent_log_limit",
        "src",
        "src_id",
        "trailers",
    )

    def __init__(self, src: Endpoint, src_id: int) -> None:
        self.src = src
        self.src_id = src_id
        self.dst: Endpoint | None = None
        self.dst_id = 0
        # [data, flow-controlled bytes still to acknowledge to src]
        self.pending: deque[list[Any]] = deque()
        self.ended = False
        self.trailers: list[Header] | None = None
        self.done = False
        # When a list, bytes sent so far (to replay the stream on another connection).
        self.sent_log: list[bytes] | None = None
        self.sent_log_limit = 0
        # Called once the end of the stream has been handed to the destination.
        self.on_done: Callable[[], None] | None = None

    def attach(self, dst: Endpoint, dst_id: int) -> None:
        self.dst = dst
        self.dst_id = dst_id
        if self.pending or self.ended:
            self.flush()

    def feed(self, data: bytes, flow_len: int, end: bool) -> None:
        if self.done:
            self.src.ack(self.src_id, flow_len)
            return
        if data:
            self.pending.append([data, flow_len])
        elif flow_len:
            self.src.ack(self.src_id, flow_len)
        if end:
            self.ended = True
        if self.dst is not None and (data or end):
            self.flush()

    def finish(self, trailers: list[Header] | None) -> None:
        self.ended = True
        self.trailers = trailers
        if self.dst is not None:
            self.flush()

    def flush(self) -> None:
        dst = self.dst
        if dst is None or self.done or not dst.alive:
            return
        conn = dst.h2
        sid = self.dst_id
        pending = self.pending
        acked = 0
        completed = False
        try:
            while pending:
                chunk = pending[0]
                data = chunk[0]
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    dst.blocked[sid] = self
                    break
                size = min(window, conn.max_outbound_frame_size)
                if len(data) <= size:
                    pending.popleft()
                    last = not pending and self.ended and self.trailers is None
                    conn.send_data(sid, data, end_stream=last)
                    acked += chunk[1]
                    if last:
                        self.done = completed = True
                else:
                    data = data[:size]
                    conn.send_data(sid, data)
                    chunk[0] = chunk[0][size:]
                    # A replayed or mirrored chunk owes the source nothing (0).
                    owed = min(size, chunk[1])
                    chunk[1] -= owed
                    acked += owed
                if self.sent_log is not None:
                    self._log(data)
            if not pending and self.ended and not self.done:
                self.done = completed = True
                if self.trailers is not None:
                    conn.send_headers(sid, self.trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # The destination stream went away under us; its reset event follows.
            completed = False
            self.abandon()
        dst.mark()
        if acked:
            self.src.ack(self.src_id, acked)
        if completed and self.on_done is not None:
            self.on_done()

    def _log(self, data: bytes) -> None:
        log = self.sent_log
        assert log is not None
        log.append(data)
        self.sent_log_limit -= len(data)
        if self.sent_log_limit < 0:
            self.sent_log = None

    def abandon(self) -> None:
        """Stop forwarding; give back the window of everything still buffered."""
        self.done = True
        owed = sum(chunk[1] for chunk in self.pending)
        self.pending.clear()
        if self.dst is not None and self.dst.blocked.get(self.dst_id) is self:
            del self.dst.blocked[self.dst_id]
        self.src.ack(self.src_id, owed)

    def replay(self) -> Pipe:
        """A fresh pipe that resends what this one sent, then what it still holds.

        Only meaningful while `sent_log` is a list (the body so far is small enough).
        """
        assert self.sent_log is not None
        fresh = Pipe(self.src, self.src_id)
        fresh.pending.extend([data, 0] for data in self.sent_log)
        fresh.pending.extend(self.pending)
        fresh.ended = self.ended
        fresh.trailers = self.trailers
        fresh.sent_log = []
        fresh.sent_log_limit = self.sent_log_limit + sum(len(d) for d in self.sent_log)
        self.pending = deque()
        if self.dst is not None and self.dst.blocked.get(self.dst_id) is self:
            del self.dst.blocked[self.dst_id]
        self.done = True
        return fresh


def reset_stream(endpoint: Endpoint, stream_id: int, error_code: int) -> None:
    if not endpoint.alive:
        return
    try:
        endpoint.h2.reset_stream(stream_id, error_code)
    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
        return
    endpoint.mark()
