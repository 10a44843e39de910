"""The proxy's Prometheus metrics (Istio-like names and labels, base units).

Labels never carry a raw path, query or header value: every label value comes
from config (service, route, workload names), identities, or small enums
(status code, flags), so the series count is bounded by the mesh's shape, not
by its traffic.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.telemetry.record import RequestRecord

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "destination_service",
    "destination_workload",
    "destination_namespace",
    "destination_principal",
    "request_protocol",
    "response_code",
    "grpc_status",
    "response_flags",
    "connection_security_policy",
    "route",
    "backend",
)
TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "destination_service",
    "destination_workload",
    "destination_namespace",
    "destination_principal",
    "connection_security_policy",
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("synchro_requests", "Requests handled", REQUEST_LABELS, registry=r)
        self.duration = Histogram(
            "synchro_request_duration_seconds",
            "Request duration",
            REQUEST_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_bytes = Histogram(
            "synchro_request_bytes",
            "Request body sizes",
            REQUEST_LABELS,
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.response_bytes = Histogram(
            "synchro_response_bytes",
            "Response body sizes",
            REQUEST_LABELS,
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.tcp_opened = Counter(
            "synchro_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=r
        )
        self.tcp_closed = Counter(
            "synchro_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=r
        )
        self.tcp_sent = Counter(
            "synchro_tcp_sent_bytes", "Bytes sent to the peer", TCP_LABELS, registry=r
        )
        self.tcp_received = Counter(
            "synchro_tcp_received_bytes", "Bytes received from the peer", TCP_LABELS, registry=r
        )
        self.retries = Counter(
            "synchro_retries", "Retries sent", ("destination_service", "reason"), registry=r
        )
        self.ejections = Counter(
            "synchro_outlier_ejections",
            "Endpoints ejected by outlier detection",
            ("destination_service",),
            registry=r,
        )
        self.breaker_open = Gauge(
            "synchro_circuit_breaker_open",
            "1 while a circuit breaker limit is reached",
            ("destination_service", "resource"),
            registry=r,
        )
        self.config_info = Gauge(
            "synchro_config_info", "Config version in force", ("version",), registry=r
        )
        self.cert_expiry = Gauge(
            "synchro_certificate_expiry_timestamp_seconds",
            "When the workload certificate expires",
            registry=r,
        )
        self.spans_dropped = Counter(
            "synchro_spans_dropped",
            "Spans dropped: export queue full or the collector failed",
            registry=r,
        )
        self.spans_exported = Counter(
            "synchro_spans_exported", "Spans the collector accepted", registry=r
        )
        self._children: dict[tuple[str, ...], tuple[object, object, object, object]] = {}

    def observe_request(self, rec: RequestRecord) -> None:
        key = (
            rec.reporter,
            rec.source_workload,
            rec.source_namespace,
            rec.source_principal,
            rec.destination_service,
            rec.destination_workload,
            rec.destination_namespace,
            rec.destination_principal,
            rec.protocol,
            str(rec.status),
            rec.grpc_status,
            rec.flags,
            rec.security_policy,
            rec.route,
            rec.backend,
        )
        # Caching the labelled children saves the label lookup on every request.
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(*key),
                self.duration.labels(*key),
                self.request_bytes.labels(*key),
                self.response_bytes.labels(*key),
            )
            self._children[key] = children
        requests, duration, req_bytes, resp_bytes = children
        requests.inc()  # type: ignore[attr-defined]
        duration.observe(rec.duration)  # type: ignore[attr-defined]
        req_bytes.observe(rec.request_bytes)  # type: ignore[attr-defined]
        resp_bytes.observe(rec.response_bytes)  # type: ignore[attr-defined]

    def observe_tcp(self, rec: RequestRecord, *, opened: bool) -> None:
        key = (
            rec.reporter,
            rec.source_workload,
            rec.source_namespace,
            rec.source_principal,
            rec.destination_service,
            rec.destination_workload,
            rec.destination_namespace,
            rec.destination_principal,
            rec.security_policy,
        )
        if opened:
            self.tcp_opened.labels(*key).inc()
            return
        self.tcp_closed.labels(*key).inc()
        self.tcp_sent.labels(*key).inc(rec.response_bytes)
        self.tcp_received.labels(*key).inc(rec.request_bytes)
