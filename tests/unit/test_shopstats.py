"""examples/shopstats.py: the demo's figures and checks from /metrics text, as the
proxies write it (the same code judges the demo locally and on kind)."""

from __future__ import annotations

from examples import shopstats

SRC = 'reporter="source",source_principal="spiffe://cluster.local/ns/shop/sa/frontend"'


def dst(workload: str, code: str, *, grpc: str = "", tls: str = "mutual_tls") -> str:
    return (
        f'reporter="destination",destination_namespace="shop",destination_workload="{workload}",'
        f'source_principal="spiffe://cluster.local/ns/shop/sa/frontend",'
        f'connection_security_policy="{tls}",response_code="{code}",grpc_status="{grpc}"'
    )


def text(lines: list[tuple[str, float]]) -> str:
    body = "\n".join(f"synchro_requests_total{{{labels}}} {v}" for labels, v in lines)
    return f"# TYPE synchro_requests_total counter\n{body}\n"


LOAD = {
    "requests": 100,
    "seconds": 2.0,
    "requests_per_second": 50.0,
    "frontend_errors": 0,
    "catalog_versions": {"v1": 91, "v2": 9},
    "ratings_status": {"200": 100},
    "payments_status": {"OK": 100},
}


def run(tls: str = "mutual_tls") -> shopstats.Run:
    frontend_before = text([(f'{SRC},destination_service="shop/ratings",response_code="200"', 10)])
    frontend_after = (
        text(
            [
                (f'{SRC},destination_service="shop/ratings",response_code="200"', 110),
                (f'{SRC},destination_service="shop/catalog",response_code="200"', 100),
                (
                    f'{SRC},destination_service="shop/payments",response_code="200",grpc_status="0"',
                    100,
                ),
            ]
        )
        + 'synchro_retries_total{destination_service="shop/ratings",reason="500"} 20\n'
    )
    before = [
        *shopstats.parse_metrics("shop/frontend-0", frontend_before),
        *shopstats.parse_metrics("shop/ratings-flaky-0", text([(dst("ratings-flaky", "500"), 3)])),
    ]
    after = [
        *shopstats.parse_metrics("shop/frontend-0", frontend_after),
        *shopstats.parse_metrics("shop/ratings-0", text([(dst("ratings", "200"), 60)])),
        *shopstats.parse_metrics(
            "shop/ratings-flaky-0",
            text([(dst("ratings-flaky", "500"), 23), (dst("ratings-flaky", "200"), 40)]),
        ),
        *shopstats.parse_metrics("shop/catalog-v1-0", text([(dst("catalog-v1", "200"), 91)])),
        *shopstats.parse_metrics("shop/catalog-v2-0", text([(dst("catalog-v2", "200"), 9)])),
        *shopstats.parse_metrics(
            "shop/payments-0", text([(dst("payments", "200", grpc="0", tls=tls), 100)])
        ),
    ]
    return shopstats.Run(
        LOAD,
        before,
        after,
        {"status": "OK"},
        {"status": "PERMISSION_DENIED", "details": "RBAC: access denied"},
    )


def test_figures_per_service_with_and_without_retries() -> None:
    fig = run().figures()
    ratings = fig.service("shop/ratings")
    assert ratings is not None
    # Callers: 100 requests in the window (the 10 before do not count), all good.
    assert (ratings.requests, ratings.success, ratings.rps) == (100, 1.0, 50.0)
    # The Pods answered 60 + 20 (500) + 40 = 120 tries; 20 retries hid the failures.
    assert (ratings.tries, ratings.retries) == (120, 20)
    assert ratings.tries_success == 100 / 120
    # catalog-v1 and -v2 serve the Service frontend called: catalog.
    catalog = fig.service("shop/catalog")
    assert catalog is not None and catalog.tries == 100
    assert fig.canary == {"v1": 91.0, "v2": 9.0}
    assert {(e.source, e.destination) for e in fig.edges} >= {("frontend", "shop/payments")}
    assert fig.failed_tries_since_start["shop/ratings-flaky"] == 23


def test_checks_pass_on_a_good_run_and_name_what_failed() -> None:
    good = run().checks()
    assert [c.name for c in good if not c.ok] == []
    plain = {c.name: c for c in run(tls="none").checks()}
    assert not plain["mTLS on every edge"].ok
    assert "frontend->shop/payments" in plain["mTLS on every edge"].detail
    bad = run()
    bad.denied = {"status": "OK"}
    bad.load = {**LOAD, "catalog_versions": {"v1": 50, "v2": 50}}
    failed = {c.name for c in bad.checks() if not c.ok}
    assert failed == {"payments authorization", "canary split 90/10"}


def test_workload_services_follows_selectors() -> None:
    served = shopstats.workload_services(shopstats.load_manifests())
    assert served["shop/catalog-v2"] == {"shop/catalog", "shop/catalog-v2"}
    assert served["shop/ratings-flaky"] == {"shop/ratings"}


def test_a_restarted_proxy_counts_from_zero() -> None:
    before = shopstats.parse_metrics("p", text([(dst("ratings", "200"), 50)]))
    after = shopstats.parse_metrics("p", text([(dst("ratings", "200"), 7)]))
    assert [s.value for s in shopstats.delta(before, after)] == [7]
