"""controlplane.golden: expositions of real ProxyMetrics in, exact figures out."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from controlplane.golden import (
    GoldenError,
    Key,
    Scrape,
    TargetSample,
    compute,
    parse_exposition,
    quantile,
    success,
)
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.record import RequestRecord


class FakeProxy:
    """A proxy's metrics registry fed with records, as the data path feeds it."""

    def __init__(self, namespace: str, workload: str) -> None:
        self.metrics = ProxyMetrics()
        self.namespace, self.workload = namespace, workload

    def outbound(
        self, service: str, n: int, *, duration: float, status: int = 200, grpc: str = ""
    ) -> None:
        for _ in range(n):
            rec = RequestRecord("source", "grpc" if grpc else "http", 0.0)
            rec.source_workload, rec.source_namespace = self.workload, self.namespace
            rec.destination_service = service
            rec.status, rec.grpc_status, rec.duration = status, grpc, duration
            self.metrics.observe_request(rec)

    def inbound(
        self, n: int, *, duration: float, status: int = 200, source: str = "", service: str = ""
    ) -> None:
        for _ in range(n):
            rec = RequestRecord("destination", "http", 0.0)
            rec.destination_workload, rec.destination_namespace = self.workload, self.namespace
            rec.source_workload = source
            rec.source_namespace = self.namespace if source else ""
            rec.destination_service = service
            rec.status, rec.duration = status, duration
            self.metrics.observe_request(rec)

    def sample(self) -> TargetSample:
        return parse_exposition(generate_latest(self.metrics.registry).decode())


def scrape(time: float, **proxies: FakeProxy) -> Scrape:
    return Scrape(time, {name: p.sample() for name, p in proxies.items()})


def by_edge(g: object) -> dict[tuple[str, str], dict[str, object]]:
    return {(e["source"], e["destination"]): e for e in g.graph_json()["edges"]}  # type: ignore[attr-defined]


def by_service(g: object) -> dict[str, dict[str, object]]:
    return {
        f"{s['namespace']}/{s['name']}": s
        for s in g.services_json()["services"]  # type: ignore[attr-defined]
    }


# --- parsing ------------------------------------------------------------------------------

EXPOSITION = """\
# HELP synchro_requests_total Requests handled
# TYPE synchro_requests_total counter
synchro_requests_total{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="200",grpc_status=""} 7.0
synchro_requests_total{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="503",grpc_status=""} 2.0
synchro_requests_total{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="200",grpc_status="14"} 3.0
synchro_requests_total{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="0",grpc_status=""} 1.0
# TYPE synchro_request_duration_seconds histogram
synchro_request_duration_seconds_bucket{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="200",grpc_status="",le="0.1"} 5.0
synchro_request_duration_seconds_bucket{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="200",grpc_status="",le="+Inf"} 7.0
synchro_request_duration_seconds_count{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="200",grpc_status="",le="+Inf"} 7.0
synchro_request_duration_seconds_bucket{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="503",grpc_status="",le="0.1"} 0.0
synchro_request_duration_seconds_bucket{reporter="source",source_workload="web",source_namespace="shop",destination_service="shop/api",destination_workload="",destination_namespace="",response_code="503",grpc_status="",le="+Inf"} 2.0
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
"""


def test_parse_sums_series_by_key_and_success() -> None:
    sample = parse_exposition(EXPOSITION)
    key = Key("source", "shop", "web", "", "shop/api", "")
    assert sample.requests == {(key, True): 7.0, (key, False): 6.0}
    assert sample.latency == {key: {0.1: 5.0, math.inf: 9.0}}


@pytest.mark.parametrize(
    ("code", "grpc", "ok"),
    [
        ("200", "", True),
        ("404", "", True),
        ("500", "", False),
        ("599", "", False),
        ("0", "", False),
        ("200", "0", True),
        ("200", "OK", True),
        ("200", "14", False),
        ("abc", "", False),
    ],
)
def test_success(code: str, grpc: str, ok: bool) -> None:
    assert success(code, grpc) is ok


