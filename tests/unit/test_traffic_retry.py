"""Retry, deadline, outlier, breaker, rate-limit and fault cores."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.traffic import deadline as dl
from proxy.traffic.breaker import BreakerLimits, CircuitBreaker, Resource
from proxy.traffic.faults import FaultPolicy, decide
from proxy.traffic.outlier import OutlierDetector, OutlierPolicy
from proxy.traffic.ratelimit import RateLimiter, RateLimitPolicy, retry_after_header
from proxy.traffic.retry import (
    Failure,
    RetryBudget,
    RetryConfigError,
    RetryPolicy,
    backoff,
    may_replay,
    retriable_outcome,
)


def test_retry_on_conditions() -> None:
    p = RetryPolicy(attempts=3, retry_on=frozenset({"5xx"}))
    assert retriable_outcome(p, status=503)
    assert not retriable_outcome(p, status=404)
    assert not retriable_outcome(p, status=200)
    gw = RetryPolicy(attempts=3, retry_on=frozenset({"gateway-error"}))
    assert retriable_outcome(gw, status=502) and not retriable_outcome(gw, status=500)
    assert retriable_outcome(gw, failure=Failure.CONNECT_FAILURE)
    codes = RetryPolicy(attempts=2, retry_on=frozenset(), status_codes=frozenset({418}))
    assert retriable_outcome(codes, status=418)
    grpc = RetryPolicy(attempts=2, retry_on=frozenset({"unavailable"}))
    assert retriable_outcome(grpc, status=200, grpc_status=14)
    assert not retriable_outcome(grpc, status=200, grpc_status=5)


def test_retry_on_parse_errors_name_the_value() -> None:
    assert RetryPolicy.parse_retry_on(["5xx", "503", "unavailable"]) == (
        frozenset({"5xx", "unavailable"}),
        frozenset({503}),
    )
    with pytest.raises(RetryConfigError, match="'sometimes'"):
        RetryPolicy.parse_retry_on(["sometimes"])
    with pytest.raises(RetryConfigError, match="attempts"):
        RetryPolicy(attempts=0)


def test_non_idempotent_replayed_only_when_never_sent() -> None:
    assert may_replay("GET", 0, Failure.RESET)
    assert not may_replay("POST", 10, Failure.RESET)
    assert may_replay("POST", 10, Failure.CONNECT_FAILURE)
    assert may_replay("POST", 10, Failure.REFUSED_STREAM)
    assert not may_replay("GET", 64 * 1024 + 1, None)
    assert not may_replay("GET", None, None)  # body not kept: streamed


@given(st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=10**6))
def test_backoff_bounds(n: int, seed: int) -> None:
    wait = backoff(n, random.Random(seed), base=0.025, cap=0.25)
    assert 0.0 <= wait <= min(0.25, 0.025 * 2 ** (n - 1))


def test_budget_arithmetic() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10, window=10)
    now = 100.0
    for _ in range(1000):
        budget.on_request(now)
    allowed = sum(budget.try_withdraw(now) for _ in range(1000))
    assert allowed == 200 + 100  # 20% of requests + 10/s over 10 s
    # After the window passes, the old spending is forgotten.
    later = now + 11
    budget.on_request(later)
    assert budget.try_withdraw(later)


def test_budget_holds_storm_to_1_3x() -> None:
    budget = RetryBudget()
    upstream = 0
    now = 0.0
    for i in range(2000):
        now = i * 0.001  # 1000 requests/s for 2 s, every attempt fails
        budget.on_request(now)
        upstream += 1
        for _ in range(2):  # up to two retries each
            if budget.try_withdraw(now):
                upstream += 1
    assert upstream <= 1.3 * 2000


def test_deadline_arithmetic() -> None:
    assert dl.parse_grpc_timeout("100m") == pytest.approx(0.1)
    assert dl.parse_grpc_timeout("2S") == 2.0
    assert dl.parse_grpc_timeout("1H") == 3600.0
    for bad in ("", "m", "10", "1x", "123456789m", "-1m"):
        with pytest.raises(dl.DeadlineHeaderError):
            dl.parse_grpc_timeout(bad)
    with pytest.raises(dl.DeadlineHeaderError, match="synchro-deadline-ms"):
        dl.parse_deadline_ms("soon")
    d = dl.deadline_from_headers("200m", "50", 1.0, now=10.0)
    assert d.at == pytest.approx(10.05)  # the smallest wins
    assert d.bound(1.0, 10.0) == pytest.approx(0.05)
    assert not d.expired(10.049) and d.expired(10.05)
    assert d.outgoing_headers(10.02, grpc=False, had_header=True) == {"synchro-deadline-ms": "30"}
    assert d.outgoing_headers(10.02, grpc=True, had_header=False) == {"grpc-timeout": "30m"}
    none = dl.deadline_from_headers(None, None, None, now=0.0)
    assert none.at is None and none.bound(2.0, 0.0) == 2.0 and not none.expired(1e9)


@given(st.floats(min_value=0.0005, max_value=1e6))
def test_grpc_timeout_round_trip_never_loses_much(seconds: float) -> None:
    text = dl.format_grpc_timeout(seconds)
    back = dl.parse_grpc_timeout(text)
    assert len(text) <= 9 and back >= seconds - 1e-9 and back <= seconds + max(1.0, seconds * 1e-6)


def test_outlier_ejection_and_readmission_timing() -> None:
    det = OutlierDetector(
        OutlierPolicy(consecutive_5xx=5, base_ejection_time=30, max_ejection_percent=50)
    )
    eps = ["a", "b"]
    for i in range(4):
        assert not det.on_result("a", float(i), status=500, total_endpoints=2)
    assert det.on_result("a", 4.0, status=500, total_endpoints=2)
    assert det.is_ejected("a", 5.0) and det.healthy(eps, 5.0) == (["b"], False)
    assert det.is_ejected("a", 33.9) and not det.is_ejected("a", 34.0)
    # Second ejection lasts twice as long.
    for i in range(5):
        det.on_result("a", 40.0 + i, status=503, total_endpoints=2)
    assert det.is_ejected("a", 44.0 + 59.0) and not det.is_ejected("a", 44.0 + 60.0)
    assert det.ejections_total == 2


def test_outlier_success_resets_consecutive_count() -> None:
    det = OutlierDetector(OutlierPolicy(consecutive_5xx=3, max_ejection_percent=100))
    for status in (500, 500, 200, 500, 500):
        assert not det.on_result("a", 0.0, status=status, total_endpoints=1)


def test_outlier_max_ejection_percent_and_panic_mode() -> None:
    det = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=50))
    eps = ["a", "b", "c", "d"]
    for ep in eps:
        det.on_result(ep, 0.0, status=500, total_endpoints=4)
    assert sum(det.is_ejected(e, 0.0) for e in eps) == 2
    full = OutlierDetector(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100))
    for ep in eps:
        full.on_result(ep, 0.0, status=500, total_endpoints=4)
    assert full.healthy(eps, 1.0) == (eps, True)  # panic: balance over all


def test_outlier_gateway_errors_and_connect_failures() -> None:
    det = OutlierDetector(
        OutlierPolicy(consecutive_5xx=0, consecutive_gateway_errors=2, max_ejection_percent=100)
    )
    det.on_result("a", 0.0, status=500, total_endpoints=1)
    assert not det.on_result("a", 0.0, status=500, total_endpoints=1)
    det.on_result("a", 0.0, status=None, connect_failure=True, total_endpoints=1)
    assert det.on_result("a", 0.0, status=502, total_endpoints=1)


def test_outlier_success_rate_ejection() -> None:
    det = OutlierDetector(
        OutlierPolicy(
            consecutive_5xx=0,
            consecutive_gateway_errors=0,
            success_rate_enabled=True,
            max_ejection_percent=100,
        )
    )
    eps = [f"e{i}" for i in range(6)]
    for ep in eps:
        for i in range(100):
            bad = ep == "e0" and i < 60
            det.on_result(ep, 0.0, status=500 if bad else 200, total_endpoints=6)
    assert det.sweep(eps, 1.0) == ["e0"]


def test_breaker_limits() -> None:
    b = CircuitBreaker(BreakerLimits(max_requests=2))
    assert b.try_acquire(Resource.REQUESTS) and b.try_acquire(Resource.REQUESTS)
    assert not b.try_acquire(Resource.REQUESTS) and b.is_open()
    b.release(Resource.REQUESTS)
    assert b.try_acquire(Resource.REQUESTS)


def test_rate_limiter_token_bucket_per_source() -> None:
    rl = RateLimiter(RateLimitPolicy(requests_per_unit=2, unit_seconds=1.0, per_source=True))
    assert rl.check("a", 0.0) == 0.0 and rl.check("a", 0.0) == 0.0
    wait = rl.check("a", 0.0)
    assert wait == pytest.approx(0.5) and retry_after_header(wait) == "1"
    assert rl.check("b", 0.0) == 0.0  # another source has its own bucket
    assert rl.check("a", 0.5) == 0.0  # refilled


def test_fault_percentages() -> None:
    rng = random.Random(7)
    policy = FaultPolicy(delay=0.1, delay_percent=20, abort_http_status=503, abort_percent=10)
    decisions = [decide(policy, rng, grpc=False) for _ in range(10000)]
    delayed = sum(d.delay > 0 for d in decisions) / 10000
    aborted = sum(d.abort_http_status == 503 for d in decisions) / 10000
    assert 0.18 < delayed < 0.22 and 0.08 < aborted < 0.12
    with pytest.raises(ValueError, match="abort_percent"):
        FaultPolicy(abort_percent=120)


class _ReferenceBudget:
    """The budget as first written (a deque scan per call): what RetryBudget's
    running totals and fast path must agree with."""

    def __init__(self, ratio: float, min_per_second: float, window: float) -> None:
        self.ratio, self.min_per_second, self.window = ratio, min_per_second, window
        self.buckets: list[list[float]] = []

    def _bucket(self, now: float) -> list[float]:
        second = float(int(now))
        while self.buckets and self.buckets[0][0] <= now - self.window:
            self.buckets.pop(0)
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, 0.0, 0.0])
        return self.buckets[-1]

    def on_request(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def try_withdraw(self, now: float) -> bool:
        current = self._bucket(now)
        requests = sum(b[1] for b in self.buckets)
        retries = sum(b[2] for b in self.buckets)
        if retries + 1 > self.ratio * requests + self.min_per_second * self.window:
            return False
        current[2] += 1
        return True


@given(
    st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=0.4), st.booleans()),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from([(0.2, 1.0, 10.0), (0.5, 0.0, 4.0), (0.0, 1.0, 2.0), (1.0, 0.0, 3.5)]),
    st.integers(min_value=0, max_value=299),
)
def test_budget_agrees_with_the_reference(
    steps: list[tuple[float, bool]], settings: tuple[float, float, float], reconfigure_at: int
) -> None:
    ratio, per_second, window = settings
    budget = RetryBudget(ratio=ratio, min_per_second=per_second, window=window)
    reference = _ReferenceBudget(ratio, per_second, window)
    now = 0.0
    for i, (step, retry) in enumerate(steps):
        now += step
        if i == reconfigure_at % len(steps):  # a shrinking window expires old buckets at once
            budget.configure(ratio=ratio, min_per_second=per_second, window=window / 4)
            reference.window = window / 4
        if retry:
            assert budget.try_withdraw(now) == reference.try_withdraw(now)
        else:
            budget.on_request(now)
            reference.on_request(now)


def test_budget_shrunk_window_forgets_at_once() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=4.0)
    for _ in range(10):
        budget.on_request(0.1)
    budget.on_request(1.1)
    budget.configure(ratio=0.5, min_per_second=0.0, window=1.0)
    # Only the request at 1.1 is within the new window: half a retry, none allowed.
    assert not budget.try_withdraw(1.3)
