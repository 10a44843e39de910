"""Metrics and access-log cores: the record feeds both, and labels stay bounded."""

from __future__ import annotations

import json
import logging
import time

import pytest
from prometheus_client import generate_latest

from proxy.telemetry.accesslog import AccessLog, format_json, format_text
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.record import RequestRecord


def record(path: str = "/items/1", status: int = 200) -> RequestRecord:
    return RequestRecord(
        reporter="source",
        protocol="http",
        start_time=time.time(),
        duration=0.012,
        method="GET",
        authority="catalog.shop",
        path=path,
        status=status,
        request_bytes=0,
        response_bytes=1024,
        upstream_host="10.0.0.7:8080",
        route="shop/catalog-canary",
        backend="shop/catalog-v2",
        source_workload="frontend",
        source_namespace="shop",
        source_principal="spiffe://cluster.local/ns/shop/sa/frontend",
        destination_service="catalog.shop.svc.cluster.local",
        destination_workload="catalog-v2",
        destination_namespace="shop",
        request_id="abc",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )


def test_request_metrics_carry_labels_and_units() -> None:
    m = ProxyMetrics()
    m.observe_request(record())
    m.observe_request(record(status=503))
    text = generate_latest(m.registry).decode()
    assert "synchro_requests_total{" in text
    assert 'response_code="503"' in text and 'route="shop/catalog-canary"' in text
    assert "synchro_request_duration_seconds_bucket" in text


def test_ten_thousand_paths_do_not_add_series() -> None:
    m = ProxyMetrics()
    m.observe_request(record("/p/0"))
    before = sum(len(f.samples) for f in m.registry.collect())
    for i in range(10_000):
        m.observe_request(record(f"/p/{i}?q={i}"))
    after = sum(len(f.samples) for f in m.registry.collect())
    assert after == before
    assert "/p/" not in generate_latest(m.registry).decode()


def test_access_log_json_and_text() -> None:
    rec = record()
    data = json.loads(format_json(rec))
    for key in (
        "time",
        "method",
        "authority",
        "path",
        "protocol",
        "status",
        "response_flags",
        "bytes_received",
        "bytes_sent",
        "duration_ms",
        "upstream_host",
        "route",
        "source_principal",
        "request_id",
        "trace_id",
    ):
        assert key in data, key
    assert data["status"] == 200 and data["path"] == "/items/1" and data["duration_ms"] == 12.0
    text = format_text(rec)
    assert '"GET /items/1 HTTP/1.1"' in text and " 200 - " in text and "abc" in text


def test_access_log_off_and_bad_format(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="synchro.access"):
        AccessLog("off").emit(record())
        AccessLog("json").emit(record())
    assert len(caplog.records) == 1
    with pytest.raises(ValueError, match="'xml'"):
        AccessLog("xml")