@pytest.mark.parametrize(
    "text",
    [
        'synchro_requests_total{reporter="source" 1\n',
        "synchro_requests_total{} not-a-number\n",
        'synchro_request_duration_seconds_bucket{le="x"} 1\n',
    ],
)
def test_bad_exposition_is_a_golden_error(text: str) -> None:
    with pytest.raises(GoldenError):
        parse_exposition(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_parses_or_is_a_golden_error(text: str) -> None:
    with contextlib.suppress(GoldenError):
        parse_exposition("synchro_requests_total" + text)


# --- quantiles ------------------------------------------------------------------------------


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = {0.1: 10.0, 0.5: 20.0, 1.0: 30.0, math.inf: 30.0}
    assert quantile(0.5, buckets) == pytest.approx(0.3)
    assert quantile(0.99, buckets) == pytest.approx(0.985)
    assert quantile(0.25, buckets) == pytest.approx(0.1 * 7.5 / 10)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert quantile(0.99, {0.1: 1.0, 0.5: 2.0, math.inf: 10.0}) == 0.5


def test_quantile_without_observations_is_none() -> None:
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {math.inf: 3.0}) is None


# --- golden metrics between two scrapes -------------------------------------------------------


def test_rates_success_and_latency_over_the_window() -> None:
    web = FakeProxy("shop", "web")
    web.outbound("shop/api", 10, duration=0.004)  # before the window
    old = scrape(100.0, web=web)
    web.outbound("shop/api", 95, duration=0.004)
    web.outbound("shop/api", 5, duration=0.2, status=503)
    new = scrape(110.0, web=web)

    g = compute(old, new)
    api = by_service(g)["shop/api"]
    assert api["requests"] == 100
    assert api["rps"] == 10.0
    assert api["success_rate"] == 0.95
    # p50: rank 50 of 95 in (0.0025, 0.005]; p99: rank 99, 4 of 5 into (0.1, 0.25].
    assert api["p50_ms"] == pytest.approx(round((0.0025 + 0.0025 * 50 / 95) * 1000, 2))
    assert api["p99_ms"] == pytest.approx(220.0)
    edge = by_edge(g)[("shop/web", "svc:shop/api")]
    assert (edge["rps"], edge["success_rate"], edge["service"]) == (10.0, 0.95, "shop/api")
    assert {n["id"]: n["kind"] for n in g.graph_json()["nodes"]} == {
        "shop/web": "workload",
        "svc:shop/api": "service",
    }


def test_grpc_failures_count_against_success() -> None:
    web = FakeProxy("shop", "web")
    old = scrape(0.0, web=web)
    web.outbound("shop/pay", 3, duration=0.01, grpc="0")
    web.outbound("shop/pay", 1, duration=0.01, grpc="14")
    g = compute(old, scrape(2.0, web=web))
    assert by_service(g)["shop/pay"]["success_rate"] == 0.75
    assert by_service(g)["shop/pay"]["rps"] == 2.0


def test_destination_series_count_only_what_no_caller_reported() -> None:
    web, api = FakeProxy("shop", "web"), FakeProxy("shop", "api")
    old = scrape(0.0, web=web, api=api)
    web.outbound("shop/api", 100, duration=0.004)
    api.inbound(100, duration=0.003)  # the same requests, caller unidentified
    api.inbound(20, duration=0.03, status=500)  # an unmeshed caller
    new = scrape(10.0, web=web, api=api)

    g = compute(old, new, services_of={("shop", "api"): ["shop/api"]})
    svc = by_service(g)["shop/api"]
    assert svc["requests"] == 120
    # The caller's 100 successes, plus the unidentified share's 100/120 of 20.
    assert svc["success_rate"] == pytest.approx((100 + 20 * 100 / 120) / 120, abs=1e-4)
    edges = by_edge(g)
    # The only workload behind shop/api: the caller's edge ends at it.
    assert edges[("shop/web", "shop/api")]["requests"] == 100
    unknown = edges[("unknown", "shop/api")]
    # 20 of the destination's 120 unidentified requests count, with their
    # bucket shares: 100 fast successes and 20 slow failures, scaled by 1/6.
    assert unknown["requests"] == 20
    assert unknown["success_rate"] == pytest.approx(100 / 120, abs=1e-4)


def test_destination_series_with_a_known_source_are_not_counted_twice() -> None:
    web, api = FakeProxy("shop", "web"), FakeProxy("shop", "api")
    old = scrape(0.0, web=web, api=api)
    web.outbound("shop/api", 50, duration=0.004)
    api.inbound(50, duration=0.003, source="web", service="shop/api")
    g = compute(old, scrape(5.0, web=web, api=api))
    assert by_service(g)["shop/api"]["requests"] == 50
    assert set(by_edge(g)) == {("shop/web", "svc:shop/api")}


