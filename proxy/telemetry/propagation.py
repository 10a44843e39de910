"""Trace context propagation: W3C `traceparent`/`tracestate` and B3 (single and
multi header), read and written.

Hand-written on purpose: this runs on every request on the proxy's hot path,
and the formats are a few fixed-width hex fields. OpenTelemetry's propagators
would allocate a Context, a carrier getter and contextvar tokens per request;
the exporter (sampled spans only) uses the OpenTelemetry SDK.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass

_HEX = frozenset("0123456789abcdef")
INVALID_TRACE = "0" * 32
INVALID_SPAN = "0" * 16

# One C-level match instead of split-and-check: this runs on every traced request.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)

B3_MULTI = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "b3", *B3_MULTI})


def _is_hex(s: str, n: int) -> bool:
    return len(s) == n and set(s) <= _HEX


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str  # 32 lower-case hex
    span_id: str  # 16 lower-case hex: the caller's span, our parent
    sampled: bool | None  # None: the caller did not decide
    tracestate: str = ""
    fmt: str = "w3c"  # how it arrived: w3c | b3 | b3multi


def parse_traceparent(value: str) -> TraceContext | None:
    m = _TRACEPARENT.fullmatch(value.strip().lower())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    # Version 00 has exactly four fields; later versions may append more.
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == INVALID_TRACE or span_id == INVALID_SPAN:
        return None
    return TraceContext(trace_id, span_id, bool(int(flags, 16) & 1))


def _b3_trace_id(value: str) -> str | None:
    value = value.lower()
    if _is_hex(value, 16):
        value = "0" * 16 + value  # 64-bit B3 ids widen to 128 bits
    return value if _is_hex(value, 32) and value != INVALID_TRACE else None


def _b3_sampled(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("1", "d", "true"):
        return True
    if v in ("0", "false"):
        return False
    return None


def parse_b3_single(value: str) -> TraceContext | None:
    parts = value.strip().split("-")
    if len(parts) == 1:
        return None  # sampling-only ("0", "1", "d") carries no trace to continue
    trace_id = _b3_trace_id(parts[0])
    span_id = parts[1].lower()
    if trace_id is None or not _is_hex(span_id, 16) or span_id == INVALID_SPAN:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    return TraceContext(trace_id, span_id, sampled, fmt="b3")


def parse_b3_multi(headers: Mapping[str, str]) -> TraceContext | None:
    trace_id = _b3_trace_id(headers.get("x-b3-traceid", ""))
    span_id = headers.get("x-b3-spanid", "").lower()
    if trace_id is None or not _is_hex(span_id, 16) or span_id == INVALID_SPAN:
        return None
    sampled = _b3_sampled(headers.get("x-b3-sampled"))
    if headers.get("x-b3-flags") == "1":
        sampled = True
    return TraceContext(trace_id, span_id, sampled, fmt="b3multi")


def extract(headers: Mapping[str, str]) -> TraceContext | None:
    """The caller's trace context; W3C wins over B3 when both are present.
    `headers` has lower-case names."""
    tp = headers.get("traceparent")
    if tp is not None:
        ctx = parse_traceparent(tp)
        if ctx is not None:
            ts = headers.get("tracestate", "")
            return TraceContext(ctx.trace_id, ctx.span_id, ctx.sampled, ts)
    b3 = headers.get("b3")
    if b3 is not None:
        ctx = parse_b3_single(b3)
        if ctx is not None:
            return ctx
    if "x-b3-traceid" in headers:
        return parse_b3_multi(headers)
    return None


def new_trace_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(128) or 1:032x}"


def new_span_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(64) or 1:016x}"


def sample(parent: TraceContext | None, trace_id: str, percent: float) -> bool:
    """Parent-based sampling: follow the caller's decision, else sample
    `percent` of traces, decided by the trace id so every hop agrees."""
    if parent is not None and parent.sampled is not None:
        return parent.sampled
    if percent >= 100.0:
        return True
    if percent <= 0.0:
        return False
    # The low 56 bits of the trace id are random in W3C ids; compare them to
    # the threshold so the same trace gets the same answer at every proxy.
    return int(trace_id[-14:], 16) < int(percent / 100.0 * (1 << 56))


def inject(
    trace_id: str,
    span_id: str,
    sampled: bool,
    *,
    tracestate: str = "",
    incoming_fmt: str | None = None,
) -> list[tuple[str, str]]:
    """Headers to send downstream: always W3C, plus B3 in the format the
    request arrived with, so B3-only apps keep working."""
    out = [("traceparent", f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}")]
    if tracestate:
        out.append(("tracestate", tracestate))
    if incoming_fmt == "b3":
        out.append(("b3", f"{trace_id}-{span_id}-{'1' if sampled else '0'}"))
    elif incoming_fmt == "b3multi":
        out += [
            ("x-b3-traceid", trace_id),
            ("x-b3-spanid", span_id),
            ("x-b3-sampled", "1" if sampled else "0"),
        ]
    return out
