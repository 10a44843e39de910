"""The HTTP/2 proxy (proxy.http2) with real clients and real upstreams on loopback.

Most tests run `proxy.http2.serve` in-process behind a plain listener so they
can look at the handler's state; the last ones go through a real
`synchro-proxy` process (detection included).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.grpc_support.h2server import H2Client, TinyH2Server
from tests.integration.grpc_support.inproc import InProcessH2Proxy
from tests.integration.grpc_support.service import EchoClient, GrpcServer
from tests.integration.proxy_harness import free_port, run_proxy

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[GrpcServer]:
    with GrpcServer() as server:
        yield server


@pytest.fixture(scope="module")
def grpc_proxy(grpc_server: GrpcServer) -> Iterator[InProcessH2Proxy]:
    with InProcessH2Proxy(("127.0.0.1", grpc_server.port)) as proxy:
        yield proxy
        assert proxy.handler_errors == []


@pytest.fixture(scope="module")
def client(grpc_proxy: InProcessH2Proxy) -> Iterator[EchoClient]:
    with EchoClient(grpc_proxy.target) as echo_client:
        yield echo_client


@pytest.fixture(scope="module")
def h2_server() -> Iterator[TinyH2Server]:
    with TinyH2Server() as server:
        yield server


@pytest.fixture
def h2_proxy(h2_server: TinyH2Server) -> Iterator[InProcessH2Proxy]:
    with InProcessH2Proxy(("127.0.0.1", h2_server.port)) as proxy:
        yield proxy
        assert proxy.handler_errors == []


# -- gRPC ---------------------------------------------------------------------


def test_grpc_unary_call_gets_a_request_id(client: EchoClient) -> None:
    reply, call = client.echo.with_call(b"hello", timeout=10)
    assert reply == b"hello"
    seen = dict(call.trailing_metadata())["seen-request-id"]
    assert UUID.match(seen), seen


def test_grpc_request_id_from_the_client_is_kept(client: EchoClient) -> None:
    _, call = client.echo.with_call(b"x", timeout=10, metadata=(("x-request-id", "from-client-1"),))
    assert dict(call.trailing_metadata())["seen-request-id"] == "from-client-1"


def test_grpc_bidi_stream_keeps_order_both_ways(client: EchoClient) -> None:
    messages = [f"m{i}:".encode() + os.urandom(i % 700) for i in range(2000)]
    replies = list(client.chat(iter(messages), timeout=30))
    assert replies == [b"re:" + m for m in messages]


def test_grpc_large_messages_both_ways(client: EchoClient) -> None:
    big = os.urandom(8 * 1024 * 1024)
    assert client.echo(big, timeout=30) == big
    chunks = [os.urandom(3 * 1024 * 1024) for _ in range(4)]
    assert list(client.chat(iter(chunks), timeout=30)) == [b"re:" + c for c in chunks]


def test_grpc_concurrent_large_messages_share_the_connection_windows(client: EchoClient) -> None:
    """More bytes in flight than any connection window: connection-level flow control
    on all four h2 connections has to hand window back in turn, without a stall."""
    payloads = [os.urandom(2 * 1024 * 1024) for _ in range(12)]
    futures = [client.echo.future(p, timeout=60) for p in payloads]
    assert [f.result() for f in futures] == payloads


def test_grpc_error_status_message_and_trailers_are_forwarded(client: EchoClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.fail("INVALID_ARGUMENT:bad input: é 100%".encode(), timeout=10)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "bad input: é 100%"
    assert dict(err.trailing_metadata())["reason"] == "deliberate"


def test_grpc_concurrent_calls_share_one_connection_each_side(grpc_server: GrpcServer) -> None:
    with InProcessH2Proxy(("127.0.0.1", grpc_server.port)) as proxy, EchoClient(proxy.target) as c:
        c.echo(b"warm-up", timeout=10)
        payloads = [os.urandom(1000 + i * 50) for i in range(64)]
        futures = [c.echo.future(p, timeout=20) for p in payloads]
        streams = [c.chat(iter([p, p]), timeout=20) for p in payloads[:16]]
        assert [f.result() for f in futures] == payloads
        assert [list(s) for s in streams] == [[b"re:" + p] * 2 for p in payloads[:16]]
        assert len(proxy.downstreams) == 1
        assert proxy.downstreams[0].stats.requests == 1 + 64 + 16
        assert proxy.upstream_connections() == 1
        assert proxy.handler_errors == []


def test_grpc_upstream_down_is_unavailable() -> None:
    dead = free_port()
    with InProcessH2Proxy(("127.0.0.1", dead)) as proxy, EchoClient(proxy.target) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.echo(b"anyone?", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "upstream unavailable" in (info.value.details() or "")
        assert proxy.handler_errors == []


def test_grpc_client_cancel_reaches_the_server(grpc_server: GrpcServer, client: EchoClient) -> None:
    service = grpc_server.service
    service.cancelled.clear()
    call = client.hang(b"", timeout=30)
    assert next(call) == b"started"
    assert service.hang_started.wait(5)
    call.cancel()
    assert service.cancelled.wait(5), "the upstream never saw the cancellation"


# -- plain HTTP/2 ---------------------------------------------------------------


def test_curl_h2c_get_and_post(h2_proxy: InProcessH2Proxy) -> None:
    url = f"http://127.0.0.1:{h2_proxy.port}"
    get = subprocess.run(
        ["curl", "-sS", "-i", "--http2-prior-knowledge", f"{url}/hello"],
        capture_output=True,
        timeout=20,
        check=True,
    )
    head, _, body = get.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    assert body == b"hello"
    seen = re.search(rb"x-seen-request-id: (\S+)", head)
    assert seen and UUID.match(seen.group(1).decode())

    payload = os.urandom(300_000)
    post = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--data-binary", "@-", f"{url}/echo"],
        input=payload,
        capture_output=True,
        timeout=20,
        check=True,
    )
    assert post.stdout == payload


def test_trailers_and_request_body(h2_proxy: InProcessH2Proxy) -> None:
    with H2Client(h2_proxy.port) as c:
        body = os.urandom(200_000)
        result = c.get("/echo", method="POST", body=body)
        assert result.status == 200
        assert bytes(result.body) == body
        assert result.trailers == [("x-trailer", "done")]


def test_connection_specific_headers_are_not_forwarded(
    h2_server: TinyH2Server, h2_proxy: InProcessH2Proxy
) -> None:
    with H2Client(h2_proxy.port) as c:
        result = c.get("/hello", headers=[("te", "trailers"), ("x-keep", "yes")])
        assert result.status == 200
    seen = h2_server.requests[-1]
    assert seen["te"] == "trailers" and seen["x-keep"] == "yes"
    assert UUID.match(seen["x-request-id"])


def test_malformed_request_is_a_stream_error(
    h2_server: TinyH2Server, h2_proxy: InProcessH2Proxy
) -> None:
    seen = len(h2_server.requests)
    with H2Client(h2_proxy.port, validate=False) as c:
        assert c.get("/hello", headers=[("connection", "close")]).reset == 1  # PROTOCOL_ERROR
        assert c.get("/hello", headers=[("x-bad", "a\r\nb: c")]).reset == 1
        assert c.get("/hello").status == 200  # the connection is still good
    assert len(h2_server.requests) == seen + 1


def test_malformed_response_is_502(h2_proxy: InProcessH2Proxy) -> None:
    with H2Client(h2_proxy.port) as c:
        assert c.get("/bad-response").status == 502
        assert c.get("/hello").status == 200


def test_early_complete_response_then_no_error_reset(h2_proxy: InProcessH2Proxy) -> None:
    """The upstream answers before the request ended and resets with NO_ERROR: the
    client still gets the whole answer (through a small window), then NO_ERROR."""
    with H2Client(h2_proxy.port, window=1000) as c:
        sid = c.request("/early/15000", method="POST", body=b"partial", end=False)
        c.pump(lambda: c.streams[sid].ended or c.streams[sid].reset is not None)
        assert c.streams[sid].status == 200
        assert c.streams[sid].ended and len(c.streams[sid].body) == 15000
        c.pump(lambda: c.streams[sid].reset is not None)
        assert c.streams[sid].reset == 0
        assert c.get("/hello").status == 200


def test_upstream_reset_reaches_the_client_with_its_code(h2_proxy: InProcessH2Proxy) -> None:
    with H2Client(h2_proxy.port) as c:
        assert c.get("/reset/11").reset == 11  # ENHANCE_YOUR_CALM
        assert c.get("/hello").status == 200  # the connection is still good


def test_client_reset_reaches_the_upstream(
    h2_server: TinyH2Server, h2_proxy: InProcessH2Proxy
) -> None:
    with H2Client(h2_proxy.port) as c:
        sid = c.request("/hold")
        c.pump(lambda: c.streams[sid].status == 200)
        c.reset(sid, 8)  # CANCEL
        deadline = time.monotonic() + 5
        while ("/hold", 8) not in h2_server.resets and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("/hold", 8) in h2_server.resets


def test_client_vanishing_mid_body_cancels_upstream(
    h2_server: TinyH2Server, h2_proxy: InProcessH2Proxy
) -> None:
    c = H2Client(h2_proxy.port)
    sid = c.request("/echo", method="POST", body=os.urandom(50_000), end=False)
    deadline = time.monotonic() + 5
    while not any(r.get(":path") == "/echo" for r in h2_server.requests[-3:]):
        assert time.monotonic() < deadline, "the request never reached the upstream"
        time.sleep(0.01)
    c.close()  # gone, mid-body, without a word
    while ("/echo", 8) not in h2_server.resets and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ("/echo", 8) in h2_server.resets  # CANCEL reached the upstream
    assert sid == 1
    with H2Client(h2_proxy.port) as again:
        assert again.get("/hello").status == 200


def test_upstream_goaway_fails_over_to_a_new_connection(
    h2_server: TinyH2Server, h2_proxy: InProcessH2Proxy
) -> None:
    with H2Client(h2_proxy.port) as c:
        assert c.get("/hello").status == 200
        before = h2_server.connections
        result = c.get("/refuse-once")  # the upstream answers GOAWAY(last stream 0) first
        assert result.status == 200 and bytes(result.body) == b"second try"
        assert h2_server.connections == before + 1
        assert c.get("/hello").status == 200


def test_flow_control_end_to_end(h2_server: TinyH2Server, h2_proxy: InProcessH2Proxy) -> None:
    """A client that does not read holds the upstream back: the proxy buffers only its windows."""
    size = 24 * 1024 * 1024
    with H2Client(h2_proxy.port, auto_ack=False) as c:
        h2_server.sent_bytes = 0
        sid = c.request(f"/big/{size}")
        c.pump(lambda: len(c.streams[sid].body) >= 65535)
        time.sleep(0.5)
        # client window (64 KiB) + the proxy's upstream stream window (1 MiB) + frames in flight
        assert h2_server.sent_bytes <= 65535 + (1 << 20) + 65536
        c.auto_ack = True
        c.h2.acknowledge_received_data(len(c.streams[sid].body), sid)
        c.flush()
        c.pump(lambda: c.streams[sid].done, timeout=60)
        assert c.streams[sid].ended and len(c.streams[sid].body) == size


def test_upstream_connection_lost(h2_proxy: InProcessH2Proxy) -> None:
    with H2Client(h2_proxy.port) as c:
        assert c.get("/vanish").status == 502  # nothing answered yet: a 502
        dropped = c.get("/drop")  # answer started: the client's stream is reset
        assert dropped.status == 200 and dropped.reset == 2  # INTERNAL_ERROR
        assert c.get("/hello").status == 200


def test_more_streams_than_the_upstream_allows_open_more_connections() -> None:
    with (
        TinyH2Server(max_streams=4) as server,
        InProcessH2Proxy(("127.0.0.1", server.port)) as proxy,
    ):
        with H2Client(proxy.port) as c:
            sids = [c.request("/slow/300") for _ in range(40)]
            c.pump(lambda: all(c.streams[s].done for s in sids), timeout=20)
            assert [c.streams[s].status for s in sids] == [200] * 40
            assert all(bytes(c.streams[s].body) == b"slow" for s in sids)
        assert server.connections >= 10
        assert proxy.handler_errors == []


def test_idle_connections_are_closed_both_sides(h2_server: TinyH2Server) -> None:
    with InProcessH2Proxy(
        ("127.0.0.1", h2_server.port), idle_timeout=0.3, pool_idle_timeout=0.3
    ) as proxy:
        with H2Client(proxy.port) as c:
            assert c.get("/hello").status == 200
            assert proxy.upstream_connections() == 1
            c.pump(lambda: c.goaway is not None, timeout=5)
            c.pump(lambda: c.closed, timeout=5)
        deadline = time.monotonic() + 5
        while proxy.upstream_connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.upstream_connections() == 0


def test_plain_upstream_down_is_502() -> None:
    with InProcessH2Proxy(("127.0.0.1", free_port())) as proxy, H2Client(proxy.port) as c:
        assert c.get("/hello").status == 502
        grpc_like = c.get(
            "/svc/M", method="POST", headers=[("content-type", "application/grpc")], body=b""
        )
        assert grpc_like.status == 200
        assert dict(grpc_like.headers)["grpc-status"] == "14"


def test_upstream_that_is_not_http2_is_502() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_http1() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            conn.close()

    thread = threading.Thread(target=answer_http1, daemon=True)
    thread.start()
    try:
        with InProcessH2Proxy(("127.0.0.1", port)) as proxy, H2Client(proxy.port) as c:
            assert c.get("/hello").status == 502
            assert proxy.handler_errors == []
    finally:
        listener.close()


def test_drain_sends_goaway_and_finishes_inflight(h2_proxy: InProcessH2Proxy) -> None:
    with H2Client(h2_proxy.port) as c:
        sid = c.request("/slow/400")
        c.pump(lambda: c.streams[sid].status == 200)
        h2_proxy.drain()
        c.pump(lambda: c.goaway is not None)
        assert c.goaway is not None and c.goaway.last_stream_id == sid
        c.pump(lambda: c.streams[sid].done)
        assert c.streams[sid].ended and bytes(c.streams[sid].body) == b"slow"
        c.pump(lambda: c.closed)  # and then the proxy closes the connection


def test_garbage_gets_goaway_and_the_proxy_keeps_serving(h2_proxy: InProcessH2Proxy) -> None:
    with socket.create_connection(("127.0.0.1", h2_proxy.port), timeout=5) as s:
        s.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + b"\x00\x00\x04\x09\xff\x00\x00\x00\x05garbage-frames"
        )
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        assert b"\x07" in received  # a GOAWAY frame (type 7) came back before the close
    with H2Client(h2_proxy.port) as c:
        assert c.get("/hello").status == 200


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_multiplexing_smoke(h2_proxy: InProcessH2Proxy) -> None:
    out = subprocess.run(
        ["h2load", "-n", "3000", "-c", "4", "-m", "32", f"http://127.0.0.1:{h2_proxy.port}/hello"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert re.search(r"requests: 3000 total, 3000 started, 3000 done, 3000 succeeded", out), out
    assert "status codes: 3000 2xx" in out, out


NGINX_H2 = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 50;
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ return 200 "{body}"; }}
  }}
}}
"""


