"""Traffic management through a real `synchro-proxy` on loopback, HTTP/1.1.

Real upstream servers, a real keep-alive client, the config fed through
`--config-file` (the controller's JSON). Every behaviour is asserted with
numbers; see tests/netns/test_traffic_netns.py for the same in network
namespaces with real ClusterIPs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import config as pc
from tests.integration.proxy_harness import run_proxy
from tests.integration.traffic_harness import (
    Behaviour,
    Client,
    ConfigWriter,
    Upstream,
    http_route,
    load,
    service,
    share,
    wait_version,
)
from tests.integration.traffic_harness import (
    ConfiguredProxy as Mesh,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.close()


def ok_ratio(results: list[tuple[int, str]]) -> float:
    return sum(1 for s, _ in results if s == 200) / len(results)


# --- routing ----------------------------------------------------------------------------


def test_canary_90_10_split_over_2000_requests(mesh: Mesh) -> None:
    with Upstream("stable") as s, Upstream("canary") as c:
        mesh.apply(
            [
                service(
                    "shop/web",
                    mesh.vip,
                    [s],
                    routes=[
                        http_route("shop/web", [("shop/web-v1", 80, 90), ("shop/web-v2", 80, 10)])
                    ],
                ),
                service("shop/web-v1", 80, [s], cluster_ip="10.96.0.11"),
                service("shop/web-v2", 80, [c], cluster_ip="10.96.0.12"),
            ]
        )
        results = load(mesh.address, 2000, concurrency=8)
    assert ok_ratio(results) == 1.0
    canary = share(results)["canary"] / len(results)
    assert abs(canary - 0.10) <= 0.03, canary


def test_blue_green_switch_under_load_fails_no_request(mesh: Mesh) -> None:
    with Upstream("blue") as blue, Upstream("green") as green:

        def services(blue_weight: int, green_weight: int) -> list[pc.Service]:
            return [
                service(
                    "shop/web",
                    mesh.vip,
                    [blue],
                    routes=[
                        http_route(
                            "shop/web",
                            [("shop/blue", 80, blue_weight), ("shop/green", 80, green_weight)],
                        )
                    ],
                ),
                service("shop/blue", 80, [blue], cluster_ip="10.96.0.21"),
                service("shop/green", 80, [green], cluster_ip="10.96.0.22"),
            ]

        mesh.apply(services(100, 0))
        results: list[tuple[int, str]] = []
        stop = threading.Event()

        def steady() -> None:
            with Client(mesh.address) as c:
                while not stop.is_set():
                    try:
                        status, hdrs, _ = c.get("/")
                    except OSError:
                        status, hdrs = 0, {}
                    results.append((status, hdrs.get("x-upstream", "")))

        threads = [threading.Thread(target=steady) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            mesh.apply(services(0, 100))
            switched_at = len(results)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    assert len(results) > 200
    assert all(status == 200 for status, _ in results), Counter(s for s, _ in results)
    before, after = results[: switched_at // 2], results[switched_at + 100 :]
    assert {name for _, name in before} == {"blue"}
    assert after and {name for _, name in after} == {"green"}


def test_filters_redirect_rewrite_headers_and_path_match(mesh: Mesh) -> None:
    with Upstream("api") as api, Upstream("web") as web:
        routes = [
            http_route(
                "shop/web",
                [],
                name="old",
                match=pc.RouteMatch(path=pc.PathMatch("PathPrefix", "/old")),
                filters=[
                    pc.Filter(
                        "RequestRedirect",
                        request_redirect=pc.RequestRedirect(
                            path=pc.PathModifier("ReplacePrefixMatch", "/new"), status_code=301
                        ),
                    )
                ],
            ),
            http_route(
                "shop/web",
                [("shop/api", 80, 1)],
                name="api",
                match=pc.RouteMatch(path=pc.PathMatch("PathPrefix", "/api")),
                filters=[
                    pc.Filter(
                        "URLRewrite",
                        url_rewrite=pc.URLRewrite(
                            hostname="api.internal",
                            path=pc.PathModifier("ReplacePrefixMatch", "/v2"),
                        ),
                    ),
                    pc.Filter(
                        "RequestHeaderModifier",
                        request_header_modifier=pc.HeaderModifier(
                            set=pc.frozen_map({"x-env": "prod"}), remove=("x-secret",)
                        ),
                    ),
                    pc.Filter(
                        "ResponseHeaderModifier",
                        response_header_modifier=pc.HeaderModifier(
                            add=pc.frozen_map({"x-routed": "api"})
                        ),
                    ),
                ],
            ),
            http_route("shop/web", [("shop/web", mesh.vip, 1)], name="rest"),
        ]
        mesh.apply(
            [
                service("shop/web", mesh.vip, [web], routes=routes),
                service("shop/api", 80, [api], cluster_ip="10.96.0.31"),
            ]
        )
        with Client(mesh.address) as c:
            status, hdrs, _ = c.get("/old/page?q=1")
            assert status == 301
            assert hdrs["location"] == "http://web/new/page?q=1"
            status, hdrs, body = c.get("/api/items?id=7", {"x-secret": "s", "x-env": "dev"})
            assert (status, body) == (200, b"api /v2/items?id=7\n")
            assert hdrs["x-routed"] == "api"
            seen = api.seen[-1]
            assert seen.headers["host"] == "api.internal"
            assert seen.headers["x-env"] == "prod"
            assert "x-secret" not in seen.headers
            status, _, body = c.get("/other")
            assert (status, body) == (200, b"web /other\n")


def test_registry_only_refuses_unknown_destinations(tmp_path: Path) -> None:
    with Upstream("x") as x:
        cfg = ConfigWriter(tmp_path / "proxy.json", outbound_policy="REGISTRY_ONLY")
        version = cfg.write([service("shop/other", 80, [x], cluster_ip="10.96.0.41")])
        with run_proxy(
            static_destination=f"127.0.0.1:{x.port + 0}",
            extra_args=[f"--config-file={cfg.path}"],
        ) as proxy:
            wait_version(proxy, version)
            # x's own address is a known endpoint; an unknown port is not.
            with Client(proxy.outbound) as c:
                assert c.get("/")[0] == 200
            cfg.write([])
            time.sleep(0.6)
            with Client(proxy.outbound) as c:
                status, _, body = c.get("/")
            assert status == 502
            assert b"REGISTRY_ONLY" in body


# --- balancing, retries, outliers ----------------------------------------------------------------


def test_ewma_sends_90_percent_to_the_fast_endpoint(mesh: Mesh) -> None:
    with (
        Upstream("fast", Behaviour(delay=0.004)) as fast,
        Upstream("slow", Behaviour(delay=0.040)) as slow,
    ):
        mesh.apply([service("shop/web", mesh.vip, [fast, slow])])
        results = load(mesh.address, 600, concurrency=4)
    assert ok_ratio(results) == 1.0
    assert share(results)["fast"] / len(results) >= 0.90, share(results)


def test_30_percent_failing_backend_seen_at_995_with_retries(mesh: Mesh) -> None:
    policy = pc.TrafficPolicy(
        retry=pc.RetryPolicy(attempts=5, retry_on=("5xx",), budget=pc.RetryBudget(percent=100.0))
    )
    with (
        Upstream("a", Behaviour(fail_ratio=0.3, seed=1)) as a,
        Upstream("b", Behaviour(fail_ratio=0.3, seed=2)) as b,
    ):
        mesh.apply([service("shop/web", mesh.vip, [a, b], policy=policy)])
        results = load(mesh.address, 1000, concurrency=8)
        upstream_hits = a.hits + b.hits
    assert ok_ratio(results) >= 0.995, Counter(s for s, _ in results)
    assert upstream_hits > 1200  # the retries really happened


def test_all_500_endpoint_is_ejected_then_readmitted(mesh: Mesh) -> None:
    policy = pc.TrafficPolicy(
        load_balancer=pc.LoadBalancer("round_robin"),
        outlier_detection=pc.OutlierDetection(
            consecutive_5xx_errors=3,
            interval=0.2,
            base_ejection_time=1.5,
            max_ejection_percent=50.0,
        ),
    )
    with Upstream("good") as good, Upstream("bad", Behaviour(status=500)) as bad:
        mesh.apply([service("shop/web", mesh.vip, [good, bad], policy=policy)])
        with Client(mesh.address) as c:
            statuses = [c.get("/")[0] for _ in range(20)]
            assert statuses.count(500) == 3  # the third consecutive 500 ejects it
            ejected_at = time.monotonic()
            hits = bad.hits
            while time.monotonic() - ejected_at < 1.2:
                assert c.get("/")[0] == 200
            assert bad.hits == hits  # no traffic while ejected
            time.sleep(0.5)
            statuses = [c.get("/")[0] for _ in range(10)]
        assert bad.hits > hits  # back after the ejection time
        assert 500 in statuses


def test_retry_budget_holds_upstream_requests_to_1_3x(mesh: Mesh) -> None:
    policy = pc.TrafficPolicy(retry=pc.RetryPolicy(attempts=5, retry_on=("5xx",)))
    with Upstream("a", Behaviour(status=503)) as a, Upstream("b", Behaviour(status=503)) as b:
        mesh.apply([service("shop/web", mesh.vip, [a, b], policy=policy)])
        results = load(mesh.address, 2000, concurrency=8)
        upstream = a.hits + b.hits
    assert all(s == 503 for s, _ in results)
    assert upstream <= 1.3 * len(results), upstream
    assert upstream > len(results)  # some retries were allowed


def test_deadline_50ms_not_retried_past_it_and_504(mesh: Mesh) -> None:
    policy = pc.TrafficPolicy(retry=pc.RetryPolicy(attempts=3, retry_on=("5xx", "reset")))
    with Upstream("slow", Behaviour(delay=0.4)) as slow:
        mesh.apply([service("shop/web", mesh.vip, [slow], policy=policy)])
        with Client(mesh.address) as c:
            t0 = time.perf_counter()
            status, _, _ = c.get("/", {"synchro-deadline-ms": "50"})
            elapsed = time.perf_counter() - t0
        time.sleep(0.5)
        assert status == 504
        assert elapsed < 0.3
        assert slow.hits == 1
        assert int(slow.seen[0].headers["synchro-deadline-ms"]) <= 50
    entry = [e for e in mesh.access_log() if e.get("status") == 504][-1]
    assert "DX" in str(entry.get("response_flags"))


def test_breaker_answers_503_at_once_when_its_limit_is_reached(mesh: Mesh) -> None:
    policy = pc.TrafficPolicy(circuit_breaker=pc.CircuitBreaker(max_requests=1))
    with Upstream("slow", Behaviour(delay=0.5)) as slow:
        mesh.apply([service("shop/web", mesh.vip, [slow], policy=policy)])
        first: list[int] = []
        with Client(mesh.address) as c, Client(mesh.address) as c2:
            c2.get("/warm")  # connected and warm: time only the answer
            t = threading.Thread(target=lambda: first.append(c.get("/")[0]))
            t.start()
            deadline = time.monotonic() + 2
            while slow.hits < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                status, _, _ = c2.get("/")
                times.append(time.perf_counter() - t0)
                assert status == 503
            t.join(5)
    assert first == [200]
    assert min(times) < 0.005, times
    assert [e for e in mesh.access_log() if "UO" in str(e.get("response_flags", ""))]


# --- faults, mirrors, inbound -------------------------------------------------------------


def test_fault_abort_and_delay_hit_their_percentages(mesh: Mesh) -> None:
    policy = pc.TrafficPolicy(
        fault_injection=pc.FaultInjection(
            delay=pc.FaultDelay(fixed_delay=0.05, percentage=20.0),
            abort=pc.FaultAbort(http_status=418, percentage=25.0),
        )
    )
    with Upstream("a") as a:
        mesh.apply([service("shop/web", mesh.vip, [a], policy=policy)])
        slow: list[bool] = []
        results = load(
            mesh.address,
            1000,
            concurrency=16,
            on_result=lambda status, h, dt: slow.append(status == 200 and dt >= 0.05),
        )
    statuses = Counter(s for s, _ in results)
    assert abs(statuses[418] / 1000 - 0.25) <= 0.05, statuses
    assert set(statuses) == {200, 418}
    # Delays apply to 20% of all requests, aborted or not; count them among the 200s.
    delayed = sum(slow) / statuses[200]
    assert abs(delayed - 0.20) <= 0.05, delayed


def test_mirror_copies_its_percentage_and_ignores_the_answers(mesh: Mesh) -> None:
    with Upstream("main") as main, Upstream("shadow", Behaviour(status=500)) as shadow:
        mirror = pc.Filter(
            "RequestMirror",
            request_mirror=pc.RequestMirror(service="shop/shadow", port=80, percent=40.0),
        )
        mesh.apply(
            [
                service(
                    "shop/web",
                    mesh.vip,
                    [main],
                    routes=[http_route("shop/web", [("shop/web", mesh.vip, 1)], filters=[mirror])],
                ),
                service("shop/shadow", 80, [shadow], cluster_ip="10.96.0.51"),
            ]
        )
        results = load(mesh.address, 1000, concurrency=8)
        time.sleep(0.3)
        mirrored = shadow.hits
    assert ok_ratio(results) == 1.0
    assert abs(mirrored / 1000 - 0.40) <= 0.05, mirrored


def test_inbound_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    with Upstream("app") as app:
        cfg = ConfigWriter(tmp_path / "proxy.json", inbound_services=("shop/web",))
        policy = pc.TrafficPolicy(rate_limit=pc.RateLimit(requests_per_second=5, burst=5))
        version = cfg.write([service("shop/web", app.port, [app], policy=policy)])
        with run_proxy(
            static_destination=f"127.0.0.1:{app.port}",
            extra_args=[f"--config-file={cfg.path}"],
        ) as proxy:
            wait_version(proxy, version)
            with Client(proxy.inbound) as c:
                answers = [c.get("/") for _ in range(20)]
    statuses = Counter(s for s, _, _ in answers)
    assert statuses[200] in (5, 6), statuses  # the burst (and at most one refill)
    assert statuses[429] == 20 - statuses[200]
    limited = next(h for s, h, _ in answers if s == 429)
    assert int(limited["retry-after"]) >= 1
    assert app.hits == statuses[200]
