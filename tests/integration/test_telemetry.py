"""Telemetry end to end: spans exported over real OTLP/HTTP to a receiver on
127.0.0.1 and decoded with opentelemetry-proto, and /metrics of a real
synchro-proxy process.

The two proxies of a request are simulated with two `Telemetry` facades, called
as the outbound (client side) and inbound (server side) handlers call them,
with the headers one forwards handed to the other.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from proxy.conn import Direction
from proxy.telemetry.propagation import parse_traceparent
from proxy.telemetry.record import RequestRecord
from proxy.telemetry.telemetry import (
    Header,
    Telemetry,
    TelemetrySettings,
    replace_trace_headers,
)
from tests.integration.proxy_harness import BackgroundServer, echo_handler, free_port, run_proxy

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


class Receiver:
    """An OTLP/HTTP traces endpoint: decodes every export request it gets."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, str]] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = (
                    self.path == "/v1/traces"
                    and self.headers.get("Content-Type") == "application/x-protobuf"
                )
                if ok:
                    request = ExportTraceServiceRequest.FromString(body)
                    with receiver.lock:
                        receiver.requests += 1
                        for rs in request.resource_spans:
                            receiver.resources.append(
                                {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                            )
                            for ss in rs.scope_spans:
                                receiver.spans.extend(ss.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_spans(self, n: int, timeout: float = 10.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.spans) >= n:
                    return list(self.spans)
            time.sleep(0.02)
        raise AssertionError(f"receiver got {len(self.spans)} spans, expected {n}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


class Side:
    """One proxy's telemetry, started and closed like the process does."""

    def __init__(self, endpoint: str, workload: str, sampling: float = 100.0, **kw: object):
        self.telemetry = Telemetry(
            TelemetrySettings(
                otlp_endpoint=endpoint,
                trace_sampling=sampling,
                workload=workload,
                namespace="shop",
                principal=f"spiffe://cluster.local/ns/shop/sa/{workload}",
                span_flush_interval=0.05,
                **kw,  # type: ignore[arg-type]
            )
        )
        assert self.telemetry.exporter is not None
        self.telemetry.exporter.start()

    def close(self) -> None:
        assert self.telemetry.exporter is not None
        self.telemetry.exporter.close(timeout=5)


@pytest.fixture
def sides(receiver: Receiver) -> Iterator[tuple[Side, Side]]:
    frontend = Side(receiver.url, "frontend")
    catalog = Side(receiver.url, "catalog")
    yield frontend, catalog
    frontend.close()
    catalog.close()


def one_request(
    outbound: Telemetry, inbound: Telemetry, app_headers: list[Header], status: int = 200
) -> tuple[RequestRecord, RequestRecord, list[Header]]:
    """The app's request through the frontend's outbound proxy and the
    catalog's inbound proxy; returns both records and what the catalog app got."""
    head = {"method": b"GET", "authority": b"catalog.shop:8080", "path": b"/items/7"}
    client, add = outbound.begin(Direction.OUTBOUND, "http", app_headers, **head)  # type: ignore[arg-type]
    on_wire = replace_trace_headers(app_headers, add)
    server, add = inbound.begin(
        Direction.INBOUND,
        "http",
        on_wire,
        peer="127.0.0.1:40000",
        **head,  # type: ignore[arg-type]
    )
    to_app = replace_trace_headers(on_wire, add)
    for rec in (server, client):
        rec.status = status
        rec.response_bytes = 512
        rec.upstream_host = "127.0.0.1:8080"
    server.source_principal = client.source_principal  # what mTLS tells the inbound side
    client.destination_principal = server.destination_principal
    inbound.end(server)
    outbound.end(client)
    return client, server, to_app


def value(headers: list[Header], name: bytes) -> str:
    (found,) = [v.decode() for n, v in headers if n.lower() == name]
    return found


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id.hex(): s for s in spans}


def test_client_and_server_spans_share_the_trace(
    receiver: Receiver, sides: tuple[Side, Side]
) -> None:
    frontend, catalog = sides
    client, server, to_app = one_request(frontend.telemetry, catalog.telemetry, [])
    spans = by_id(receiver.wait_spans(2))
    c, s = spans[client.span_id], spans[server.span_id]
    assert c.kind == Span.SPAN_KIND_CLIENT and s.kind == Span.SPAN_KIND_SERVER
    assert c.trace_id == s.trace_id and c.trace_id.hex() == client.trace_id
    assert s.parent_span_id == c.span_id
    assert c.parent_span_id == b""  # the app sent no context: the trace starts here
    # The app sees the server span as its parent, so its own spans nest below.
    tp = parse_traceparent(value(to_app, b"traceparent"))
    assert tp is not None and tp.trace_id == client.trace_id and tp.span_id == server.span_id
    services = {r["service.name"] for r in receiver.resources}
    assert services == {"frontend", "catalog"}
    s_attrs = {kv.key: kv.value for kv in s.attributes}
    assert s_attrs["synchro.source.principal"].string_value.endswith("/sa/frontend")
    assert s_attrs["http.response.status_code"].int_value == 200
    assert value(to_app, b"x-request-id") == client.request_id == server.request_id


def test_client_supplied_traceparent_is_continued(
    receiver: Receiver, sides: tuple[Side, Side]
) -> None:
    frontend, catalog = sides
    app = [(b"traceparent", f"00-{TRACE}-{CALLER_SPAN}-01".encode())]
    client, server, to_app = one_request(frontend.telemetry, catalog.telemetry, app, status=503)
    spans = by_id(receiver.wait_spans(2))
    c, s = spans[client.span_id], spans[server.span_id]
    assert c.trace_id.hex() == s.trace_id.hex() == TRACE
    assert c.parent_span_id.hex() == CALLER_SPAN and s.parent_span_id == c.span_id
    assert c.status.code == s.status.code == 2  # STATUS_CODE_ERROR for a 503
    assert value(to_app, b"traceparent") == f"00-{TRACE}-{server.span_id}-01"


def test_unsampled_caller_exports_nothing(receiver: Receiver, sides: tuple[Side, Side]) -> None:
    frontend, catalog = sides
    app = [(b"traceparent", f"00-{TRACE}-{CALLER_SPAN}-00".encode())]
    _, server, to_app = one_request(frontend.telemetry, catalog.telemetry, app)
    assert value(to_app, b"traceparent") == f"00-{TRACE}-{server.span_id}-00"
    frontend.close()
    catalog.close()
    assert receiver.spans == []


@pytest.mark.parametrize("multi", [False, True], ids=["b3-single", "b3-multi"])
def test_b3_in_w3c_out_and_back(receiver: Receiver, sides: tuple[Side, Side], multi: bool) -> None:
    frontend, catalog = sides
    if multi:
        app = [
            (b"X-B3-TraceId", TRACE.encode()),
            (b"X-B3-SpanId", CALLER_SPAN.encode()),
            (b"X-B3-Sampled", b"1"),
        ]
    else:
        app = [(b"b3", f"{TRACE}-{CALLER_SPAN}-1".encode())]
    client, server, to_app = one_request(frontend.telemetry, catalog.telemetry, app)
    # Between the proxies: W3C, and the B3 flavour the app spoke.
    assert client.trace_id == server.trace_id == TRACE
    assert client.parent_span_id == CALLER_SPAN and server.parent_span_id == client.span_id
    # Back to the B3 app on the other side, in its own format, parented on the server span.
    assert value(to_app, b"traceparent") == f"00-{TRACE}-{server.span_id}-01"
    if multi:
        assert value(to_app, b"x-b3-traceid") == TRACE
        assert value(to_app, b"x-b3-spanid") == server.span_id
        assert value(to_app, b"x-b3-sampled") == "1"
    else:
        assert value(to_app, b"b3") == f"{TRACE}-{server.span_id}-1"
    spans = by_id(receiver.wait_spans(2))
    assert spans[server.span_id].parent_span_id.hex() == client.span_id
    assert spans[client.span_id].parent_span_id.hex() == CALLER_SPAN


def metric(telemetry: Telemetry, name: str) -> float:
    text = telemetry.exposition()[0].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not exposed")


def test_collector_down_drops_and_counts(receiver: Receiver) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    side = Side(dead, "frontend", span_queue_size=8, span_batch_size=4)
    try:
        for _ in range(20):
            rec, _ = side.telemetry.begin("source", "http", [])
            rec.status = 200
            side.telemetry.end(rec)
    finally:
        side.close()
    # Every span was either refused at the queue or lost with its failed batch.
    assert metric(side.telemetry, "synchro_spans_dropped_total") == 20
    assert metric(side.telemetry, "synchro_spans_exported_total") == 0


def test_stalled_collector_never_blocks_requests() -> None:
    # A collector that accepts connections and never answers: the exporter
    # thread hangs in its request; the data path keeps going and drops.
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    url = f"http://127.0.0.1:{hang.getsockname()[1]}/v1/traces"
    side = Side(url, "frontend", span_queue_size=16, span_batch_size=1)
    try:
        for _ in range(500):
            rec, _ = side.telemetry.begin("source", "http", [])
            rec.status = 200
            side.telemetry.end(rec)
        dropped = metric(side.telemetry, "synchro_spans_dropped_total")
        assert 500 - 16 - 2 <= dropped < 500
        assert metric(side.telemetry, "synchro_requests_total") == 500
    finally:
        hang.close()  # unblocks the exporter's request with an error
        side.close()


# -- /metrics of a real proxy process -------------------------------------------


def scrape(status: tuple[str, int], accept: str | None) -> tuple[int, str, str]:
    import http.client

    conn = http.client.HTTPConnection(*status, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def test_proxy_serves_prometheus_text_and_openmetrics() -> None:
    with (
        BackgroundServer(echo_handler) as app,
        run_proxy(
            static_destination=app.address,
            env={"SYNCHRO_ACCESS_LOG": "json", "SYNCHRO_TRACE_SAMPLING": "1"},
        ) as proxy,
    ):
        # A connection through the proxy shows up in the self-metrics while open.
        with socket.create_connection(proxy.outbound, timeout=5) as conn:
            conn.sendall(b"\x00hello")
            assert conn.recv(16)
            code, ctype, text = scrape(proxy.status, None)
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["synchro_open_connections"].samples[0].value >= 1
        assert families["synchro_process_cpu_seconds"].samples[0].value > 0
        assert families["synchro_process_resident_memory_bytes"].samples[0].value > 1e6
        assert "synchro_event_loop_lag_seconds" in families
        assert "# TYPE synchro_requests_total counter" in text

        code, ctype, text = scrape(
            proxy.status,
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        assert code == 200 and ctype.startswith("application/openmetrics-text")
        assert text.endswith("# EOF\n")
        assert "# TYPE synchro_requests counter" in text
        status, _ = proxy.get("/healthz/ready")
        assert status == 200
        dump = proxy.admin_json("/config_dump")
        assert dump["settings"]["telemetry"]["access_log"] == "json"
