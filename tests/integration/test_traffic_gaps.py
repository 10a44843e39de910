"""TrafficPolicy pending requests, connect and idle timeouts, and the route
request timeout over the whole exchange, through a real `synchro-proxy` on
loopback, HTTP/1.1 and HTTP/2, with numbers.

A connect that never completes: a listening socket with a full accept queue
(backlog 0, one connection parked in it) drops further SYNs, so connects to it
hang until the client gives up.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import config as pc
from tests.integration.grpc_support.h2server import H2Client
from tests.integration.h2record import RecordingH2Server
from tests.integration.proxy_harness import BackgroundServer
from tests.integration.traffic_harness import (
    Behaviour,
    Client,
    ConfiguredProxy,
    Upstream,
    http_route,
    service,
)

pytestmark = pytest.mark.timeout(90)


class Mesh(ConfiguredProxy):
    """The proxy with one service, shop/web, at its static destination."""

    def web(
        self,
        endpoints: list[Any],
        policy: pc.TrafficPolicy | None = None,
        *,
        routes: list[pc.Route] | None = None,
        protocol: str = "http",
    ) -> None:
        self.apply(
            [
                service(
                    "shop/web",
                    self.vip,
                    endpoints,
                    policy=policy,
                    routes=routes or (),
                    protocol=protocol,
                )
            ]
        )

    def flags(self) -> list[str]:
        return [str(entry.get("response_flags")) for entry in self.access_log()]

    def breaker(self) -> dict[str, int]:
        assert self.proxy is not None
        services = self.proxy.admin_json("/config_dump")["traffic"]["services"]
        return dict(services["shop/web"].get("breaker_in_use", {}))

    def service_dump(self) -> dict[str, Any]:
        assert self.proxy is not None
        return dict(self.proxy.admin_json("/config_dump")["traffic"]["services"]["shop/web"])

    def metric(self, flag: str) -> float:
        assert self.proxy is not None
        _, body = self.proxy.get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith("synchro_requests_total{") and f'response_flags="{flag}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.close()


class Blackhole:
    """A port whose connects hang (full accept queue)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.port = self.server.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=2)

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.filler.close()
        self.server.close()


class CountingUpstream(Upstream):
    """An `Upstream` that counts the connections it accepted and saw closed."""

    def __init__(self, name: str, behaviour: Behaviour | None = None) -> None:
        self.connections = 0
        self.closed = 0
        super().__init__(name, behaviour)

    def __enter__(self) -> CountingUpstream:
        super().__enter__()
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await super()._handle(reader, writer)
        finally:
            self.closed += 1


