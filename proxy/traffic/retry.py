"""Retry decisions: whether an attempt's outcome is retried, how long to back
off, and the per-service retry budget that stops retry storms."""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from dataclasses import dataclass

RETRIABLE_GRPC = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
CONDITIONS = frozenset(
    {"connect-failure", "refused-stream", "reset", "5xx", "gateway-error", "retriable-4xx"}
    | set(RETRIABLE_GRPC)
)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MAX_RETRIABLE_BODY = 64 * 1024


class RetryConfigError(ValueError):
    pass


class Failure(enum.Enum):
    """How an attempt failed before (or instead of) producing a response."""

    CONNECT_FAILURE = "connect-failure"  # never reached the upstream
    REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM: never processed
    RESET = "reset"  # connection reset after the request was sent
    TIMEOUT = "timeout"  # per-try timeout


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 1  # total tries, the first included
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset({"connect-failure", "refused-stream", "reset"})
    status_codes: frozenset[int] = frozenset()
    backoff_base: float = 0.025
    backoff_max: float = 0.250

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 11:
            raise RetryConfigError(f"attempts must be 1..11, got {self.attempts}")
        unknown = self.retry_on - CONDITIONS
        if unknown:
            raise RetryConfigError(
                f"unknown retryOn condition(s) {sorted(unknown)}; expected any of "
                f"{sorted(CONDITIONS)} or HTTP status codes"
            )
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise RetryConfigError("perTryTimeout must be positive")

    @classmethod
    def parse_retry_on(
        cls, items: list[str] | tuple[str, ...]
    ) -> tuple[frozenset[str], frozenset[int]]:
        conditions: set[str] = set()
        codes: set[int] = set()
        for item in items:
            item = item.strip().lower()
            if item.isdigit() and len(item) == 3:
                codes.add(int(item))
            elif item in CONDITIONS:
                conditions.add(item)
            else:
                raise RetryConfigError(
                    f"retryOn: {item!r} is neither a condition ({', '.join(sorted(CONDITIONS))}) "
                    "nor a 3-digit HTTP status"
                )
        return frozenset(conditions), frozenset(codes)


def retriable_outcome(
    policy: RetryPolicy,
    *,
    status: int | None = None,
    grpc_status: int | None = None,
    failure: Failure | None = None,
) -> bool:
    """Does `retryOn` cover this outcome? (Idempotency and budget are separate.)"""
    on = policy.retry_on
    if failure is not None:
        if failure is Failure.CONNECT_FAILURE:
            return "connect-failure" in on or "gateway-error" in on or "5xx" in on
        if failure is Failure.REFUSED_STREAM:
            return "refused-stream" in on
        if failure is Failure.RESET:
            return "reset" in on or "5xx" in on
        return "5xx" in on or "gateway-error" in on  # per-try timeout acts as 504
    if grpc_status is not None and grpc_status != 0:
        return any(on_name in on for on_name, code in RETRIABLE_GRPC.items() if code == grpc_status)
    if status is None:
        return False
    if status in policy.status_codes:
        return True
    if status >= 500 and "5xx" in on:
        return True
    if status in (502, 503, 504) and "gateway-error" in on:
        return True
    return status == 409 and "retriable-4xx" in on


def may_replay(method: str, body_size: int | None, failure: Failure | None) -> bool:
    """A request is replayed only if doing so is safe and possible: the body was
    kept (<= 64 KiB), and the method is idempotent or the first try never
    reached the upstream (connect failure, refused stream)."""
    if body_size is None or body_size > MAX_RETRIABLE_BODY:
        return False
    if method.upper() in IDEMPOTENT_METHODS:
        return True
    return failure in (Failure.CONNECT_FAILURE, Failure.REFUSED_STREAM)


def backoff(
    retry_number: int, rng: random.Random, *, base: float = 0.025, cap: float = 0.250
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base*2^(n-1))]."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    return rng.uniform(0.0, min(cap, base * (2 ** (retry_number - 1))))


class RetryBudget:
    """Retries allowed <= ratio x requests + min_per_second x window, over a
    sliding `window` (Linkerd's budget). Counts are bucketed per second so
    memory is bounded whatever the request rate; running totals and the time
    of the next bucket change make counting a request O(1)."""

    def __init__(
        self, *, ratio: float = 0.2, min_per_second: float = 10.0, window: float = 10.0
    ) -> None:
        if ratio < 0 or min_per_second < 0 or window <= 0:
            raise RetryConfigError("retry budget values must be non-negative, window positive")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._buckets: deque[list[float]] = deque()  # [second, requests, retries]
        self._requests = 0.0  # sums over _buckets
        self._retries = 0.0
        # Until this time (and from the current bucket's second on) no bucket
        # expires and no new one starts: the current bucket takes the count.
        self._steady_until = -math.inf
        self._current: list[float] = [math.inf, 0.0, 0.0]  # _buckets[-1] once there is one
        self._current_second = math.inf

    def _bucket(self, now: float) -> list[float]:
        buckets = self._buckets
        if buckets and buckets[-1][0] <= now < self._steady_until:
            return buckets[-1]
        second = float(int(now))
        while buckets and buckets[0][0] <= now - self.window:
            old = buckets.popleft()
            self._requests -= old[1]
            self._retries -= old[2]
        if not buckets:
            self._requests = self._retries = 0.0  # no rounding residue when empty
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0.0, 0.0])
        current = self._current = buckets[-1]
        self._current_second = current[0]
        # The oldest bucket leaves once now - window reaches its second. (int()
        # truncates towards zero: before 0 the fast path would disagree.)
        self._steady_until = (
            min(current[0] + 1.0, buckets[0][0] + self.window) if current[0] >= 0 else -math.inf
        )
        return current

    def configure(self, *, ratio: float, min_per_second: float, window: float) -> None:
        """New settings; what was counted stays."""
        self.ratio, self.min_per_second, self.window = ratio, min_per_second, window
        self._steady_until = -math.inf  # the window may have shrunk: recheck expiry

    def on_request(self, now: float) -> None:
        if self._current_second <= now < self._steady_until:
            self._current[1] += 1  # _bucket's fast path, inlined: once per request
        else:
            self._bucket(now)[1] += 1
        self._requests += 1

    def try_withdraw(self, now: float) -> bool:
        """Spend one retry if the budget allows it."""
        current = self._bucket(now)
        if self._retries + 1 > self.ratio * self._requests + self.min_per_second * self.window:
            return False
        current[2] += 1
        self._retries += 1
        return True
