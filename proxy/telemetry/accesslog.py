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
        "source_principal": r.source_principal or None,
        "destination_principal": r.destination_principal or None,
        "destination_service": r.destination_service or None,
        "request_id": r.request_id or None,
        "trace_id": r.trace_id or None,
    }


def format_json(r: RequestRecord) -> str:
    return json.dumps(as_dict(r), separators=(",", ":"))


def format_text(r: RequestRecord) -> str:
    """Envoy's default text shape, roughly: time "METHOD PATH PROTO" status flags ..."""
    if r.protocol == "tcp":
        head = '"- - TCP"'
    else:
        head = f'"{r.method} {r.path} {r.protocol.upper()}"'
    return (
        f"[{_iso(r.start_time)}] {head} {r.status or '-'} {r.flags} "
        f"{r.request_bytes} {r.response_bytes} {round(r.duration * 1000)} "
        f'"{r.upstream_host or "-"}" "{r.route or "-"}" "{r.source_principal or "-"}" '
        f'"{r.request_id or "-"}" "{r.trace_id or "-"}"'
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
