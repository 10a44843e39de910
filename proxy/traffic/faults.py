"""Fault injection: delay and abort a share of requests, as TrafficPolicy says."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultPolicy:
    delay: float | None = None
    delay_percent: float = 0.0
    abort_http_status: int | None = None
    abort_grpc_status: int | None = None
    abort_percent: float = 0.0

    def __post_init__(self) -> None:
        for name in ("delay_percent", "abort_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"faultInjection: {name} must be 0..100, got {value}")
        if self.abort_http_status is not None and not 200 <= self.abort_http_status <= 599:
            raise ValueError("faultInjection.abort.httpStatus must be 200..599")


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float = 0.0
    abort_http_status: int | None = None
    abort_grpc_status: int | None = None

    @property
    def injected(self) -> bool:
        return (
            bool(self.delay)
            or self.abort_http_status is not None
            or self.abort_grpc_status is not None
        )


NO_FAULT = FaultDecision()


def decide(policy: FaultPolicy | None, rng: random.Random, *, grpc: bool) -> FaultDecision:
    if policy is None:
        return NO_FAULT
    delay = 0.0
    if policy.delay and rng.random() * 100.0 < policy.delay_percent:
        delay = policy.delay
    http_status = grpc_status = None
    if rng.random() * 100.0 < policy.abort_percent:
        if grpc and policy.abort_grpc_status is not None:
            grpc_status = policy.abort_grpc_status
        elif policy.abort_http_status is not None:
            http_status = policy.abort_http_status
        elif policy.abort_grpc_status is not None:
            grpc_status = policy.abort_grpc_status
    if not delay and http_status is None and grpc_status is None:
        return NO_FAULT
    return FaultDecision(delay, http_status, grpc_status)