def until(check: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return bool(check())


# --- maxPendingRequests --------------------------------------------------------------------


def test_http1_pending_requests_wait_and_overflow_answers_503_uo(mesh: Mesh) -> None:
    breaker = pc.CircuitBreaker(max_connections=1, max_pending_requests=1)
    with Upstream("slow", Behaviour(delay=0.6)) as slow:
        mesh.web([slow], pc.TrafficPolicy(circuit_breaker=breaker))
        answers: dict[str, tuple[int, float]] = {}

        def get(name: str) -> None:
            with Client(mesh.address) as c:
                t0 = time.perf_counter()
                status = c.get(f"/{name}")[0]
                answers[name] = (status, time.perf_counter() - t0)

        active = threading.Thread(target=get, args=("active",))
        active.start()
        assert until(lambda: slow.hits == 1)
        pending = threading.Thread(target=get, args=("pending",))
        pending.start()
        assert until(lambda: mesh.breaker().get("maxPendingRequests") == 1)
        times = []
        with Client(mesh.address) as c:
            for _ in range(5):
                t0 = time.perf_counter()
                status = c.get("/over")[0]
                times.append(time.perf_counter() - t0)
                assert status == 503
            # Still one active and one waiting while the overflow was refused.
            assert mesh.breaker().get("maxPendingRequests") == 1
        active.join(5)
        pending.join(5)
    assert answers["active"][0] == 200
    assert answers["pending"][0] == 200  # it waited for the connection, then got it
    assert answers["pending"][1] >= 0.9  # (its own 0.6 s behind the active one's)
    assert slow.hits == 2
    assert sorted(times)[2] < 0.05, times  # the median: at once, not after the 0.6 s wait
    assert until(lambda: mesh.flags().count("UO") == 5)
    assert mesh.breaker() == {
        "maxConnections": 0,
        "maxPendingRequests": 0,
        "maxRequests": 0,
        "maxRetries": 0,
    }


def test_http2_pending_requests_wait_and_overflow_answers_503_uo(mesh: Mesh) -> None:
    breaker = pc.CircuitBreaker(max_connections=1, max_pending_requests=1)
    with RecordingH2Server() as web:
        mesh.web(
            [("127.0.0.1", web.port)], pc.TrafficPolicy(circuit_breaker=breaker), protocol="http2"
        )
        with H2Client(mesh.address[1]) as c:
            active = c.request("/slow-body/600")
            c.pump(lambda: bool(c.streams[active].headers))
            waiting = c.request("/slow-body/100")
            assert until(lambda: mesh.breaker().get("maxPendingRequests") == 1)
            over = c.request("/over")
            c.pump(lambda: c.streams[over].done)
            assert c.streams[over].status == 503
            assert not c.streams[waiting].done  # still waiting for the connection slot
            c.pump(lambda: c.streams[active].done and c.streams[waiting].done)
            results = [c.streams[active], c.streams[waiting]]
    assert [r.status for r in results] == [200, 200]
    assert [bytes(r.body) for r in results] == [b"first piece;the rest"] * 2
    assert until(lambda: "UO" in mesh.flags())
    assert [p for p, _ in web.completed].count("/over") == 0


# --- connect timeout ----------------------------------------------------------------------


def test_connect_timeout_answers_503_uf_and_counts_for_outlier_detection(mesh: Mesh) -> None:
    timeouts = pc.Timeouts(connect=0.2)
    with Blackhole() as hole, Upstream("good") as good:
        mesh.web([("127.0.0.1", hole.port)], pc.TrafficPolicy(timeouts=timeouts))
        with Client(mesh.address) as c:
            t0 = time.perf_counter()
            status, _, _ = c.get("/")
            elapsed = time.perf_counter() - t0
        assert status == 503
        assert 0.2 <= elapsed < 2.0, elapsed  # the service's 0.2 s, not the proxy's 5 s
        assert until(lambda: "UF" in "".join(mesh.flags())), mesh.flags()
        # Two endpoints, one unreachable: connect timeouts are gateway errors to the
        # outlier detector; the default retry (never reached an upstream) hides them.
        policy = pc.TrafficPolicy(
            timeouts=timeouts,
            load_balancer=pc.LoadBalancer("round_robin"),
            outlier_detection=pc.OutlierDetection(
                consecutive_gateway_errors=2, base_ejection_time=30.0, max_ejection_percent=50.0
            ),
        )
        mesh.web([("127.0.0.1", hole.port), good], policy)
        with Client(mesh.address) as c:
            statuses = [c.get("/")[0] for _ in range(20)]
        assert statuses == [200] * 20
        assert mesh.service_dump()["ejections_total"] == 1
        assert good.hits == 20


def test_http2_connect_timeout_answers_503(mesh: Mesh) -> None:
    with Blackhole() as hole:
        mesh.web(
            [("127.0.0.1", hole.port)],
            pc.TrafficPolicy(timeouts=pc.Timeouts(connect=0.2)),
            protocol="http2",
        )
        with H2Client(mesh.address[1]) as c:
            t0 = time.perf_counter()
            result = c.get("/")
            elapsed = time.perf_counter() - t0
    assert result.status == 503
    assert elapsed < 2.0, elapsed
    assert until(lambda: "UF" in "".join(mesh.flags())), mesh.flags()


# --- idle timeouts --------------------------------------------------------------------------


def test_http1_idle_timeout_closes_pooled_upstream_and_idle_client_connections(
    mesh: Mesh,
) -> None:
    with CountingUpstream("web") as web:
        mesh.web([web], pc.TrafficPolicy(timeouts=pc.Timeouts(idle=0.3)))
        sock = socket.create_connection(mesh.address, timeout=5)
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            # The client's keep-alive connection, idle, is closed by the proxy...
            t0 = time.perf_counter()
            assert sock.recv(65536) == b""
            assert time.perf_counter() - t0 < 3.0
        finally:
            sock.close()
        # ...and so is the pooled upstream connection the request used.
        assert until(lambda: web.closed == 1)
        with Client(mesh.address) as c:
            assert c.get("/")[0] == 200
        assert web.connections == 2  # a new one: the idle one had expired


def test_http2_idle_timeout_closes_pooled_upstream_and_idle_client_connections(
    mesh: Mesh,
) -> None:
    with RecordingH2Server() as web:
        mesh.web(
            [("127.0.0.1", web.port)],
            pc.TrafficPolicy(timeouts=pc.Timeouts(idle=0.3)),
            protocol="http2",
        )
        with H2Client(mesh.address[1]) as c:
            assert c.get("/hello").status == 200
            assert web.connections == 1
            # The proxy says goodbye to an idle client (GOAWAY, then it closes)...
            c.pump(lambda: c.goaway is not None, timeout=3)
        # ...and closes its idle upstream connection.
        assert until(lambda: web.closed == 1)


# --- the route request timeout covers the response body -----------------------------------


async def _stalling_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with a 20-byte body whose second half comes after 2 s;
    `/quick` gets it all at once."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nfirst piece;")
            await writer.drain()
            if not head.startswith(b"GET /quick"):
                await asyncio.sleep(2.0)
            writer.write(b"the rest")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def _route(timeout: float, vip: int) -> pc.Route:
    return http_route(
        "shop/web", [("shop/web", vip, 1)], timeouts=pc.RouteTimeouts(request=timeout)
    )


