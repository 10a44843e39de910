"""The proxy's Prometheus metrics (Istio-like names and labels, base units).

Labels never carry a raw path, query or header value: every label value comes
from config (service, route, workload names), identities, or small enums
(status code, flags), so the series count is bounded by the mesh's shape, not
by its traffic.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class _Series:
    """One label set's request counts: plain ints and floats, summed when scraped."""

    __slots__ = ("dur", "dur_sum", "req", "req_sum", "resp", "resp_sum")

    def __init__(self) -> None:
        # Per bucket (not cumulative) so an observation is one bisect and one add;
        # the last slot is +Inf.
        self.dur = [0] * (len(LATENCY_BUCKETS) + 1)
        self.dur_sum = 0.0
        self.req = [0] * (len(SIZE_BUCKETS) + 1)
        self.req_sum = 0.0
        self.resp = [0] * (len(SIZE_BUCKETS) + 1)
        self.resp_sum = 0.0


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        total += n
        out.append((floatToGoString(bound), total))
    return out


class RequestCollector(Collector):
    """The per-request families (`synchro_requests_total` and the three
    histograms), kept as plain numbers rather than prometheus_client children:
    those take a lock per update, four updates per request, on the data path.
    Updates come from the event loop thread, and so do scrapes (the status
    port shares the loop)."""

    def __init__(self) -> None:
        # By label values; the response code (index 9) as an int.
        self.series: dict[tuple[str | int, ...], _Series] = {}

    def observe_record(
        self,
        rec: RequestRecord,
        _bisect: Callable[[tuple[float, ...], float], int] = bisect_left,
        _latency: tuple[float, ...] = LATENCY_BUCKETS,
        _size: tuple[float, ...] = SIZE_BUCKETS,
    ) -> None:
        """One finished request (`ProxyMetrics.observe_request`): the label tuple
        and the four families' updates in one call, as this runs per request.
        (The status stays an int here and becomes text when scraped; the
        request count is the duration histogram's total.)"""
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
            rec.status,
            rec.grpc_status,
            rec.flags,
            rec.security_policy,
            rec.route,
            rec.backend,
        )
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series()
        duration = rec.duration
        s.dur[_bisect(_latency, duration)] += 1
        s.dur_sum += duration
        size = rec.request_bytes
        if size:
            s.req[_bisect(_size, size)] += 1
            s.req_sum += size
        else:  # most requests have no body
            s.req[0] += 1
        size = rec.response_bytes
        s.resp[_bisect(_size, size)] += 1
        s.resp_sum += size

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        labels = list(REQUEST_LABELS)
        requests = CounterMetricFamily("synchro_requests", "Requests handled", labels=labels)
        duration = HistogramMetricFamily(
            "synchro_request_duration_seconds", "Request duration", labels=labels
        )
        req_bytes = HistogramMetricFamily(
            "synchro_request_bytes", "Request body sizes", labels=labels
        )
        resp_bytes = HistogramMetricFamily(
            "synchro_response_bytes", "Response body sizes", labels=labels
        )
        for key, s in list(self.series.items()):
            values = [str(v) for v in key]
            requests.add_metric(values, sum(s.dur))
            duration.add_metric(values, _cumulative(LATENCY_BUCKETS, s.dur), s.dur_sum)
            req_bytes.add_metric(values, _cumulative(SIZE_BUCKETS, s.req), s.req_sum)
            resp_bytes.add_metric(values, _cumulative(SIZE_BUCKETS, s.resp), s.resp_sum)
        yield from (requests, duration, req_bytes, resp_bytes)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_series = RequestCollector()
        r.register(self.request_series)
        # Per request: one call straight into the collector.
        self.observe_request: Callable[[RequestRecord], None] = self.request_series.observe_record
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
