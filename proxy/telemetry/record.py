"""What happened to one request or TCP connection: the one record that feeds
metrics, the access log and the span, so the three always agree."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    reporter: str  # "source" (outbound side) | "destination" (inbound side)
    protocol: str  # "http" | "grpc" | "tcp"
    start_time: float  # wall clock, seconds since the epoch
    duration: float = 0.0  # seconds
    method: str = ""
    authority: str = ""
    path: str = ""  # for access logs and spans only, never a metric label
    status: int = 0
    grpc_status: str = ""
    flags: str = "-"
    request_bytes: int = 0
    response_bytes: int = 0
    upstream_host: str = ""
    route: str = ""
    backend: str = ""
    source_workload: str = ""
    source_namespace: str = ""
    source_principal: str = ""
    destination_service: str = ""
    destination_workload: str = ""
    destination_namespace: str = ""
    destination_principal: str = ""
    security_policy: str = "none"  # "mutual_tls" | "none"
    request_id: str = ""
    trace_id: str = ""
    span_id: str = ""
    attempts: int = 1
    extra: dict[str, str] = field(default_factory=dict)
    # Filled by `Telemetry.begin`; the span and the duration are derived from them.
    parent_span_id: str = ""  # the caller's span ("" for a new trace)
    sampled: bool = False
    tracestate: str = ""
    http_version: str = ""  # "1.1" | "2" (network.protocol.version)
    peer_address: str = ""  # the downstream client's "host:port"
    mono_start: float = 0.0  # time.perf_counter() at begin, 0 when not measured
