"""Spans from request records, exported with OTLP over HTTP (protobuf).

Two parts:

- a pure core: `build_span(record)` turns a finished `RequestRecord` into an
  OpenTelemetry `Span` message (client span on the outbound side, server span on
  the inbound side) with the HTTP and RPC semantic-convention attributes, the
  peer identities and the response flags; `encode_export(...)` wraps spans in an
  `ExportTraceServiceRequest`.
- `SpanExporter`: a background thread that batches records from a bounded queue
  and POSTs them to the collector. `submit` never blocks and never does I/O: a
  full queue drops the span and counts it.

Why not the OpenTelemetry SDK: its spans are live objects that generate their
own ids when started, while the proxy must choose the span id before the
request is forwarded (it goes into `traceparent`) and learns the outcome only at
the end. Building the protocol messages from the finished record is simpler and
costs nothing for the 99% of requests that are not sampled.
"""

from __future__ import annotations

import collections
import http.client
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from proxy.telemetry.record import RequestRecord

log = logging.getLogger(__name__)

DEFAULT_PATH: Final = "/v1/traces"
SCOPE_NAME: Final = "synchro-proxy"
KNOWN_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
# gRPC codes that are a server's fault (OpenTelemetry RPC conventions): UNKNOWN,
# DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
GRPC_SERVER_ERRORS: Final = frozenset({"2", "4", "12", "13", "14", "15"})

AttrValue = str | int | bool


class TracingError(ValueError):
    """A tracing setting the proxy cannot use (e.g. a malformed collector URL)."""


# -- the collector address ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class OtlpEndpoint:
    scheme: str  # http | https
    host: str
    port: int
    path: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_endpoint(url: str) -> OtlpEndpoint:
    """`http(s)://host[:port][/path]`; no path means the OTLP default `/v1/traces`."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise TracingError(f"tracing endpoint {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise TracingError(
            f"tracing endpoint {url!r}: expected http://host:port/v1/traces (OTLP over HTTP)"
        )
    if not parts.hostname:
        raise TracingError(f"tracing endpoint {url!r}: no host")
    if parts.query or parts.fragment:
        raise TracingError(f"tracing endpoint {url!r}: no query or fragment expected")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
    default_port = 443 if parts.scheme == "https" else 4318
    return OtlpEndpoint(parts.scheme, parts.hostname, port or default_port, path)


# -- the span core (pure) -------------------------------------------------------


def _kv(key: str, value: AttrValue) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _split_host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return host, int(port) if port.isdigit() else None


def grpc_method(path: str) -> tuple[str, str] | None:
    """`/pkg.Service/Method` -> ("pkg.Service", "Method")."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) == 3 and parts[0] == "" and parts[1] and parts[2]:
        return parts[1], parts[2]
    return None


def span_name(rec: RequestRecord) -> str:
    """Semantic conventions: `{rpc.service}/{rpc.method}` for gRPC, else the
    HTTP method (a path would make names unbounded)."""
    if rec.protocol == "grpc":
        rpc = grpc_method(rec.path)
        if rpc is not None:
            return f"{rpc[0]}/{rpc[1]}"
    return rec.method if rec.method in KNOWN_METHODS else "HTTP"


def is_error(rec: RequestRecord) -> bool:
    client = rec.reporter == "source"
    if rec.protocol == "grpc" and rec.grpc_status:
        return rec.grpc_status != "0" if client else rec.grpc_status in GRPC_SERVER_ERRORS
    if rec.status == 0:
        return True  # no response at all: reset, timeout, refused
    return rec.status >= (400 if client else 500)


def span_attributes(rec: RequestRecord) -> list[tuple[str, AttrValue]]:
    client = rec.reporter == "source"
    attrs: list[tuple[str, AttrValue]] = [("network.protocol.name", "http")]
    if rec.http_version:
        attrs.append(("network.protocol.version", rec.http_version))
    if rec.method in KNOWN_METHODS:
        attrs.append(("http.request.method", rec.method))
    elif rec.method:
        attrs += [("http.request.method", "_OTHER"), ("http.request.method_original", rec.method)]
    if rec.status:
        attrs.append(("http.response.status_code", rec.status))
    path, _, query = rec.path.partition("?")
    host, port = _split_host_port(rec.authority)
    if client:
        if rec.authority:
            attrs.append(("url.full", f"http://{rec.authority}{rec.path}"))
    else:
        attrs += [("url.scheme", "http"), ("url.path", path or "/")]
        if query:
            attrs.append(("url.query", query))
    if host:
        attrs.append(("server.address", host))
        if port is not None:
            attrs.append(("server.port", port))
    peer = rec.upstream_host if client else rec.peer_address
    if peer:
        peer_host, peer_port = _split_host_port(peer)
        attrs.append(("network.peer.address", peer_host))
        if peer_port is not None:
            attrs.append(("network.peer.port", peer_port))
        if not client:
            attrs.append(("client.address", peer_host))
    if ua := rec.extra.get("user_agent"):
        attrs.append(("user_agent.original", ua))
    if rec.protocol == "grpc":
        attrs.append(("rpc.system", "grpc"))
        rpc = grpc_method(rec.path)
        if rpc is not None:
            attrs += [("rpc.service", rpc[0]), ("rpc.method", rpc[1])]
        if rec.grpc_status.isdigit():
            attrs.append(("rpc.grpc.status_code", int(rec.grpc_status)))
    if is_error(rec):
        attrs.append(("error.type", str(rec.status) if rec.status else _flag_error(rec)))
    attrs += [
        (key, value)
        for key, value in (
            ("synchro.response_flags", rec.flags),
            ("synchro.request_id", rec.request_id),
            ("synchro.route", rec.route),
            ("synchro.backend", rec.backend),
            ("synchro.upstream_host", rec.upstream_host),
            ("synchro.connection_security_policy", rec.security_policy),
            ("synchro.source.workload", rec.source_workload),
            ("synchro.source.namespace", rec.source_namespace),
            ("synchro.source.principal", rec.source_principal),
            ("synchro.destination.service", rec.destination_service),
            ("synchro.destination.workload", rec.destination_workload),
            ("synchro.destination.namespace", rec.destination_namespace),
            ("synchro.destination.principal", rec.destination_principal),
        )
        if value
    ]
    if rec.attempts > 1:
        attrs.append(("synchro.attempts", rec.attempts))
    return attrs


