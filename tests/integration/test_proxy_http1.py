"""HTTP/1.x through a real `synchro-proxy` on loopback, with real clients.

The upstream is Python's `http.server` (an HTTP implementation independent of
the proxy's httptools), plus a `websockets` echo server; the clients are curl,
`websockets` and raw sockets where the wire format itself is the point.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.integration.proxy_harness import RunningProxy, free_port, run_proxy

MiB = 1024 * 1024
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


# ---------------------------------------------------------------------------
# Upstream: http.server, HTTP/1.1 keep-alive


def _read_chunked(rfile: Any) -> tuple[bytes, list[list[str]]]:
    body = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            break
        body += rfile.read(size)
        assert rfile.read(2) == b"\r\n"
    trailers = []
    while True:
        line = rfile.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode().partition(":")
        trailers.append([name.strip(), value.strip()])
    return bytes(body), trailers


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_expect_100(self) -> bool:
        if self.path.startswith("/reject"):
            # Refuse without reading the body the client has not sent yet.
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        return super().handle_expect_100()

    def _body(self) -> tuple[bytes, list[list[str]]]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(self.rfile)
        length = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(length), []

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    drop_next = False

    def _route(self) -> None:
        if self.drop_next:
            self.close_connection = True
            return
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        size = int(query.get("size", "0"))
        if url.path == "/echo":
            body, trailers = self._body()
            info = {
                "method": self.command,
                "path": self.path,
                "version": self.request_version,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_len": len(body),
                "trailers": trailers,
                "client_port": self.client_address[1],
            }
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        elif url.path == "/download":
            self._body()
            data = payload(size)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            if self.command == "HEAD":
                return
            for i in range(0, len(data), 64 * 1024):
                piece = data[i : i + 64 * 1024]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            digest = hashlib.sha256(data).hexdigest().encode()
            self.wfile.write(b"0\r\nX-Checksum: " + digest + b"\r\n\r\n")
        elif url.path == "/length":
            self._body()
            self._send(200, payload(size), {"Content-Type": "application/octet-stream"})
        elif url.path == "/hop":
            self._send(
                200,
                b"hop",
                {"Connection": "X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5", "X-Keep": "1"},
            )
        elif url.path == "/eof":
            # Close-delimited: no length, no chunks, the body ends with the connection.
            self._body()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + payload(size))
            self.close_connection = True
        elif url.path == "/hints":
            self._body()
            self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
            self._send(200, b"final")
        elif url.path == "/slow":
            self._body()
            time.sleep(float(query.get("seconds", "1")))
            self._send(200, b"slow")
        elif url.path == "/drop-next":
            # Keep-alive, but the next request on this connection is dropped
            # unanswered: what a server closing an idle connection does when a
            # request crosses its FIN.
            self._body()
            self._send(200, b"bye")
            self.drop_next = True
        elif url.path == "/reject":
            self._body()
            self._send(401, b"")
        else:
            self._body()
            self._send(404, b"not found")

    do_GET = do_POST = do_PUT = do_HEAD = _route


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Tests cut connections on purpose (timeouts, vanishing clients).
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def proxy(upstream: int) -> Iterator[RunningProxy]:
    with run_proxy(static_destination=f"127.0.0.1:{upstream}") as p:
        yield p


# ---------------------------------------------------------------------------
# Clients


def url(p: RunningProxy, path: str) -> str:
    return f"http://{p.outbound[0]}:{p.outbound[1]}{path}"


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=timeout)


def connect(p: RunningProxy) -> socket.socket:
    s = socket.create_connection(p.outbound, timeout=15)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Response:
    def __init__(
        self,
        version: str,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        trailers: list[tuple[str, str]],
    ):
        self.version = version
        self.status = status
        self.headers = headers
        self.body = body
        self.trailers = trailers

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def read_response(f: BinaryIO, *, head: bool = False) -> Response:
    """One response from a raw connection (1xx heads are returned on their own)."""
    status_line = f.readline().decode()
    assert status_line, "connection closed before a response"
    version, status, *_ = status_line.split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        headers.append((name.strip(), value.strip()))
    resp = Response(version, int(status), headers, b"", [])
    code = resp.status
    if head or code < 200 or code in (204, 304):
        return resp
    if "chunked" in (resp.get("transfer-encoding") or "").lower():
        body, trailers = _read_chunked(f)
        resp.body = body
        resp.trailers = [(k, v) for k, v in trailers]
    elif resp.get("content-length") is not None:
        resp.body = f.read(int(resp.get("content-length") or 0))
    else:
        resp.body = f.read()
    return resp


def raw_exchange(p: RunningProxy, request: bytes, *, head: bool = False) -> Response:
    with connect(p) as s, s.makefile("rb") as f:
        s.sendall(request)
        return read_response(f, head=head)


def echo(resp: Response) -> dict[str, Any]:
    assert resp.status == 200, (resp.status, resp.body[:200])
    return dict(json.loads(resp.body))


def echo_headers(info: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in info["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def still_serves(p: RunningProxy) -> None:
    resp = raw_exchange(p, b"GET /echo HTTP/1.1\r\nHost: check\r\n\r\n")
    assert echo(resp)["path"] == "/echo"


# ---------------------------------------------------------------------------
# Keep-alive, pooling, pipelining


def test_curl_reuses_its_connection_through_the_proxy(proxy: RunningProxy) -> None:
    r = curl(
        "-v",
        url(proxy, "/echo"),
        "-o",
        "/dev/null",
        url(proxy, "/length?size=10"),
        "-o",
        "/dev/null",
    )
    assert r.returncode == 0, r.stderr
    assert "Re-using existing connection" in r.stderr
    assert r.stderr.count("< HTTP/1.1 200") == 2


def test_upstream_connections_are_pooled_across_requests_and_clients(proxy: RunningProxy) -> None:
    ports = set()
    for _ in range(2):
        with connect(proxy) as s, s.makefile("rb") as f:
            for _ in range(3):
                s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
                ports.add(echo(read_response(f))["client_port"])
    # Six sequential requests over two client connections: one upstream connection.
    assert len(ports) == 1


def test_pipelined_requests_are_answered_in_order(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(
            b"GET /echo?n=1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /echo?n=2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /echo?n=3 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        paths = [echo(read_response(f))["path"] for _ in range(3)]
    assert paths == ["/echo?n=1", "/echo?n=2", "/echo?n=3"]


# ---------------------------------------------------------------------------
# Bodies


def test_10mib_chunked_upload_streams_intact(proxy: RunningProxy, tmp_path: Path) -> None:
    data = payload(10 * MiB)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    r = curl(
        "-X",
        "POST",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{src}",
        url(proxy, "/echo"),
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["body_len"] == len(data)
    assert info["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert echo_headers(info)["transfer-encoding"] == ["chunked"]


def test_content_length_upload_streams_intact(proxy: RunningProxy, tmp_path: Path) -> None:
    data = payload(3 * MiB + 7)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    r = curl("-H", "Expect:", "--data-binary", f"@{src}", url(proxy, "/echo"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert echo_headers(info)["content-length"] == [str(len(data))]


def test_10mib_chunked_download_streams_intact(proxy: RunningProxy, tmp_path: Path) -> None:
    out = tmp_path / "down.bin"
    r = curl("-v", url(proxy, f"/download?size={10 * MiB}"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "< Transfer-Encoding: chunked" in r.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(payload(10 * MiB)).digest()


def test_close_delimited_upstream_body_is_rechunked_for_http11_client(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /eof?size=5000 HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = read_response(f)
        assert resp.get("transfer-encoding") == "chunked"
        assert resp.body == payload(5000)
        # ... so the client's connection stays usable.
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        assert echo(read_response(f))["path"] == "/echo"


def test_response_trailers_are_forwarded(proxy: RunningProxy) -> None:
    resp = raw_exchange(
        proxy, b"GET /download?size=100000 HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n"
    )
    assert resp.body == payload(100000)
    assert resp.trailers == [("X-Checksum", hashlib.sha256(resp.body).hexdigest())]


def test_request_trailers_are_forwarded(proxy: RunningProxy) -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Upload-Sum: abc\r\nX-Other: 2\r\n\r\n"
    resp = raw_exchange(
        proxy,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Upload-Sum\r\n\r\n"
        + body,
    )
    info = echo(resp)
    assert info["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert info["trailers"] == [["X-Upload-Sum", "abc"], ["X-Other", "2"]]


# ---------------------------------------------------------------------------
# HEAD, 1xx, Expect


def test_head_has_no_body_and_the_connection_goes_on(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(b"HEAD /length?size=1000 HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = read_response(f, head=True)
        assert resp.status == 200
        assert resp.get("content-length") == "1000"
        s.sendall(b"HEAD /download?size=1000 HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = read_response(f, head=True)
        assert resp.status == 200
        assert resp.get("transfer-encoding") == "chunked"
        # Had the proxy sent any body, this would be read as the next status line.
        s.sendall(b"GET /length?size=7 HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = read_response(f)
        assert resp.status == 200 and resp.body == payload(7)
    r = curl("-I", url(proxy, "/length?size=123"))
    assert r.returncode == 0, r.stderr
    assert "Content-Length: 123" in r.stdout


def test_expect_100_continue_upload(proxy: RunningProxy, tmp_path: Path) -> None:
    data = payload(2 * MiB)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    r = curl("-v", "-H", "Expect: 100-continue", "--data-binary", f"@{src}", url(proxy, "/echo"))
    assert r.returncode == 0, r.stderr
    assert "< HTTP/1.1 100 Continue" in r.stderr
    info = json.loads(r.stdout)
    assert info["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert echo_headers(info)["expect"] == ["100-continue"]


def test_expect_100_continue_refused_by_upstream(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(
            b"POST /reject HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
        )
        resp = read_response(f)
        # The final answer comes without the body having been sent; since the
        # client may or may not send it now, the proxy closes afterwards.
        assert resp.status == 401
        assert resp.get("connection") == "close"
    still_serves(proxy)


def test_interim_1xx_is_forwarded(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /hints HTTP/1.1\r\nHost: a\r\n\r\n")
        first = read_response(f)
        assert first.status == 103
        assert first.get("link") == "</a.css>; rel=preload"
        final = read_response(f)
        assert final.status == 200 and final.body == b"final"


# ---------------------------------------------------------------------------
# HTTP/1.0 clients


def test_http10_client_gets_close_delimited_body_without_chunks(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /download?size=5000 HTTP/1.0\r\n\r\n")
        resp = read_response(f)
        assert resp.get("transfer-encoding") is None
        assert resp.get("connection") == "close"
        assert resp.body == payload(5000)  # read until the proxy closed


def test_http10_client_without_keep_alive_is_closed(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /length?size=10 HTTP/1.0\r\n\r\n")
        resp = read_response(f)
        assert resp.body == payload(10)
        assert f.read() == b""


def test_http10_keep_alive_when_asked(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /length?size=10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = read_response(f)
        assert resp.get("connection") == "keep-alive"
        assert resp.body == payload(10)
        s.sendall(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        info = echo(read_response(f))
        # The upstream side always speaks HTTP/1.1 and gets a Host.
        assert info["version"] == "HTTP/1.1"
        assert "host" in echo_headers(info)
    r = curl("--http1.0", url(proxy, "/length?size=10"), "-o", "/dev/null", "-w", "%{http_code}")
    assert r.stdout == "200"


# ---------------------------------------------------------------------------
# Headers


def test_hop_by_hop_request_headers_are_stripped(proxy: RunningProxy) -> None:
    resp = raw_exchange(
        proxy,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
        b"Keep-Alive: 300\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nUpgrade: foo\r\n"
        b"X-Keep: yes\r\n\r\n",
    )
    seen = echo_headers(echo(resp))
    for name in ("x-drop", "keep-alive", "proxy-connection", "te", "upgrade"):
        assert name not in seen, name
    assert seen["x-keep"] == ["yes"]
    assert seen.get("connection", []) in ([], ["keep-alive"])


def test_hop_by_hop_response_headers_are_stripped(proxy: RunningProxy) -> None:
    resp = raw_exchange(proxy, b"GET /hop HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resp.status == 200 and resp.body == b"hop"
    assert "x-hop" not in resp.names()
    assert "keep-alive" not in resp.names()
    assert resp.get("x-keep") == "1"


def test_request_id_added_when_absent_and_kept_when_present(proxy: RunningProxy) -> None:
    info = echo(raw_exchange(proxy, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n"))
    ids = echo_headers(info)["x-request-id"]
    assert len(ids) == 1 and UUID_RE.match(ids[0]), ids
    info = echo(
        raw_exchange(proxy, b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Request-Id: mine-42\r\n\r\n")
    )
    assert echo_headers(info)["x-request-id"] == ["mine-42"]


# ---------------------------------------------------------------------------
# WebSocket


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[int]:
    from websockets.sync.server import ServerConnection, serve

    def handler(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield int(server.socket.getsockname()[1])
        finally:
            server.shutdown()


def test_websocket_echo_through_the_proxy(ws_upstream: int) -> None:
    from websockets.sync.client import connect as ws_connect

    with (
        run_proxy(static_destination=f"127.0.0.1:{ws_upstream}") as p,
        ws_connect(f"ws://{p.outbound[0]}:{p.outbound[1]}/chat", open_timeout=10) as ws,
    ):
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        big = payload(300_000)
        ws.send(big)
        assert ws.recv(timeout=10) == big
        for i in range(20):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=10) for _ in range(20)] == [f"m{i}" for i in range(20)]


# ---------------------------------------------------------------------------
# Limits and bad input; the proxy keeps serving after each


def test_oversized_headers_get_431(proxy: RunningProxy) -> None:
    big = b"X-Big: " + b"a" * (70 * 1024) + b"\r\n"
    resp = raw_exchange(proxy, b"GET /echo HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    assert resp.status == 431
    assert resp.get("connection") == "close"
    still_serves(proxy)


def test_oversized_header_that_never_ends_gets_431(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Endless: ")
        try:
            for _ in range(40):
                s.sendall(b"b" * 4096)
        except OSError:
            pass
        assert read_response(f).status == 431
    still_serves(proxy)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /echo HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nthis is not a header\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_request_gets_400_and_close(proxy: RunningProxy, request_bytes: bytes) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(request_bytes)
        resp = read_response(f)
        assert resp.status == 400
        assert resp.get("connection") == "close"
        assert f.read() == b""
    still_serves(proxy)


def test_upstream_refused_gets_502_and_keeps_the_client_connection() -> None:
    with run_proxy(static_destination=f"127.0.0.1:{free_port()}") as p:
        r = curl("-v", url(p, "/a"), url(p, "/b"))
        assert r.stderr.count("< HTTP/1.1 502") == 2, r.stderr
        assert "Re-using existing connection" in r.stderr
        # With an upload the proxy never reads: the answer still arrives.
        with connect(p) as s, s.makefile("rb") as f:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5242880\r\n\r\n")
            s.sendall(payload(MiB))
            resp = read_response(f)
            assert resp.status == 502
            assert resp.get("connection") == "close"
        assert p.alive()


@pytest.fixture(scope="module")
def impatient_proxy(upstream: int) -> Iterator[RunningProxy]:
    with run_proxy(
        static_destination=f"127.0.0.1:{upstream}",
        extra_args=["--header-timeout=1", "--idle-timeout=1.5"],
    ) as p:
        yield p


def test_slow_headers_get_408(impatient_proxy: RunningProxy) -> None:
    with connect(impatient_proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n")
        resp = read_response(f)
        assert resp.status == 408
    still_serves(impatient_proxy)


def test_slowloris_trickle_gets_408(impatient_proxy: RunningProxy) -> None:
    with connect(impatient_proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /echo HTTP/1.1\r\n")
        with pytest.raises(OSError):
            # Each byte is progress of a sort, but the head never completes in time.
            for _ in range(30):
                s.sendall(b"X-A: b\r\n")
                time.sleep(0.2)
        resp = read_response(f)
        assert resp.status == 408
    still_serves(impatient_proxy)


def test_upstream_too_slow_gets_504(impatient_proxy: RunningProxy) -> None:
    resp = raw_exchange(impatient_proxy, b"GET /slow?seconds=4 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resp.status == 504
    still_serves(impatient_proxy)


def test_idle_keep_alive_connection_is_closed_quietly(impatient_proxy: RunningProxy) -> None:
    with connect(impatient_proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        echo(read_response(f))
        # No 408 for a client that simply did not send another request.
        assert f.read() == b""


def _reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_client_vanishing_mid_upload_breaks_nothing(proxy: RunningProxy) -> None:
    for close in (_reset, socket.socket.close):
        s = connect(proxy)
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10485760\r\n\r\n")
        s.sendall(payload(MiB))
        close(s)
        still_serves(proxy)
    # Same for a chunked body cut off between chunks.
    s = connect(proxy)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    _reset(s)
    still_serves(proxy)
    assert proxy.alive()


def test_client_vanishing_mid_download_breaks_nothing(proxy: RunningProxy) -> None:
    s = connect(proxy)
    s.sendall(b"GET /download?size=20000000 HTTP/1.1\r\nHost: a\r\n\r\n")
    s.recv(65536)
    _reset(s)
    still_serves(proxy)
    assert proxy.alive()


def test_stale_pooled_connection_is_retried_for_bodyless_requests(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        for _ in range(3):
            s.sendall(b"GET /drop-next HTTP/1.1\r\nHost: a\r\n\r\n")
            resp = read_response(f)
            assert (resp.status, resp.body) == (200, b"bye")
            # Goes out on the pooled connection, is dropped, and goes again on a new one.
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
            echo(read_response(f))


def test_request_with_body_on_a_stale_connection_is_not_resent(proxy: RunningProxy) -> None:
    with connect(proxy) as s, s.makefile("rb") as f:
        s.sendall(b"GET /drop-next HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(f).status == 200
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        # It may have reached the upstream: not ours to repeat.
        assert read_response(f).status == 502
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        echo(read_response(f))


# ---------------------------------------------------------------------------
# Draining


def test_drain_closes_idle_keep_alive_and_marks_in_flight_responses(upstream: int) -> None:
    with run_proxy(static_destination=f"127.0.0.1:{upstream}", drain_seconds=30) as p:
        idle = connect(p)
        busy = connect(p)
        with idle, busy, idle.makefile("rb") as idle_f, busy.makefile("rb") as busy_f:
            idle.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
            echo(read_response(idle_f))
            busy.sendall(b"GET /slow?seconds=1.5 HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.3)
            assert p.request("POST", "/drain", on="admin")[0] == 202
            # The in-flight request completes, told that the connection ends.
            resp = read_response(busy_f)
            assert resp.status == 200 and resp.body == b"slow"
            assert resp.get("connection") == "close"
            assert busy_f.read() == b""
            # The idle one is closed without waiting out the drain time.
            assert idle_f.read() == b""
        p.wait_exit(timeout=15)


def test_random_garbage_after_a_request_line_never_takes_the_proxy_down(
    proxy: RunningProxy,
) -> None:
    rng = random.Random(1234)
    for i in range(60):
        junk = rng.randbytes(rng.randrange(1, 3000))
        if i % 3 == 0:
            junk = junk.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n\r\n"
        with connect(proxy) as s:
            s.settimeout(5)
            try:
                s.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n" + junk)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except OSError:
                pass
    still_serves(proxy)
    assert proxy.alive()
    assert "Traceback" not in proxy.log()
