"""Access log lines, JSON (default) or text, one per request or TCP connection,
on their own logger so they can be routed apart from the proxy's own logs."""

from __future__ import annotations

import datetime as dt
import json
import logging

from proxy.telemetry.record import RequestRecord

ACCESS_LOGGER = "synchro.access"
FORMATS = ("off", "json", "text")


def _iso(ts: float) -> str:
    return (
        dt.datetime.fromtimestamp(ts, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def as_dict(r: RequestRecord) -> dict[str, object]:
    return {
        "time": _iso(r.start_time),
        "reporter": r.reporter,
        "protocol": r.protocol,
        "http_version": r.http_version or None,
        "downstream_peer": r.peer_address or None,
        "method": r.method or None,
        "authority": r.authority or None,
        "path": r.path or None,
        "status": r.status or None,
        "grpc_status": r.grpc_status or None,
        "response_flags": r.flags,
        "bytes_received": r.request_bytes,
        "bytes_sent": r.response_bytes,
        "duration_ms": round(r.duration * 1000, 3),
        "upstream_host": r.upstream_host or None,
        "route": r.route or None,
        "source_workload": r.source_workload or None,
        "source_namespace": r.source_namespace or None,
        "source_principal": r.source_principal or None,
        "destination_service": r.destination_service or None,
        "destination_workload": r.destination_workload or None,
        "destination_principal": r.destination_principal or None,
        "connection_security_policy": r.security_policy,
        "request_id": r.request_id or None,
        "trace_id": r.trace_id or None,
    }


def format_json(r: RequestRecord) -> str:
    return json.dumps(as_dict(r), separators=(",", ":"))


TEXT_FIELDS = (
    "time",
    "method path protocol",
    "status",
    "grpc_status",
    "response_flags",
    "bytes_received",
    "bytes_sent",
    "duration_ms",
    "authority",
    "upstream_host",
    "route",
    "peer_principal",
    "request_id",
    "trace_id",
)


def format_text(r: RequestRecord) -> str:
    """Envoy's default text shape, fields in TEXT_FIELDS' order:
    `[time] "METHOD PATH PROTOCOL" status grpc flags in out ms "authority"
    "upstream" "route" "peer" "request id" "trace id"`; `-` for none. The peer is
    the other side's SPIFFE ID: the caller inbound, the callee outbound."""
    if r.protocol == "tcp":
        head = '"- - TCP"'
    else:
        head = f'"{r.method} {r.path} HTTP/{r.http_version or "1.1"}"'
    peer = r.source_principal if r.reporter == "destination" else r.destination_principal
    return (
        f"[{_iso(r.start_time)}] {head} {r.status or '-'} {r.grpc_status or '-'} {r.flags} "
        f"{r.request_bytes} {r.response_bytes} {round(r.duration * 1000)} "
        f'"{r.authority or "-"}" "{r.upstream_host or "-"}" "{r.route or "-"}" '
        f'"{peer or "-"}" "{r.request_id or "-"}" "{r.trace_id or "-"}"'
    )


class AccessLog:
    def __init__(self, fmt: str = "json", logger: logging.Logger | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format {fmt!r}: expected one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._format = format_json if fmt == "json" else format_text

    def emit(self, r: RequestRecord) -> None:
        if self.fmt != "off":
            self.logger.info(self._format(r))
