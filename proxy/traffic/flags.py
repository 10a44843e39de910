"""Envoy-style response flags, recorded per request for metrics and access logs."""

from __future__ import annotations

import enum


class Flag(enum.Enum):
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECT_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"  # circuit breaker limit reached
    UPSTREAM_TIMEOUT = "UT"
    DEADLINE_EXCEEDED = "DX"
    RETRIES_EXHAUSTED = "URX"
    FAULT_INJECTED = "FI"
    RATE_LIMITED = "RL"
    UPSTREAM_RESET = "UR"
    DOWNSTREAM_RESET = "DR"
    UNAUTHORIZED = "UAEX"
    NO_ROUTE = "NR"


def render(flags: set[Flag] | frozenset[Flag]) -> str:
    """`"-"` for none, else the codes sorted and comma-joined (Envoy's format)."""
    return ",".join(sorted(f.value for f in flags)) if flags else "-"


# The status each failure maps to, in one place (DESIGN.md: 502 upstream failure,
# 503 no healthy endpoint or circuit open, 504 timeout or deadline).
STATUS = {
    Flag.NO_HEALTHY_UPSTREAM: 503,
    Flag.UPSTREAM_CONNECT_FAILURE: 502,
    Flag.UPSTREAM_OVERFLOW: 503,
    Flag.UPSTREAM_TIMEOUT: 504,
    Flag.DEADLINE_EXCEEDED: 504,
    Flag.RATE_LIMITED: 429,
    Flag.UPSTREAM_RESET: 502,
    Flag.UNAUTHORIZED: 403,
    Flag.NO_ROUTE: 404,
}

# gRPC statuses for the same failures (UNAVAILABLE, DEADLINE_EXCEEDED, ...).
GRPC_STATUS = {
    Flag.NO_HEALTHY_UPSTREAM: 14,
    Flag.UPSTREAM_CONNECT_FAILURE: 14,
    Flag.UPSTREAM_OVERFLOW: 14,
    Flag.UPSTREAM_TIMEOUT: 4,
    Flag.DEADLINE_EXCEEDED: 4,
    Flag.RATE_LIMITED: 8,
    Flag.UPSTREAM_RESET: 14,
    Flag.UNAUTHORIZED: 7,
    Flag.NO_ROUTE: 12,
}
