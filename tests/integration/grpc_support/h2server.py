"""A tiny HTTP/2 (h2c) upstream and a blocking h2 client, both on h2, for precise tests.

Paths the server knows:
- `/hello`: 200 "hello"; the request's x-request-id comes back as `x-seen-request-id`.
- `/echo`: answers with the request body once it ended, plus trailer `x-trailer: done`.
- `/reset/<code>`: resets the stream with that error code.
- `/refuse-once`: the first time, GOAWAY with last-stream-id 0 (nothing processed)
  and close; afterwards 200 "second try".
- `/big/<n>`: n bytes of body, sent as the client's window allows (`sent_bytes` counts).
- `/slow/<ms>`: headers now, body "slow" after <ms> milliseconds.
- `/early/<n>`: answers n bytes (n < 16 KiB) at once, before the request body
  ended, then RST_STREAM(NO_ERROR): "no more of the request, thanks".
- `/vanish`: drops the connection before answering; `/drop`: after a partial answer.
- `/bad-response`: a malformed response (an uppercase header name).
- `/hold`: headers now, then nothing until reset (resets are recorded in `resets`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Self, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: TinyH2Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding="utf-8",
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.transport: Any = None
        self.bodies: dict[int, bytearray] = {}
        self.paths: dict[int, str] = {}
        self.waiting: dict[int, asyncio.Future[None]] = {}
        self.tasks: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.connections += 1
        if self.server.max_streams is not None:
            self.h2.local_settings = h2.settings.Settings(
                client=False,
                initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams
                },
            )
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.transport.close()
            return
        for ev in events:
            if self.transport.is_closing():
                break
            if isinstance(ev, h2.events.RequestReceived):
                # header_encoding="utf-8": h2 hands out str, whatever its annotations say
                headers = cast(dict[str, str], dict(ev.headers))
                self.paths[ev.stream_id] = headers[":path"]
                self.bodies[ev.stream_id] = bytearray()
                self.server.requests.append(headers)
                self.on_headers(ev.stream_id, headers)
            elif isinstance(ev, h2.events.DataReceived):
                self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.on_end(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.server.resets.append((self.paths.get(ev.stream_id, ""), int(ev.error_code)))
                fut = self.waiting.pop(ev.stream_id, None)
                if fut is not None and not fut.done():
                    fut.cancel()
            elif isinstance(ev, h2.events.WindowUpdated):
                for fut in list(self.waiting.values()):
                    if not fut.done():
                        fut.set_result(None)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self.waiting.values():
            if not fut.done():
                fut.cancel()

    def on_headers(self, sid: int, headers: dict[str, str]) -> None:
        path = headers[":path"]
        if path.startswith("/reset/"):
            self.h2.reset_stream(sid, int(path.rsplit("/", 1)[1]))
        elif path == "/refuse-once" and not self.server.refused:
            self.server.refused = True
            self.h2.close_connection(last_stream_id=0)
            self.flush()
            self.transport.close()
        elif path.startswith("/big/"):
            self.h2.send_headers(sid, [(":status", "200")])
            self.spawn(self.send_big(sid, int(path.rsplit("/", 1)[1])))
        elif path.startswith("/slow/"):
            self.h2.send_headers(sid, [(":status", "200")])
            delay = int(path.rsplit("/", 1)[1]) / 1000
            asyncio.get_running_loop().call_later(delay, self.finish_slow, sid)
        elif path.startswith("/early/"):
            size = int(path.rsplit("/", 1)[1])
            self.h2.send_headers(sid, [(":status", "200")])
            self.h2.send_data(sid, b"e" * size, end_stream=True)
            self.h2.reset_stream(sid, 0)
        elif path == "/vanish":
            self.transport.abort()
        elif path == "/drop":
            self.h2.send_headers(sid, [(":status", "200")])
            self.h2.send_data(sid, b"partial")
            self.flush()
            self.transport.abort()
        elif path == "/bad-response":
            self.h2.send_headers(sid, [(":status", "200"), ("Bad-Upper", "x")], end_stream=True)
        elif path == "/hold":
            self.h2.send_headers(sid, [(":status", "200")])
            self.waiting[sid] = asyncio.get_running_loop().create_future()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def finish_slow(self, sid: int) -> None:
        try:
            self.h2.send_data(sid, b"slow", end_stream=True)
        except h2.exceptions.ProtocolError:
            return
        self.flush()

    def on_end(self, sid: int) -> None:
        path = self.paths.get(sid, "")
        if path == "/echo":
            self.h2.send_headers(sid, [(":status", "200")])
            self.send_all(sid, bytes(self.bodies.pop(sid)), trailers=[("x-trailer", "done")])
        elif path == "/hello" or path == "/refuse-once":
            body = b"hello" if path == "/hello" else b"second try"
            rid = self.server.requests[-1].get("x-request-id", "") if self.server.requests else ""
            self.h2.send_headers(
                sid,
                [
                    (":status", "200"),
                    ("content-length", str(len(body))),
                    ("x-seen-request-id", rid),
                ],
            )
            self.h2.send_data(sid, body, end_stream=True)

    def send_all(self, sid: int, body: bytes, trailers: list[tuple[str, str]]) -> None:
        async def run() -> None:
            view = memoryview(body)
            while view:
                window = min(
                    self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size
                )
                if window <= 0:
                    await self.wait_window(sid)
                    continue
                self.h2.send_data(sid, bytes(view[:window]))
                view = view[window:]
                self.flush()
            self.h2.send_headers(sid, trailers, end_stream=True)
            self.flush()

        self.spawn(run())

    async def wait_window(self, sid: int) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[sid] = fut
        await fut

    async def send_big(self, sid: int, size: int) -> None:
        chunk = b"x" * 16384
        try:
            while size > 0:
                window = min(self.h2.local_flow_control_window(sid), len(chunk), size)
                if window <= 0:
                    await self.wait_window(sid)
                    continue
                self.h2.send_data(sid, chunk[:window], end_stream=(window == size))
                size -= window
                self.server.sent_bytes += window
                self.flush()
        except (asyncio.CancelledError, h2.exceptions.ProtocolError):
            return


class LoopServer:
    """A TCP server on 127.0.0.1:<port> whose asyncio loop runs on a thread of
    its own; subclasses say which protocol serves a connection."""

    def __init__(self) -> None:
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def protocol(self) -> asyncio.Protocol:
        raise NotImplementedError

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> asyncio.Server:
            server = await self.loop.create_server(self.protocol, "127.0.0.1", 0)
            self.port = int(server.sockets[0].getsockname()[1])
            return server

        server = self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class TinyH2Server(LoopServer):
    """`with TinyH2Server() as s:` an h2c server on 127.0.0.1:<s.port>, on its own thread."""

    def __init__(self, max_streams: int | None = None) -> None:
        super().__init__()
        self.max_streams = max_streams
        self.connections = 0
        self.requests: list[dict[str, str]] = []
        self.resets: list[tuple[str, int]] = []
        self.refused = False
        self.sent_bytes = 0

    def protocol(self) -> asyncio.Protocol:
        return _ServerConnection(self)


@dataclass
class StreamResult:
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int:
        return int(dict(self.headers).get(":status", "0"))

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class _GoawayTolerantConnection(h2.connection.H2Connection):
    """h2 refuses all frames after a GOAWAY; a real client still finishes its open streams."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        return [], [event]


