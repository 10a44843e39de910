"""A recording h2c upstream for the traffic tests: every request that completed
(path, body) is kept, connections are counted as they open and close.

Modes: `ok` answers 200 "ok" once the request ended; `fail` answers 500;
`hold` never answers (a slow mirror); `/slow-body/<ms>` answers headers and a
first piece of body at once and the rest after <ms> milliseconds, whatever the
mode.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from tests.integration.grpc_support.h2server import LoopServer


class _Conn(asyncio.Protocol):
    def __init__(self, server: RecordingH2Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.transport: Any = None
        self.paths: dict[int, str] = {}
        self.bodies: dict[int, bytearray] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        with self.server.lock:
            self.server.connections += 1
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        with self.server.lock:
            self.server.closed += 1

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                headers = cast(dict[str, str], dict(ev.headers))
                self.paths[ev.stream_id] = headers[":path"]
                self.bodies[ev.stream_id] = bytearray()
                if headers[":path"].startswith("/slow-body/"):
                    self._slow_body(ev.stream_id, int(headers[":path"].rsplit("/", 1)[1]))
            elif isinstance(ev, h2.events.DataReceived):
                self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self._ended(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                with self.server.lock:
                    self.server.resets += 1
        self.flush()

    def _ended(self, sid: int) -> None:
        path = self.paths.get(sid, "")
        with self.server.lock:
            self.server.completed.append((path, bytes(self.bodies.pop(sid, b""))))
        if path.startswith("/slow-body/") or self.server.mode == "hold":
            return
        status = "500" if self.server.mode == "fail" else "200"
        try:
            self.h2.send_headers(sid, [(":status", status), ("content-length", "2")])
            self.h2.send_data(sid, b"ok", end_stream=True)
        except h2.exceptions.ProtocolError:
            pass

    def _slow_body(self, sid: int, ms: int) -> None:
        self.h2.send_headers(sid, [(":status", "200")])
        self.h2.send_data(sid, b"first piece;")

        def rest() -> None:
            try:
                self.h2.send_data(sid, b"the rest", end_stream=True)
            except h2.exceptions.ProtocolError:
                return  # reset by then
            self.flush()

        asyncio.get_running_loop().call_later(ms / 1000, rest)


class RecordingH2Server(LoopServer):
    """`with RecordingH2Server() as s:` an h2c server on 127.0.0.1:<s.port>, own thread."""

    def __init__(self, mode: str = "ok") -> None:
        super().__init__()
        self.mode = mode
        self.lock = threading.Lock()
        self.completed: list[tuple[str, bytes]] = []
        self.connections = 0
        self.closed = 0
        self.resets = 0

    def protocol(self) -> asyncio.Protocol:
        return _Conn(self)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.completed)