def _flag_error(rec: RequestRecord) -> str:
    return rec.flags if rec.flags and rec.flags != "-" else "_OTHER"


def build_span(rec: RequestRecord) -> Span:
    # Whole seconds apart: float nanoseconds since 1970 lose the last digits.
    seconds = int(rec.start_time)
    start = seconds * 1_000_000_000 + round((rec.start_time - seconds) * 1e9)
    span = Span(
        trace_id=bytes.fromhex(rec.trace_id),
        span_id=bytes.fromhex(rec.span_id),
        trace_state=rec.tracestate,
        name=span_name(rec),
        kind=Span.SPAN_KIND_CLIENT if rec.reporter == "source" else Span.SPAN_KIND_SERVER,
        start_time_unix_nano=start,
        end_time_unix_nano=start + max(0, int(rec.duration * 1e9)),
        attributes=[_kv(k, v) for k, v in span_attributes(rec)],
        flags=0x100 | (0x200 if rec.parent_span_id else 0) | 0x01,
    )
    if rec.parent_span_id:
        span.parent_span_id = bytes.fromhex(rec.parent_span_id)
    if is_error(rec):
        span.status.code = Status.STATUS_CODE_ERROR
    return span


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    """Who reports the spans (the OpenTelemetry resource)."""

    service_name: str = "synchro-proxy"
    namespace: str = ""
    pod: str = ""
    workload: str = ""

    def attributes(self) -> list[KeyValue]:
        pairs = [
            ("service.name", self.service_name),
            ("service.namespace", self.namespace),
            ("service.instance.id", self.pod),
            ("k8s.namespace.name", self.namespace),
            ("k8s.pod.name", self.pod),
            ("synchro.workload", self.workload),
            ("telemetry.sdk.name", SCOPE_NAME),
        ]
        return [_kv(k, v) for k, v in pairs if v]


def encode_export(records: Iterable[RequestRecord], resource: ResourceInfo) -> bytes:
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=resource.attributes()),
                scope_spans=[
                    ScopeSpans(
                        scope=InstrumentationScope(name=SCOPE_NAME),
                        spans=[build_span(r) for r in records],
                    )
                ],
            )
        ]
    )
    return bytes(request.SerializeToString())


# -- the exporter (adapter: a thread and an HTTP connection) -------------------


class HttpSender:
    """POSTs serialized export requests to the collector over one kept-alive
    connection; raises OSError / http.client errors / TracingError on failure."""

    def __init__(self, endpoint: OtlpEndpoint, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self.endpoint.scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self.endpoint.host, self.endpoint.port, timeout=self.timeout)
        return self._conn

    def __call__(self, body: bytes) -> None:
        headers = {"Content-Type": "application/x-protobuf"}
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("POST", self.endpoint.path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                # A kept-alive connection the collector closed: one fresh try.
                if attempt == 2:
                    raise
                continue
            if response.status >= 300:
                raise TracingError(f"collector {self.endpoint} answered {response.status}")
            return

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SpanExporter:
    """A bounded queue of finished, sampled records and the thread that ships them.

    `submit` is the only call on the data path: an append to a deque (atomic
    under the GIL), and a wake-up only when a full batch is waiting.
    """

    def __init__(
        self,
        send: Callable[[bytes], None],
        resource: ResourceInfo,
        *,
        queue_size: int = 2048,
        batch_size: int = 512,
        flush_interval: float = 1.0,
        on_dropped: Callable[[int], None] = lambda n: None,
        on_exported: Callable[[int], None] = lambda n: None,
    ) -> None:
        if queue_size < 1 or batch_size < 1 or flush_interval <= 0:
            raise TracingError("span queue size, batch size and flush interval must be positive")
        self.send = send
        self.resource = resource
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.on_dropped = on_dropped
        self.on_exported = on_exported
        self._queue: collections.deque[RequestRecord] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="synchro-span-export", daemon=True)
        self._last_warning = 0.0
        self.dropped = 0
        self.exported = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, rec: RequestRecord) -> bool:
        queue = self._queue
        if len(queue) >= self.queue_size:
            self.dropped += 1
            self.on_dropped(1)
            return False
        queue.append(rec)
        if len(queue) >= self.batch_size:
            self._wake.set()
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued (for at most `timeout` seconds) and stop."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> list[RequestRecord]:
        batch: list[RequestRecord] = []
        queue = self._queue
        while queue and len(batch) < self.batch_size:
            batch.append(queue.popleft())
        return batch

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            while batch := self._take():
                self._ship(batch)
                if self._stopping and not self._queue:
                    break
            if self._stopping:
                return

    def _ship(self, batch: Sequence[RequestRecord]) -> None:
        try:
            body = encode_export(batch, self.resource)
            self.send(body)
        except Exception as exc:  # the exporter thread must survive anything
            self.dropped += len(batch)
            self.on_dropped(len(batch))
            now = time.monotonic()
            if now - self._last_warning > 60.0:
                self._last_warning = now
                log.warning("dropped %d spans: export failed: %s", len(batch), exc)
            return
        self.exported += len(batch)
        self.on_exported(len(batch))