def test_skew_between_caller_and_callee_scrapes_is_not_a_phantom_caller() -> None:
    web, api = FakeProxy("shop", "web"), FakeProxy("shop", "api")
    old = scrape(0.0, web=web, api=api)
    web.outbound("shop/api", 99, duration=0.004)
    api.inbound(100, duration=0.003, service="shop/api")  # one still in flight at web
    g = compute(old, scrape(10.0, web=web, api=api))
    assert set(by_edge(g)) == {("shop/web", "svc:shop/api")}
    assert by_service(g)["shop/api"]["requests"] == 99


def test_without_callers_the_destination_view_counts() -> None:
    api = FakeProxy("shop", "api")
    old = scrape(0.0, api=api)
    api.inbound(30, duration=0.003)  # no service known: Istio's fallback
    g = compute(old, scrape(3.0, api=api))
    assert by_edge(g)[("unknown", "shop/api")]["rps"] == 10.0
    assert by_service(g)["shop/api"]["rps"] == 10.0


def test_a_restarted_proxy_counts_from_zero() -> None:
    web = FakeProxy("shop", "web")
    web.outbound("shop/api", 500, duration=0.004)
    old = scrape(0.0, web=web)
    restarted = FakeProxy("shop", "web")
    restarted.outbound("shop/api", 40, duration=0.004)
    g = compute(old, scrape(4.0, web=restarted))
    assert by_service(g)["shop/api"]["requests"] == 40
    assert by_service(g)["shop/api"]["p50_ms"] is not None


def test_a_target_scraped_once_has_no_window() -> None:
    web, late = FakeProxy("shop", "web"), FakeProxy("shop", "late")
    old = scrape(0.0, web=web)
    web.outbound("shop/api", 10, duration=0.004)
    late.outbound("shop/api", 1000, duration=0.004)  # new, or its first scrape failed
    g = compute(old, scrape(10.0, web=web, late=late))
    assert by_service(g)["shop/api"]["requests"] == 10


def test_idle_services_show_without_rates() -> None:
    web = FakeProxy("shop", "web")
    web.outbound("shop/api", 3, duration=0.004)
    old = scrape(0.0, web=web)
    g = compute(old, scrape(2.0, web=web), workloads=[("shop", "idle")])
    api = by_service(g)["shop/api"]
    assert (api["rps"], api["success_rate"], api["p99_ms"]) == (0.0, None, None)
    assert "shop/idle" in {n["id"] for n in g.graph_json()["nodes"]}


def test_scrapes_out_of_order_are_an_error() -> None:
    s = Scrape(5.0, {})
    with pytest.raises(GoldenError):
        compute(s, s)


def test_a_service_with_several_workloads_stays_one_node_for_its_callers() -> None:
    web, v1, v2 = FakeProxy("shop", "web"), FakeProxy("shop", "api-v1"), FakeProxy("shop", "api-v2")
    old = scrape(0.0, web=web, v1=v1, v2=v2)
    web.outbound("shop/api", 10, duration=0.004)
    v1.inbound(9, duration=0.003)
    v2.inbound(1, duration=0.003)
    mapping = {("shop", "api-v1"): ["shop/api"], ("shop", "api-v2"): ["shop/api"]}
    g = compute(old, scrape(1.0, web=web, v1=v1, v2=v2), services_of=mapping)
    assert set(by_edge(g)) == {("shop/web", "svc:shop/api")}
    assert by_service(g)["shop/api"]["requests"] == 10


def test_a_caller_known_by_its_mesh_identity_is_not_counted_twice() -> None:
    web, api = FakeProxy("shop", "web"), FakeProxy("shop", "api")
    old = scrape(0.0, web=web, api=api)
    web.outbound("shop/api", 20, duration=0.004)
    for _ in range(20):  # the inbound side knows only the caller's certificate
        rec = RequestRecord("destination", "http", 0.0)
        rec.destination_workload, rec.destination_namespace = "api", "shop"
        rec.source_principal = "spiffe://cluster.local/ns/shop/sa/web"
        rec.status, rec.duration = 200, 0.003
        api.metrics.observe_request(rec)
    g = compute(old, scrape(1.0, web=web, api=api))
    assert set(by_edge(g)) == {("shop/web", "svc:shop/api")}
    assert by_service(g)["shop/api"]["requests"] == 20


def test_certificate_expiry_and_config_version_are_read() -> None:
    web = FakeProxy("shop", "web")
    web.metrics.cert_expiry.set(1_900_000_000)
    web.metrics.config_info.labels("abc123").set(1)
    sample = web.sample()
    assert (sample.certificate_expiry, sample.config_version) == (1_900_000_000, "abc123")
