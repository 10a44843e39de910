"""synchro-proxy as a real process on loopback: opaque TCP, detection, bad input,
draining and workers. The upstreams are real asyncio servers on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import resource
import signal
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.proxy_harness import (
    BackgroundServer,
    RunningProxy,
    echo_handler,
    free_port,
    run_proxy,
)

CLIENT_HELLO = bytes.fromhex("160301020001000200030300") + os.urandom(64)


@pytest.fixture(scope="module")
def echo() -> Iterator[BackgroundServer]:
    with BackgroundServer(echo_handler) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(echo: BackgroundServer) -> Iterator[RunningProxy]:
    with run_proxy(static_destination=echo.address) as running:
        yield running
        # Bad input is routine: it must not show up as a crash in the proxy's log.
        assert "Traceback" not in running.log(), running.log()[-4000:]


def connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def echo_once(address: tuple[str, int], payload: bytes = b"ping\x00\xff") -> bytes:
    with connect(address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def hard_close(sock: socket.socket) -> None:
    """Vanish: close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def listener_stats(proxy: RunningProxy, name: str) -> dict[str, Any]:
    return next(item for item in proxy.admin_json("/listeners") if item["name"] == name)


def test_binary_echo_through_both_listeners(proxy: RunningProxy) -> None:
    payload = bytes(range(256)) * 64
    assert echo_once(proxy.outbound, payload) == payload
    assert echo_once(proxy.inbound, payload) == payload
    assert listener_stats(proxy, "inbound")["accepted"] >= 1


def test_tls_client_hello_is_tunnelled_as_opaque(proxy: RunningProxy) -> None:
    assert echo_once(proxy.outbound, CLIENT_HELLO) == CLIENT_HELLO
    protocols = listener_stats(proxy, "outbound")["protocols"]
    assert isinstance(protocols, dict) and protocols.get("tls", 0) >= 1


