"""Tracing and the telemetry facade: spans built from records, the OTLP
encoding, the bounded exporter queue, and begin()/end() propagation rules."""

from __future__ import annotations

import io
import json
import logging
import random
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.parser import text_string_to_metric_families

from proxy.conn import Direction
from proxy.telemetry.propagation import parse_traceparent
from proxy.telemetry.record import RequestRecord
from proxy.telemetry.selfmetrics import LagWindow
from proxy.telemetry.telemetry import (
    Telemetry,
    TelemetryError,
    TelemetrySettings,
    replace_trace_headers,
    setup_access_logger,
    workload_name,
)
from proxy.telemetry.tracing import (
    ResourceInfo,
    SpanExporter,
    TracingError,
    build_span,
    encode_export,
    parse_endpoint,
    span_name,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SPAN = "b7ad6b7169203331"
ENDPOINT = "http://127.0.0.1:4318/v1/traces"


def record(**kw: object) -> RequestRecord:
    rec = RequestRecord(
        reporter="source",
        protocol="http",
        start_time=1_700_000_000.25,
        duration=0.0125,
        method="GET",
        authority="catalog.shop:8080",
        path="/items/7?color=red",
        status=200,
        flags="-",
        upstream_host="10.1.2.3:8080",
        route="shop/catalog",
        source_workload="frontend",
        source_principal="spiffe://cluster.local/ns/shop/sa/frontend",
        destination_service="catalog.shop.svc.cluster.local",
        destination_principal="spiffe://cluster.local/ns/shop/sa/catalog",
        security_policy="mutual_tls",
        request_id="req-1",
        trace_id=TRACE,
        span_id=SPAN,
        parent_span_id=PARENT,
        sampled=True,
        http_version="1.1",
        peer_address="10.9.9.9:51000",
    )
    for key, value in kw.items():
        setattr(rec, key, value)
    return rec


def attrs(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in span.attributes:
        which = kv.value.WhichOneof("value")
        assert which is not None
        out[kv.key] = getattr(kv.value, which)
    return out


# -- endpoints --------------------------------------------------------------------


def test_endpoint_parsing() -> None:
    e = parse_endpoint("http://otel-collector.observability.svc:4318/v1/traces")
    assert (e.scheme, e.host, e.port, e.path) == (
        "http",
        "otel-collector.observability.svc",
        4318,
        "/v1/traces",
    )
    assert parse_endpoint("http://collector").path == "/v1/traces"
    assert parse_endpoint("http://collector").port == 4318
    assert parse_endpoint("https://collector/").port == 443
    assert str(parse_endpoint("http://[::1]:9/x")) == "http://[::1]:9/x"
    for bad in ("collector:4318", "grpc://c:4317", "http://", "http://c:99999", "http://c/?a=1"):
        with pytest.raises(TracingError):
            parse_endpoint(bad)


# -- spans ------------------------------------------------------------------------


def test_client_span_has_http_semantic_conventions_and_identities() -> None:
    span = build_span(record())
    assert span.trace_id.hex() == TRACE and span.span_id.hex() == SPAN
    assert span.parent_span_id.hex() == PARENT
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.name == "GET"
    assert span.start_time_unix_nano == 1_700_000_000_250_000_000
    assert span.end_time_unix_nano - span.start_time_unix_nano == 12_500_000
    a = attrs(span)
    assert a["http.request.method"] == "GET"
    assert a["http.response.status_code"] == 200
    assert a["url.full"] == "http://catalog.shop:8080/items/7?color=red"
    assert a["server.address"] == "catalog.shop" and a["server.port"] == 8080
    assert a["network.peer.address"] == "10.1.2.3" and a["network.peer.port"] == 8080
    assert a["network.protocol.version"] == "1.1"
    assert a["synchro.source.principal"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert a["synchro.destination.principal"] == "spiffe://cluster.local/ns/shop/sa/catalog"
    assert a["synchro.response_flags"] == "-"
    assert a["synchro.connection_security_policy"] == "mutual_tls"
    assert "error.type" not in a
    assert span.status.code == Status.STATUS_CODE_UNSET


def test_server_span_splits_path_and_query_and_names_the_client() -> None:
    span = build_span(record(reporter="destination", status=404))
    a = attrs(span)
    assert span.kind == Span.SPAN_KIND_SERVER
    assert a["url.path"] == "/items/7" and a["url.query"] == "color=red"
    assert a["url.scheme"] == "http"
    assert a["client.address"] == "10.9.9.9" and a["network.peer.port"] == 51000
    # 4xx is the client's fault: an error on the client span only.
    assert span.status.code == Status.STATUS_CODE_UNSET
    assert build_span(record(status=404)).status.code == Status.STATUS_CODE_ERROR


def test_failed_request_carries_flags_and_error_type() -> None:
    span = build_span(record(status=0, flags="UF,URX", attempts=3))
    a = attrs(span)
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert a["error.type"] == "UF,URX"
    assert a["synchro.response_flags"] == "UF,URX"
    assert a["synchro.attempts"] == 3
    assert "http.response.status_code" not in a
    assert attrs(build_span(record(status=503)))["error.type"] == "503"


def test_grpc_span_uses_rpc_conventions() -> None:
    rec = record(protocol="grpc", method="POST", path="/shop.Catalog/GetItem", http_version="2")
    rec.grpc_status = "14"
    span = build_span(rec)
    a = attrs(span)
    assert span.name == "shop.Catalog/GetItem"
    assert a["rpc.system"] == "grpc"
    assert (a["rpc.service"], a["rpc.method"]) == ("shop.Catalog", "GetItem")
    assert a["rpc.grpc.status_code"] == 14
    assert span.status.code == Status.STATUS_CODE_ERROR
    rec.grpc_status = "5"  # NOT_FOUND: the caller's problem, not the server's
    rec.reporter = "destination"
    assert build_span(rec).status.code == Status.STATUS_CODE_UNSET


def test_odd_methods_and_new_traces() -> None:
    assert span_name(record(method="PURGE")) == "HTTP"
    a = attrs(build_span(record(method="PURGE")))
    assert a["http.request.method"] == "_OTHER" and a["http.request.method_original"] == "PURGE"
    assert build_span(record(parent_span_id="")).parent_span_id == b""


def test_export_request_round_trips() -> None:
    body = encode_export(
        [record(), record(span_id="1" * 16)],
        ResourceInfo(service_name="frontend", namespace="shop", pod="frontend-abc"),
    )
    decoded = ExportTraceServiceRequest.FromString(body)
    (rs,) = decoded.resource_spans
    resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert resource["service.name"] == "frontend"
    assert resource["k8s.namespace.name"] == "shop"
    (ss,) = rs.scope_spans
    assert ss.scope.name == "synchro-proxy"
    assert [s.span_id.hex() for s in ss.spans] == [SPAN, "1" * 16]


# -- the exporter queue -------------------------------------------------------------


@pytest.fixture
def stalled() -> Iterator[threading.Event]:
    release = threading.Event()
    yield release
    release.set()


def test_full_queue_drops_and_counts_without_blocking(stalled: threading.Event) -> None:
    sending = threading.Event()

    def send(body: bytes) -> None:
        sending.set()
        stalled.wait(10)

    dropped: list[int] = []
    exporter = SpanExporter(
        send,
        ResourceInfo(),
        queue_size=4,
        batch_size=1,
        flush_interval=0.01,
        on_dropped=dropped.append,
    )
    exporter.start()
    assert exporter.submit(record())
    assert sending.wait(5)  # the thread now hangs in send with that span
    accepted = [exporter.submit(record()) for _ in range(10)]
    assert accepted == [True] * 4 + [False] * 6
    assert exporter.dropped == 6 and sum(dropped) == 6
    stalled.set()
    exporter.close(timeout=5)
    assert exporter.exported == 5


def test_failed_export_counts_the_batch_as_dropped() -> None:
    def send(body: bytes) -> None:
        raise OSError("connection refused")

    exporter = SpanExporter(send, ResourceInfo(), batch_size=10, flush_interval=0.01)
    exporter.start()
    for _ in range(3):
        exporter.submit(record())
    exporter.close(timeout=5)
    assert exporter.dropped == 3 and exporter.exported == 0


def test_exporter_batches_on_close() -> None:
    bodies: list[bytes] = []
    exporter = SpanExporter(bodies.append, ResourceInfo(), batch_size=2, flush_interval=30)
    exporter.start()
    for _ in range(5):
        exporter.submit(record())
    exporter.close(timeout=5)
    sizes = [
        len(ExportTraceServiceRequest.FromString(b).resource_spans[0].scope_spans[0].spans)
        for b in bodies
    ]
    assert sum(sizes) == 5 and max(sizes) <= 2


# -- the facade: settings ------------------------------------------------------------


def test_settings_from_env_and_flags() -> None:
    env = {
        "SYNCHRO_ACCESS_LOG": "text",
        "SYNCHRO_TRACE_SAMPLING": "2.5",
        "SYNCHRO_OTLP_ENDPOINT": ENDPOINT,
        "POD_NAME": "reviews-v1-7f9c8d6b5-x2x9z",
        "POD_NAMESPACE": "shop",
        "SERVICE_ACCOUNT": "reviews",
        "SYNCHRO_TRUST_DOMAIN": "example.org",
    }
    s = TelemetrySettings.from_env(env)
    assert (s.access_log, s.trace_sampling, s.otlp_endpoint) == ("text", 2.5, ENDPOINT)
    assert s.workload == "reviews-v1" and s.namespace == "shop"
    assert s.principal == "spiffe://example.org/ns/shop/sa/reviews"
    s = TelemetrySettings.from_env(env, access_log="off", trace_sampling="0", otlp_endpoint="")
    assert (s.access_log, s.trace_sampling, s.otlp_endpoint) == ("off", 0.0, "")
    assert TelemetrySettings.from_env({}) == TelemetrySettings(access_log="off", trace_sampling=1.0)


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(TelemetryError, match="expected one of"):
        TelemetrySettings.from_env({"SYNCHRO_ACCESS_LOG": "xml"})
    with pytest.raises(TelemetryError, match="percentage"):
        TelemetrySettings.from_env({"SYNCHRO_TRACE_SAMPLING": "lots"})
    with pytest.raises(TelemetryError, match="0-100"):
        TelemetrySettings.from_env({"SYNCHRO_TRACE_SAMPLING": "101"})
    with pytest.raises(TelemetryError, match="on or off"):
        TelemetrySettings.from_env({"SYNCHRO_METRICS": "maybe"})
    with pytest.raises(TelemetryError, match="OTLP"):
        TelemetrySettings.from_env({}, otlp_endpoint="collector:4318")
    # The mesh-wide endpoint being wrong turns tracing off instead of stopping proxies.
    s = TelemetrySettings.from_env({"SYNCHRO_OTLP_ENDPOINT": "collector:4318"})
    assert s.otlp_endpoint == "" and "tracing off" in s.endpoint_error


@pytest.mark.parametrize(
    ("pod", "workload"),
    [
        ("reviews-v1-7f9c8d6b5-x2x9z", "reviews-v1"),
        ("db-0", "db"),
        ("node-agent-x2x9z", "node-agent"),
        ("standalone", "standalone"),
        ("my-app-v2", "my-app-v2"),
        ("", ""),
    ],
)
def test_workload_name(pod: str, workload: str) -> None:
    assert workload_name(pod) == workload


# -- the facade: begin/end ----------------------------------------------------------


def traced(**kw: object) -> tuple[Telemetry, list[bytes]]:
    bodies: list[bytes] = []
    settings = TelemetrySettings(otlp_endpoint=ENDPOINT, **kw)  # type: ignore[arg-type]
    return Telemetry(settings, rng=random.Random(7), send=bodies.append), bodies


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = [v.decode() for n, v in headers if n == name]
    assert len(values) <= 1
    return values[0] if values else None


def test_new_trace_gets_ids_and_headers() -> None:
    t, _ = traced(trace_sampling=100.0)
    rec, add = t.begin(Direction.OUTBOUND, "http", [(b"Host", b"catalog")], method=b"GET")
    assert rec.reporter == "source" and rec.sampled
    tp = parse_traceparent(header(add, b"traceparent") or "")
    assert tp is not None and tp.trace_id == rec.trace_id and tp.span_id == rec.span_id
    assert tp.sampled and rec.parent_span_id == ""
    assert header(add, b"x-request-id") == rec.request_id and len(rec.request_id) == 36
    assert rec.request_id[14] == "4"  # a version 4 UUID


def test_caller_context_is_continued_and_its_decision_followed() -> None:
    t, _ = traced(trace_sampling=100.0)
    incoming = [
        (b"TraceParent", f"00-{TRACE}-{PARENT}-00".encode()),
        (b"tracestate", b"vendor=1"),
        (b"x-request-id", b"given"),
    ]
    rec, add = t.begin("destination", "http", incoming)
    assert rec.trace_id == TRACE and rec.parent_span_id == PARENT
    assert not rec.sampled  # the caller said no, whatever our percentage
    assert rec.request_id == "given" and header(add, b"x-request-id") is None
    assert header(add, b"tracestate") == "vendor=1"
    forwarded = replace_trace_headers(incoming, add)
    assert [n for n, _ in forwarded].count(b"traceparent") == 1
    assert all(n != b"TraceParent" for n, _ in forwarded)
    tp = parse_traceparent(header(forwarded, b"traceparent") or "")
    assert tp is not None and tp.span_id == rec.span_id and not tp.sampled


def test_sampling_percentage_for_new_traces() -> None:
    t, _ = traced(trace_sampling=0.0)
    assert not any(t.begin("source", "http", [])[0].sampled for _ in range(200))
    t, _ = traced(trace_sampling=50.0)
    hits = sum(t.begin("source", "http", [])[0].sampled for _ in range(2000))
    assert 800 < hits < 1200


@pytest.mark.parametrize(
    ("incoming", "expect", "trace_id"),
    [
        ([(b"b3", f"{TRACE}-{PARENT}-1".encode())], b"b3", TRACE),
        (
            [
                (b"X-B3-TraceId", PARENT.encode()),  # 64-bit id
                (b"X-B3-SpanId", PARENT.encode()),
                (b"X-B3-Sampled", b"1"),
            ],
            b"x-b3-traceid",
            "0" * 16 + PARENT,
        ),
    ],
)
def test_b3_in_gives_w3c_and_b3_out(
    incoming: list[tuple[bytes, bytes]], expect: bytes, trace_id: str
) -> None:
    t, _ = traced(trace_sampling=0.0)
    rec, add = t.begin("source", "http", incoming)
    assert rec.sampled and rec.parent_span_id == PARENT
    assert rec.trace_id == trace_id
    assert header(add, b"traceparent") == f"00-{rec.trace_id}-{rec.span_id}-01"
    assert header(add, expect) is not None
    forwarded = replace_trace_headers(incoming, add)
    assert not any(n.startswith(b"X-B3") for n, _ in forwarded)


def test_tracing_off_touches_no_trace_header_but_logs_the_trace_id() -> None:
    t = Telemetry(TelemetrySettings(access_log="json"))
    incoming = [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())]
    rec, add = t.begin("source", "http", incoming)
    assert rec.trace_id == TRACE and not rec.sampled
    assert [n for n, _ in add] == [b"x-request-id"]
    t = Telemetry(TelemetrySettings())  # metrics only: headers are left alone
    assert t.begin("source", "http", [*incoming, (b"x-request-id", b"r")])[1] == []
    assert replace_trace_headers(incoming, []) is incoming


def test_disabled_records_nothing() -> None:
    t = Telemetry.disabled()
    rec, add = t.begin(Direction.INBOUND, "http", [(b"traceparent", b"junk")])
    assert add == [] and rec.reporter == "destination"
    t.end(rec)
    body, _ = t.exposition()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["synchro_requests"].samples == []
    assert families["synchro_process_cpu_seconds"].samples
    # Other parts can still count through it without checking for None.
    t.metrics.retries.labels("catalog", "5xx").inc()


def test_end_feeds_metrics_log_and_exporter() -> None:
    t, bodies = traced(trace_sampling=100.0, access_log="json", workload="frontend")
    stream = io.StringIO()
    logger = logging.getLogger("synchro.access")
    old = (list(logger.handlers), logger.propagate, logger.level)
    setup_access_logger(stream)
    try:
        rec, _ = t.begin(
            "source",
            "http",
            [(b"content-type", b"application/grpc+proto"), (b"user-agent", b"grpc-go")],
            method=b"POST",
            path=b"/shop.Catalog/Get",
            authority=b"catalog:9090",
        )
        assert rec.protocol == "grpc" and rec.source_workload == "frontend"
        rec.status, rec.grpc_status, rec.response_bytes = 200, "0", 42
        t.end(rec)
    finally:
        logger.handlers[:], logger.propagate = old[0], old[1]
        logger.setLevel(old[2])
    line = json.loads(stream.getvalue())
    assert line["trace_id"] == rec.trace_id and line["path"] == "/shop.Catalog/Get"
    assert rec.duration > 0
    text = t.exposition()[0].decode()
    (requests,) = [f for f in text_string_to_metric_families(text) if f.name == "synchro_requests"]
    (sample,) = requests.samples
    assert sample.labels["request_protocol"] == "grpc" and sample.labels["grpc_status"] == "0"
    assert t.exporter is not None
    t.exporter.start()
    t.exporter.close(timeout=5)
    (body,) = bodies
    (span,) = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    assert span.trace_id.hex() == rec.trace_id
    assert attrs(span)["user_agent.original"] == "grpc-go"


def test_tcp_connections_are_counted() -> None:
    t = Telemetry(TelemetrySettings(namespace="shop", workload="db"))
    rec = t.tcp_open(Direction.INBOUND, peer="10.0.0.1:5000", upstream_host="127.0.0.1:5432")
    rec.request_bytes, rec.response_bytes = 100, 2000
    t.tcp_close(rec)
    families = {f.name: f for f in text_string_to_metric_families(t.exposition()[0].decode())}
    for name, value in (
        ("synchro_tcp_connections_opened", 1),
        ("synchro_tcp_connections_closed", 1),
        ("synchro_tcp_received_bytes", 100),
        ("synchro_tcp_sent_bytes", 2000),
    ):
        (sample,) = [s for s in families[name].samples if s.name.endswith("_total")]
        assert sample.value == value
        assert sample.labels["destination_workload"] == "db"


def test_exposition_formats() -> None:
    t = Telemetry(TelemetrySettings())
    body, ctype = t.exposition("")
    assert ctype.startswith("text/plain") and b"# TYPE synchro_requests_total counter" in body
    body, ctype = t.exposition("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_lag_window() -> None:
    w = LagWindow(size=3)
    assert (w.last, w.worst) == (0.0, 0.0)
    for scheduled, woke in ((1.0, 1.5), (2.0, 2.01), (3.0, 2.9), (4.0, 4.02)):
        w.observe(scheduled, woke)
    assert w.last == pytest.approx(0.02) and w.worst == pytest.approx(0.02)


def test_inbound_record_names_the_mtls_caller_in_metrics() -> None:
    from prometheus_client import generate_latest

    from proxy.conn import Direction

    t = Telemetry(TelemetrySettings(workload="payments", namespace="shop"))
    caller = "spiffe://cluster.local/ns/shop/sa/frontend"
    rec, _ = t.begin(Direction.INBOUND, "http", [], method="POST", path="/x")
    t.note_peer(rec, caller)
    rec.status = 200
    t.end(rec)
    plain, _ = t.begin(Direction.INBOUND, "http", [], method="GET", path="/")
    t.note_peer(plain, None)
    plain.status = 200
    t.end(plain)
    tcp = t.tcp_open(Direction.INBOUND, peer_identity=caller)
    t.tcp_close(tcp)
    text = generate_latest(t.registry).decode()
    assert f'source_principal="{caller}"' in text
    assert 'connection_security_policy="mutual_tls"' in text and 'source_namespace="shop"' in text
    assert 'connection_security_policy="none"' in text  # the plaintext caller
    assert "synchro_tcp_connections_opened_total{" in text
