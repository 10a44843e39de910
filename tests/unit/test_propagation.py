"""Trace context propagation core: W3C and B3 in, W3C (plus the incoming B3 form) out."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from proxy.telemetry.propagation import (
    extract,
    inject,
    new_span_id,
    new_trace_id,
    parse_traceparent,
    sample,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_w3c_round_trip_and_tracestate() -> None:
    ctx = extract({"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "vendor=1"})
    assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.tracestate) == (
        TRACE,
        SPAN,
        True,
        "vendor=1",
    )
    out = dict(
        inject(
            ctx.trace_id, "1111111111111111", True, tracestate=ctx.tracestate, incoming_fmt=ctx.fmt
        )
    )
    assert out == {"traceparent": f"00-{TRACE}-1111111111111111-01", "tracestate": "vendor=1"}


def test_invalid_traceparent_values_are_ignored() -> None:
    for bad in (
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",
        f"ff-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-01-extra",
        f"00-{TRACE[:-1]}-{SPAN}-01",
        "garbage",
        "",
    ):
        assert parse_traceparent(bad) is None, bad
    # A future version may carry more fields.
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-more") is not None


def test_b3_single_and_multi_in_w3c_out_and_back() -> None:
    single = extract({"b3": f"{TRACE}-{SPAN}-1"})
    assert single is not None and single.fmt == "b3" and single.sampled
    out = dict(inject(single.trace_id, "2222222222222222", True, incoming_fmt=single.fmt))
    assert out["traceparent"] == f"00-{TRACE}-2222222222222222-01"
    assert out["b3"] == f"{TRACE}-2222222222222222-1"
    short = extract({"x-b3-traceid": TRACE[16:], "x-b3-spanid": SPAN, "x-b3-sampled": "0"})
    assert short is not None and short.trace_id == "0" * 16 + TRACE[16:] and short.sampled is False
    multi_out = dict(inject(short.trace_id, SPAN, False, incoming_fmt="b3multi"))
    assert multi_out["x-b3-sampled"] == "0" and multi_out["x-b3-traceid"] == short.trace_id
    assert extract({"b3": "1"}) is None  # sampling-only B3 starts a new trace
    # W3C wins when both arrive
    both = extract({"traceparent": f"00-{TRACE}-{SPAN}-00", "b3": f"{'a' * 32}-{SPAN}-1"})
    assert both is not None and both.trace_id == TRACE and both.sampled is False


def test_parent_based_sampling() -> None:
    rng = random.Random(5)
    parent_yes = extract({"traceparent": f"00-{TRACE}-{SPAN}-01"})
    parent_no = extract({"traceparent": f"00-{TRACE}-{SPAN}-00"})
    assert sample(parent_yes, TRACE, 0.0) is True
    assert sample(parent_no, TRACE, 100.0) is False
    ids = [new_trace_id(rng) for _ in range(20000)]
    share = sum(sample(None, t, 1.0) for t in ids) / len(ids)
    assert 0.005 < share < 0.015
    assert all(sample(None, t, 1.0) == sample(None, t, 1.0) for t in ids[:100])


@given(st.integers(min_value=0, max_value=2**32))
def test_generated_ids_are_valid(seed: int) -> None:
    rng = random.Random(seed)
    t, s = new_trace_id(rng), new_span_id(rng)
    assert parse_traceparent(f"00-{t}-{s}-01") is not None


@given(st.text(max_size=80))
def test_extract_never_raises_on_garbage(value: str) -> None:
    extract({"traceparent": value, "b3": value, "x-b3-traceid": value, "x-b3-spanid": value})