@pytest.fixture
def nginx_h2(tmp_path: Path) -> Iterator[int]:
    """nginx as a real h2c upstream that sends GOAWAY after every 50 requests."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed")
    port = free_port()
    config = NGINX_H2.format(dir=tmp_path, port=port, body="x" * 1024)
    (tmp_path / "nginx.conf").write_text(config)
    proc = subprocess.Popen(
        ["nginx", "-c", str(tmp_path / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"nginx did not start: {(tmp_path / 'error.log').read_text()}")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_through_nginx_goaways(nginx_h2: int) -> None:
    """Every 50 requests nginx says GOAWAY: no request may fail because of it."""
    with InProcessH2Proxy(("127.0.0.1", nginx_h2)) as proxy:
        out = subprocess.run(
            ["h2load", "-n", "2000", "-c", "2", "-m", "16", f"http://127.0.0.1:{proxy.port}/"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "2000 succeeded" in out and "status codes: 2000 2xx" in out, out
        assert proxy.handler_errors == []


# -- through a real synchro-proxy process -------------------------------------------


def test_grpc_through_synchro_proxy(grpc_server: GrpcServer) -> None:
    with run_proxy(static_destination=f"127.0.0.1:{grpc_server.port}") as proxy:
        with EchoClient("{}:{}".format(*proxy.outbound)) as c:
            assert c.echo(b"via the listener", timeout=10) == b"via the listener"
            messages = [os.urandom(100) for _ in range(200)]
            assert list(c.chat(iter(messages), timeout=20)) == [b"re:" + m for m in messages]
            with pytest.raises(grpc.RpcError) as info:
                c.fail(b"PERMISSION_DENIED:no", timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert proxy.alive()


def test_sigterm_drains_h2_connections(h2_server: TinyH2Server) -> None:
    with run_proxy(static_destination=f"127.0.0.1:{h2_server.port}", drain_seconds=10) as proxy:
        with H2Client(proxy.outbound[1]) as c:
            assert c.get("/hello").status == 200
            sid = c.request("/slow/600")
            c.pump(lambda: c.streams[sid].status == 200)
            proxy.process.send_signal(signal.SIGTERM)
            c.pump(lambda: c.goaway is not None)
            c.pump(lambda: c.streams[sid].done)
            assert c.streams[sid].ended and bytes(c.streams[sid].body) == b"slow"
            c.pump(lambda: c.closed)
        assert proxy.wait_exit(10) == 0