class H2Client:
    """A blocking h2c client over one socket, for tests that need frame-level control."""

    def __init__(
        self, port: int, *, auto_ack: bool = True, window: int | None = None, validate: bool = True
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = _GoawayTolerantConnection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="utf-8",
                validate_outbound_headers=validate,
                normalize_outbound_headers=validate,
            )
        )
        self.auto_ack = auto_ack
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.streams: dict[int, StreamResult] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: list[tuple[str, str]] | None = None,
        end: bool = True,
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "http"), (":authority", "test"), (":path", path)]
        hdrs += headers or []
        self.h2.send_headers(sid, hdrs, end_stream=end and body is None)
        self.streams[sid] = StreamResult()
        self.flush()
        if body is not None:
            self.send_body(sid, body, end=end)
        return sid

    def send_body(self, sid: int, body: bytes, *, end: bool = True) -> None:
        view = memoryview(body)
        while True:
            size = min(
                self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(view)
            )
            if size <= 0 and view:
                self.pump(
                    lambda: self.h2.local_flow_control_window(sid) > 0 or self.streams[sid].done
                )
                if self.streams[sid].done:
                    return
                continue
            last = size == len(view)
            self.h2.send_data(sid, bytes(view[:size]), end_stream=end and last)
            view = view[size:]
            self.flush()
            if last:
                return

    def reset(self, sid: int, code: int = 8) -> None:
        self.h2.reset_stream(sid, code)
        self.flush()

    def pump(self, until: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if self.closed:
                raise ConnectionError("connection closed before the condition held")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("condition not reached")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                self.closed = True
                continue
            for ev in self.h2.receive_data(data):
                self._event(ev)
            self.flush()

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            self.streams[ev.stream_id].headers = cast(list[tuple[str, str]], list(ev.headers))
        elif isinstance(ev, h2.events.DataReceived):
            self.streams[ev.stream_id].body.extend(ev.data)
            if self.auto_ack:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.streams[ev.stream_id].trailers = cast(list[tuple[str, str]], list(ev.headers))
        elif isinstance(ev, h2.events.StreamEnded):
            self.streams[ev.stream_id].ended = True
        elif isinstance(ev, h2.events.StreamReset):
            self.streams[ev.stream_id].reset = int(ev.error_code)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev

    def get(self, path: str, timeout: float = 10, **kwargs: Any) -> StreamResult:
        sid = self.request(path, **kwargs)
        self.pump(lambda: self.streams[sid].done, timeout)
        return self.streams[sid]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
