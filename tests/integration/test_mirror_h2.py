"""RequestMirror over HTTP/2 and gRPC through a real `synchro-proxy` on loopback:
real clients (h2load, curl --http2-prior-knowledge, grpcio), real h2c and gRPC
upstreams. Copies hit their percentage, carry the request body, are dropped
past the body limit, and a slow or dead mirror costs the primary nothing."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from proxy import config as pc
from proxy.engine import MAX_MIRRORS_IN_FLIGHT
from tests.integration.grpc_support.service import EchoClient, GrpcServer
from tests.integration.h2record import RecordingH2Server
from tests.integration.proxy_harness import RunningProxy, free_port, start_proxy
from tests.integration.traffic_harness import ConfigWriter, http_route, service, wait_version

pytestmark = pytest.mark.timeout(90)

VIP = 80


def mirror(target: str, percent: float = 100.0) -> pc.Filter:
    return pc.Filter(
        "RequestMirror", request_mirror=pc.RequestMirror(service=target, port=VIP, percent=percent)
    )


def mesh(
    tmp: Path,
    primary: int,
    mirrors: Sequence[tuple[pc.Filter, str, int]],
    *,
    protocol: str = "http2",
) -> RunningProxy:
    """A proxy whose destination is shop/web (endpoint `primary`), whose route
    mirrors to the listed services (name, endpoint port)."""
    vip = ConfigWriter.vip_port()
    route = http_route(
        "shop/web", [("shop/web", vip, 1)], filters=[f for f, _, _ in mirrors], kind="http"
    )
    services = [
        service("shop/web", vip, [("127.0.0.1", primary)], protocol=protocol, routes=[route])
    ]
    for i, (_, name, port) in enumerate(mirrors):
        services.append(
            service(
                name,
                VIP,
                [("127.0.0.1", port)],
                protocol=protocol,
                cluster_ip=f"10.96.0.{60 + i}",
            )
        )
    cfg = ConfigWriter(tmp / "proxy.json")
    version = cfg.write(services)
    proxy = start_proxy(
        static_destination=f"127.0.0.1:{vip}",
        extra_args=[f"--config-file={cfg.path}", "--access-log=json"],
    )
    wait_version(proxy, version)
    return proxy


@pytest.fixture
def proxies() -> Iterator[list[RunningProxy]]:
    started: list[RunningProxy] = []
    yield started
    for p in started:
        p.stop()


def h2load(port: int, n: int, *, body: Path | None = None, path: str = "/m") -> dict[str, int]:
    args = ["h2load", "-n", str(n), "-c", "4", "-m", "8"]
    if body is not None:
        args += ["-d", str(body)]
    done = subprocess.run(
        [*args, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", done.stdout)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", done.stdout)
    assert m and codes, done.stdout
    return {"done": int(m[2]), "succeeded": int(m[3]), "2xx": int(codes[1]), "5xx": int(codes[4])}


def settle(read: Callable[[], int], timeout: float = 3.0) -> int:
    """The value of `read()` once it stopped changing (copies are fire-and-forget)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_h2load_posts_are_mirrored_at_their_percentage_with_their_body(
    tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    body = tmp_path / "body.bin"
    payload = bytes(range(256)) * 12  # 3 KiB
    body.write_bytes(payload)
    with RecordingH2Server() as web, RecordingH2Server(mode="fail") as shadow:
        proxy = mesh(
            tmp_path, web.port, [(mirror("shop/shadow", 30.0), "shop/shadow", shadow.port)]
        )
        proxies.append(proxy)
        out = h2load(proxy.outbound[1], 2000, body=body)
        copies = settle(lambda: shadow.count)
        assert out["2xx"] == 2000 and out["succeeded"] == 2000, out  # the mirror's 500s ignored
        assert web.count == 2000
        assert abs(copies / 2000 - 0.30) <= 0.03, copies
        assert {b for _, b in shadow.completed} == {payload}
        assert {p for p, _ in shadow.completed} == {"/m"}


def test_grpc_calls_are_mirrored_at_their_percentage(
    tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    with GrpcServer() as main, GrpcServer() as shadow:
        proxy = mesh(
            tmp_path,
            main.port,
            [(mirror("shop/shadow", 25.0), "shop/shadow", shadow.port)],
            protocol="grpc",
        )
        proxies.append(proxy)
        with EchoClient(f"127.0.0.1:{proxy.outbound[1]}") as client:
            answers = [client.echo(b"call %d" % i, timeout=5) for i in range(1000)]
        copies = settle(lambda: shadow.service.calls)
    assert answers == [b"call %d" % i for i in range(1000)]
    assert main.service.calls == 1000
    assert abs(copies / 1000 - 0.25) <= 0.05, copies


def test_slow_and_dead_mirrors_cost_the_primary_nothing(
    tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    dead = free_port()  # nothing listens there
    with RecordingH2Server() as web, RecordingH2Server(mode="hold") as slow:
        proxy = mesh(
            tmp_path,
            web.port,
            [
                (mirror("shop/slow"), "shop/slow", slow.port),
                (mirror("shop/dead"), "shop/dead", dead),
            ],
        )
        proxies.append(proxy)
        out = h2load(proxy.outbound[1], 400)
        held = settle(lambda: slow.count)
    assert out["2xx"] == 400, out
    assert web.count == 400
    # Copies that never get an answer hold their place until MIRROR_TIMEOUT: the
    # number in flight is bounded, later ones are skipped rather than queued.
    assert 1 <= held <= MAX_MIRRORS_IN_FLIGHT, held


def test_bodies_over_the_limit_are_not_mirrored_and_curl_prior_knowledge(
    tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (100 * 1024))
    with RecordingH2Server() as web, RecordingH2Server() as shadow:
        proxy = mesh(tmp_path, web.port, [(mirror("shop/shadow"), "shop/shadow", shadow.port)])
        proxies.append(proxy)
        out = h2load(proxy.outbound[1], 20, body=big, path="/big")
        assert out["2xx"] == 20, out
        url = f"http://127.0.0.1:{proxy.outbound[1]}/small"
        done = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
             "--data-binary", "hello mirror", url],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert done.stdout == "200", done.stderr
        settle(lambda: shadow.count)
    assert [len(b) for p, b in web.completed if p == "/big"] == [100 * 1024] * 20
    # The 100 KiB bodies were over the 64 KiB buffer: no copy; the small one was copied.
    assert shadow.completed == [("/small", b"hello mirror")]