def test_http1_request_timeout_cuts_a_streaming_body_ut(mesh: Mesh) -> None:
    with BackgroundServer(_stalling_body) as up:
        mesh.web([("127.0.0.1", up.port)], routes=[_route(0.5, mesh.vip)])
        with Client(mesh.address) as c:
            assert c.get("/quick") == (200, {"content-length": "20"}, b"first piece;the rest")
        sock = socket.create_connection(mesh.address, timeout=5)
        received = b""
        try:
            sock.sendall(b"GET /stall HTTP/1.1\r\nHost: web\r\n\r\n")
            t0 = time.perf_counter()
            while chunk := sock.recv(65536):
                received += chunk
            elapsed = time.perf_counter() - t0
        finally:
            sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 20" in head
    assert body == b"first piece;"  # closed after the partial body
    assert 0.4 <= elapsed < 1.9, elapsed
    assert until(lambda: mesh.flags() == ["-", "UT"])
    assert mesh.metric("UT") == 1


def test_http2_request_timeout_resets_a_streaming_body_ut(mesh: Mesh) -> None:
    with RecordingH2Server() as web:
        mesh.web([("127.0.0.1", web.port)], routes=[_route(0.5, mesh.vip)], protocol="http2")
        with H2Client(mesh.address[1]) as c:
            quick = c.get("/slow-body/50")
            cut = c.get("/slow-body/2000")
    assert (quick.status, bytes(quick.body), quick.reset) == (200, b"first piece;the rest", None)
    assert cut.status == 200 and bytes(cut.body) == b"first piece;"
    assert cut.reset == 8  # RST_STREAM(CANCEL)
    assert until(lambda: web.resets == 1)  # the upstream stream was reset too
    assert until(lambda: mesh.flags() == ["-", "UT"])
    assert re.fullmatch(r"1(\.0)?", str(mesh.metric("UT")))
