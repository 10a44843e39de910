"""gRPC through a real `synchro-proxy` on loopback: retries on UNAVAILABLE and
per-request balancing over one HTTP/2 connection, with real grpcio servers and
a real grpcio client."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from proxy import config as pc
from tests.integration.grpc_support.service import (
    CHANNEL_OPTIONS,
    EchoClient,
    EchoService,
    GrpcServer,
)
from tests.integration.proxy_harness import RunningProxy, start_proxy
from tests.integration.traffic_harness import ConfigWriter, http_route, service, wait_version

pytestmark = pytest.mark.timeout(60)


class Unavailable(EchoService):
    """A pod that answers every Echo with UNAVAILABLE."""

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        context.abort(grpc.StatusCode.UNAVAILABLE, "pod is shutting down")
        raise AssertionError("abort raises")


class UnavailableServer(GrpcServer):
    def __init__(self) -> None:
        self.service = Unavailable()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            handlers=[self.service.handler()],
            options=CHANNEL_OPTIONS,
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")


def servers(n: int, *, broken: int = 0) -> list[GrpcServer]:
    return [UnavailableServer() if i < broken else GrpcServer() for i in range(n)]


@pytest.fixture
def grpc_servers() -> Iterator[list[GrpcServer]]:
    started: list[GrpcServer] = []
    yield started
    for s in started:
        s.__exit__(None, None, None)


def start(started: list[GrpcServer], n: int, broken: int = 0) -> list[GrpcServer]:
    for s in servers(n, broken=broken):
        s.__enter__()
        started.append(s)
    return started


def proxy_for(tmp: Path, svc: pc.Service) -> tuple[RunningProxy, str]:
    cfg = ConfigWriter(tmp / "proxy.json")
    version = cfg.write([svc])
    port = svc.ports[0].port
    proxy = start_proxy(
        static_destination=f"127.0.0.1:{port}", extra_args=[f"--config-file={cfg.path}"]
    )
    wait_version(proxy, version)
    return proxy, version


def test_unary_call_retried_on_unavailable(tmp_path: Path, grpc_servers: list[GrpcServer]) -> None:
    broken, good = start(grpc_servers, 2, broken=1)
    policy = pc.TrafficPolicy(
        load_balancer=pc.LoadBalancer("round_robin"),
        retry=pc.RetryPolicy(attempts=2, retry_on=("unavailable",)),
    )
    vip = ConfigWriter.vip_port()
    svc = service(
        "shop/echo",
        vip,
        [("127.0.0.1", broken.port), ("127.0.0.1", good.port)],
        protocol="grpc",
        policy=policy,
    )
    proxy, _ = proxy_for(tmp_path, svc)
    try:
        with EchoClient(f"127.0.0.1:{proxy.outbound[1]}") as client:
            answers = [client.echo(b"ping %d" % i, timeout=5) for i in range(40)]
    finally:
        proxy.stop()
    assert answers == [b"ping %d" % i for i in range(40)]
    # Round robin sent about half of the first attempts to the broken pod; each
    # of those was retried on the good one.
    assert broken.service.calls >= 15
    assert good.service.calls == 40


def test_unavailable_without_retries_reaches_the_client(
    tmp_path: Path, grpc_servers: list[GrpcServer]
) -> None:
    (broken,) = start(grpc_servers, 1, broken=1)
    vip = ConfigWriter.vip_port()
    svc = service("shop/echo", vip, [("127.0.0.1", broken.port)], protocol="grpc")
    proxy, _ = proxy_for(tmp_path, svc)
    try:
        with (
            EchoClient(f"127.0.0.1:{proxy.outbound[1]}") as client,
            pytest.raises(grpc.RpcError) as info,
        ):
            client.echo(b"x", timeout=5)
    finally:
        proxy.stop()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert broken.service.calls == 1


def test_per_request_balancing_over_one_http2_connection(
    tmp_path: Path, grpc_servers: list[GrpcServer]
) -> None:
    pods = start(grpc_servers, 3)
    vip = ConfigWriter.vip_port()
    policy = pc.TrafficPolicy(load_balancer=pc.LoadBalancer("round_robin"))
    svc = service(
        "shop/echo", vip, [("127.0.0.1", p.port) for p in pods], protocol="grpc", policy=policy
    )
    proxy, _ = proxy_for(tmp_path, svc)
    try:
        with EchoClient(f"127.0.0.1:{proxy.outbound[1]}") as client:
            for i in range(300):
                assert client.echo(b"%d" % i, timeout=5) == b"%d" % i
        listeners = proxy.admin_json("/listeners")
    finally:
        proxy.stop()
    assert [p.service.calls for p in pods] == [100, 100, 100]
    outbound = next(item for item in listeners if item["name"] == "outbound")
    assert outbound["accepted"] == 1  # one client connection carried all 300 calls


def test_grpc_timeout_expired_answers_deadline_exceeded(
    tmp_path: Path, grpc_servers: list[GrpcServer]
) -> None:
    (pod,) = start(grpc_servers, 1)
    vip = ConfigWriter.vip_port()
    svc = service("shop/echo", vip, [("127.0.0.1", pod.port)], protocol="grpc")
    proxy, _ = proxy_for(tmp_path, svc)
    try:
        with EchoClient(f"127.0.0.1:{proxy.outbound[1]}") as client:
            hang = client.channel.unary_unary("/synchro.test.Echo/Hang")
            # Hang is server-streaming upstream; as unary it never completes.
            with pytest.raises(grpc.RpcError) as info:
                hang(b"x", timeout=0.2)
    finally:
        proxy.stop()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_route_timeout_mid_stream_ends_the_call_with_deadline_exceeded(
    tmp_path: Path, grpc_servers: list[GrpcServer]
) -> None:
    """The proxy's own timer (a route timeout; the client sets no deadline) cuts a
    call whose response is streaming: the client must read DEADLINE_EXCEEDED from
    trailers, not CANCELLED from a bare RST_STREAM, and the server is cancelled."""
    (pod,) = start(grpc_servers, 1)
    vip = ConfigWriter.vip_port()
    route = http_route("shop/echo", [("shop/echo", vip, 1)], timeouts=pc.RouteTimeouts(request=0.3))
    svc = service("shop/echo", vip, [("127.0.0.1", pod.port)], protocol="grpc", routes=[route])
    proxy, _ = proxy_for(tmp_path, svc)
    try:
        with EchoClient(f"127.0.0.1:{proxy.outbound[1]}") as client:
            hang = client.channel.unary_stream("/synchro.test.Echo/Hang")
            received: list[bytes] = []
            with pytest.raises(grpc.RpcError) as info:
                for message in hang(b"x"):
                    received.append(message)
    finally:
        proxy.stop()
    assert received == [b"started"]
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
    assert pod.service.cancelled.wait(5)
