"""Local rate limiting: a token bucket per workload, optionally one per source
identity. A refused request gets 429 with `Retry-After` (response flag RL)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimitPolicy:
    requests_per_unit: int
    unit_seconds: float = 1.0
    burst: int | None = None
    per_source: bool = False

    def __post_init__(self) -> None:
        if self.requests_per_unit <= 0 or self.unit_seconds <= 0:
            raise ValueError("rateLimit: requestsPerUnit and unit must be positive")

    @property
    def rate(self) -> float:
        return self.requests_per_unit / self.unit_seconds

    @property
    def capacity(self) -> float:
        return float(self.burst if self.burst is not None else self.requests_per_unit)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """`check(source, now)` -> 0.0 when allowed, else seconds until a token."""

    MAX_SOURCES = 10_000  # bounded memory: least recently seen sources are dropped

    def __init__(self, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def check(self, source: str | None, now: float) -> float:
        key = (source or "") if self.policy.per_source else ""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=self.policy.capacity, stamp=now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.MAX_SOURCES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        elapsed = max(now - bucket.stamp, 0.0)
        bucket.tokens = min(self.policy.capacity, bucket.tokens + elapsed * self.policy.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.policy.rate


def retry_after_header(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
