"""The controller's metrics module: counters others increment, served by create_app()."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from controlplane import metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counts_are_served_as_prometheus_text() -> None:
    client = TestClient(metrics.create_app())
    before = samples(client.get("/metrics").text)
    metrics.PUSHES.inc(3)
    metrics.PUSH_RESPONSES.labels("nack").inc()
    metrics.CERTIFICATES.labels("issued").inc()
    metrics.COMPILE_SECONDS.observe(0.02)
    metrics.WEBHOOK_SECONDS.labels("injected").observe(0.004)
    metrics.CONNECTED_PROXIES.set(7)
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = samples(resp.text)

    def grew(name: str, labels: dict[str, str] | None = None) -> float:
        key = (name, tuple(sorted((labels or {}).items())))
        return after[key] - before.get(key, 0.0)

    assert grew("synchro_controller_pushes_total") == 3
    assert grew("synchro_controller_push_responses_total", {"result": "nack"}) == 1
    assert grew("synchro_controller_push_responses_total", {"result": "ack"}) == 0
    assert grew("synchro_controller_certificates_total", {"result": "issued"}) == 1
    assert grew("synchro_controller_compile_duration_seconds_count") == 1
    assert grew("synchro_controller_webhook_duration_seconds_count", {"result": "injected"}) == 1
    assert after[("synchro_controller_connected_proxies", ())] == 7


def test_openmetrics_when_asked() -> None:
    client = TestClient(metrics.create_app())
    resp = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    assert resp.text.endswith("# EOF\n")
    # Zero-valued series exist before any event, so rate() works from the start.
    assert 'synchro_controller_webhook_duration_seconds_count{result="error"}' in resp.text
