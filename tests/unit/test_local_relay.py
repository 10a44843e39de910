"""The dashboard relay on loopback (the namespace part is tests/netns/test_up.py):
bytes both ways, and stop() closes connections still open and the loop."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from synchro.local.relay import Relay, RelayError, Target


@pytest.fixture
def echo() -> Iterator[int]:
    """A plain echo server on 127.0.0.1 (one thread per connection)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def _target(port: int) -> Target:
    return Target("127.0.0.1", port, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))


def test_relays_both_ways_and_stop_closes_open_connections(echo: int) -> None:
    relay = Relay(("127.0.0.1", 0), _target(echo))
    relay.start()
    client = socket.create_connection(relay.address, timeout=5)
    try:
        client.sendall(b"hello")
        assert client.recv(100) == b"hello"
        relay.stop()
        assert client.recv(100) == b""  # the relayed connection was closed, not left open
    finally:
        client.close()
        relay.stop()
    assert relay._loop.is_closed()


def test_a_taken_port_is_a_clear_error(echo: int) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(RelayError, match="already in use"):
            Relay(("127.0.0.1", taken.getsockname()[1]), _target(echo)).start()
    finally:
        taken.close()