async def _digest_then_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read everything (until the client half-closes), answer with its sha256 and
    then `size` deterministic bytes, `size` taken from the first 8 bytes."""
    digest = hashlib.sha256()
    header = await reader.readexactly(8)
    digest.update(header)
    while data := await reader.read(1 << 16):
        digest.update(data)
    writer.write(digest.digest())
    size = int.from_bytes(header, "big")
    block = bytes(range(256)) * 256
    sent = 0
    while sent < size:
        part = block[: size - sent]
        writer.write(part)
        sent += len(part)
        await writer.drain()
    writer.close()


def test_large_transfers_both_ways_with_half_close() -> None:
    size = 10 * 1024 * 1024
    upload = size.to_bytes(8, "big") + random.Random(1).randbytes(size)
    with (
        BackgroundServer(_digest_then_stream) as server,
        run_proxy(static_destination=server.address) as proxy,
    ):
        with connect(proxy.outbound) as sock:
            sock.sendall(upload)
            # The upstream answers only after it has seen our FIN through the proxy.
            sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)
        assert answer[:32] == hashlib.sha256(upload).digest()
        body = answer[32:]
        assert len(body) == size
        assert body == (bytes(range(256)) * 256 * (size // 65536 + 1))[:size]
        stats = listener_stats(proxy, "outbound")
        assert stats["errors"] == 0


async def _banner_then_close_on_eof(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"220 server speaks first\r\n")
    await writer.drain()
    received = await reader.read()  # until the client half-closes
    writer.write(b"got " + str(len(received)).encode() + b"\r\n")
    writer.close()


def test_server_half_close_keeps_the_other_direction_open() -> None:
    async def half_close_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"bye")
        writer.write_eof()
        rest = await reader.read()
        # Still readable after our FIN: report what arrived, over a new side channel.
        results.append(rest)
        writer.close()

    results: list[bytes] = []
    with (
        BackgroundServer(half_close_first) as server,
        run_proxy(static_destination=server.address) as proxy,
    ):
        with connect(proxy.outbound) as sock:
            sock.sendall(b"hello")
            assert recv_all(sock) == b"bye"  # EOF from the server arrived...
            sock.sendall(b"after-fin")  # ...and the client can still talk
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 10
            while not results and time.monotonic() < deadline:
                time.sleep(0.02)
        assert results == [b"after-fin"]


def test_server_first_opaque_port_skips_detection() -> None:
    # A detection timeout far beyond the client's read timeout: only skipping
    # detection for the opaque port lets the banner through in time.
    with (
        BackgroundServer(_banner_then_close_on_eof) as server,
        run_proxy(
            static_destination=server.address,
            extra_args=["--detect-timeout=60"],
            env={"SYNCHRO_OPAQUE_PORTS": f"1,{server.port}"},
        ) as proxy,
        connect(proxy.outbound, timeout=10) as sock,
    ):
        assert sock.recv(100) == b"220 server speaks first\r\n"
        sock.sendall(b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"got 6\r\n"


def test_detection_times_out_to_opaque_for_server_first_protocols() -> None:
    with (
        BackgroundServer(_banner_then_close_on_eof) as server,
        run_proxy(static_destination=server.address, extra_args=["--detect-timeout=0.2"]) as proxy,
    ):
        with connect(proxy.outbound, timeout=10) as sock:
            assert sock.recv(100) == b"220 server speaks first\r\n"
        assert listener_stats(proxy, "outbound")["protocols"] == {"tcp": 1}


def test_refused_upstream_resets_the_client_and_proxy_keeps_serving(echo: BackgroundServer) -> None:
    closed = free_port()
    with run_proxy(static_destination=f"127.0.0.1:{closed}") as proxy:
        for _ in range(3):
            with connect(proxy.outbound) as sock:
                sock.sendall(b"\x00hello")
                with pytest.raises(ConnectionResetError):
                    sock.recv(10)
        assert proxy.alive()
        assert proxy.get("/healthz/ready")[0] == 200
    # and an unrelated proxy to a live upstream is unaffected by any of this
    with run_proxy(static_destination=echo.address) as proxy:
        assert echo_once(proxy.outbound) == b"ping\x00\xff"


def test_upstream_reset_is_passed_on_as_reset() -> None:
    async def reset_after_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    with (
        BackgroundServer(reset_after_read) as server,
        run_proxy(static_destination=server.address) as proxy,
    ):
        with connect(proxy.outbound) as sock:
            sock.sendall(b"\x01data")
            with pytest.raises(ConnectionResetError):
                recv_all(sock)
        assert proxy.alive()
        assert proxy.get("/healthz/ready")[0] == 200


def test_unredirected_connection_without_static_destination_is_refused() -> None:
    with run_proxy() as proxy:
        with connect(proxy.outbound) as sock, pytest.raises(ConnectionResetError):
            sock.recv(10)
        assert "no original destination" in proxy.log()
        assert listener_stats(proxy, "outbound")["refused"] == 1
        assert proxy.get("/healthz/ready")[0] == 200


def test_garbage_and_vanishing_clients_do_not_hurt(proxy: RunningProxy) -> None:
    rng = random.Random(7)
    for i in range(150):
        sock = connect(proxy.outbound)
        if i % 3:
            sock.sendall(rng.randbytes(rng.randrange(1, 4096)))
        if i % 2:
            hard_close(sock)
        else:
            sock.close()
    # Vanishing in the middle of a large upload, with the upstream still sending back.
    for _ in range(20):
        sock = connect(proxy.outbound)
        sock.sendall(b"\x02" * 300_000)
        hard_close(sock)
    assert echo_once(proxy.outbound) == b"ping\x00\xff"
    assert proxy.alive()
    assert listener_stats(proxy, "outbound")["errors"] == 0


def test_slow_clients_do_not_block_others(proxy: RunningProxy) -> None:
    slow = [connect(proxy.outbound) for _ in range(100)]
    try:
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nHo")  # and then nothing more for a while
        assert echo_once(proxy.outbound, b"\x03fast") == b"\x03fast"
        for sock in slow[:50]:
            sock.sendall(b"s")
        assert echo_once(proxy.inbound, b"\x03fast") == b"\x03fast"
    finally:
        for sock in slow:
            hard_close(sock)
    assert proxy.alive()


def test_thousands_of_idle_connections(echo: BackgroundServer) -> None:
    count = 3000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * count:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {4 * count}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * count), hard))
    with run_proxy(static_destination=echo.address, extra_args=["--detect-timeout=0.1"]) as proxy:
        idle: list[socket.socket] = []
        try:
            for _ in range(count):
                idle.append(connect(proxy.outbound))
            deadline = time.monotonic() + 30
            while listener_stats(proxy, "outbound")["protocols"].get("tcp", 0) < count:
                assert time.monotonic() < deadline, "idle connections were not all proxied"
                time.sleep(0.2)
            assert listener_stats(proxy, "outbound")["active_connections"] == count
            assert echo_once(proxy.outbound) == b"ping\x00\xff"
            # The idle ones are real tunnels too.
            for sock in idle[:: count // 10]:
                sock.sendall(b"\x04still here")
                assert sock.recv(100) == b"\x04still here"
        finally:
            for sock in idle:
                sock.close()
        assert proxy.alive()
        assert echo_once(proxy.outbound) == b"ping\x00\xff"


def test_sigterm_stops_accepting_and_lets_open_connections_finish(echo: BackgroundServer) -> None:
    with run_proxy(static_destination=echo.address, drain_seconds=30) as proxy:
        with connect(proxy.outbound) as open_conn:
            open_conn.sendall(b"\x05one")
            assert open_conn.recv(100) == b"\x05one"
            proxy.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while True:
                try:
                    connect(proxy.outbound, timeout=1).close()
                except ConnectionRefusedError:
                    break
                assert time.monotonic() < deadline, "still accepting after SIGTERM"
                time.sleep(0.05)
            assert proxy.get("/healthz/ready")[0] == 503
            open_conn.sendall(b"\x05two")
            assert open_conn.recv(100) == b"\x05two"
            assert proxy.alive()
        # The last connection is done: the proxy need not wait the full 30 s.
        assert proxy.wait_exit(timeout=10) == 0


def test_drain_time_ends_connections_that_do_not_finish(echo: BackgroundServer) -> None:
    with (
        run_proxy(static_destination=echo.address, drain_seconds=0.5) as proxy,
        connect(proxy.outbound) as stuck,
    ):
        stuck.sendall(b"\x06x")
        assert stuck.recv(10) == b"\x06x"
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.wait_exit(timeout=10) == 0
        try:
            data = stuck.recv(10)
        except ConnectionResetError:
            data = b""
        assert data == b""


def test_concurrency_workers_share_the_listeners(echo: BackgroundServer) -> None:
    with run_proxy(static_destination=echo.address, concurrency=2) as proxy:
        for i in range(40):
            payload = b"\x07" + bytes([i])
            assert echo_once(proxy.outbound if i % 2 else proxy.inbound, payload) == payload
        workers = listener_stats(proxy, "outbound")["workers"]
        assert isinstance(workers, list)
        pids = [w["pid"] for w in workers]
        assert len(set(pids)) == 2 and all(w["ready"] for w in workers)
        # A worker that dies is replaced.
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            workers = listener_stats(proxy, "outbound")["workers"]
            assert isinstance(workers, list)
            if pids[0] not in [w["pid"] for w in workers] and all(w["ready"] for w in workers):
                break
            assert time.monotonic() < deadline, "worker not restarted"
            time.sleep(0.1)
        assert echo_once(proxy.outbound) == b"ping\x00\xff"
        live = [w["pid"] for w in workers]
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.wait_exit(timeout=20) == 0
        for pid in live:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
