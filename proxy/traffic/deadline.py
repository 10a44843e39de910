"""Deadlines: read the caller's remaining time, combine it with the route's
timeout, and say what to pass downstream.

Incoming: gRPC's `grpc-timeout` (`<digits><unit>`, unit one of H M S m u n) and
Synchro's own `synchro-deadline-ms` (remaining milliseconds, an integer) for
plain HTTP. The smaller wins. Outgoing, the proxy writes the remaining budget
back into the header(s) the request arrived with (gRPC requests always get
`grpc-timeout`), so every hop sees the time actually left.
"""

from __future__ import annotations

from dataclasses import dataclass

DEADLINE_HEADER = "synchro-deadline-ms"
GRPC_TIMEOUT_HEADER = "grpc-timeout"

_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class DeadlineHeaderError(ValueError):
    pass


def parse_grpc_timeout(value: str) -> float:
    """`"100m"` -> 0.1 seconds. At most 8 digits, per the gRPC HTTP/2 spec."""
    value = value.strip()
    if len(value) < 2 or value[-1] not in _GRPC_UNITS or not value[:-1].isdigit() or len(value) > 9:
        raise DeadlineHeaderError(
            f"grpc-timeout {value!r}: expected 1-8 digits and a unit of H M S m u n"
        )
    return int(value[:-1]) * _GRPC_UNITS[value[-1]]


def format_grpc_timeout(seconds: float) -> str:
    """The shortest exact-enough encoding that fits in 8 digits, in milliseconds
    when that is precise enough (round up: never promise more time than there is...
    but never 0, which would mean 'already expired' to some servers)."""
    ms = max(1, int(seconds * 1000 + 0.999))
    if ms < 100_000_000:
        return f"{ms}m"
    return f"{min(int(seconds) + 1, 99_999_999)}S"


def parse_deadline_ms(value: str) -> float:
    value = value.strip()
    if not value.isdigit() or len(value) > 12:
        raise DeadlineHeaderError(
            f"{DEADLINE_HEADER} {value!r}: expected a non-negative integer of milliseconds"
        )
    return int(value) / 1000.0


@dataclass(frozen=True, slots=True)
class Deadline:
    """An absolute deadline on the monotonic clock, or none."""

    at: float | None

    def remaining(self, now: float) -> float | None:
        return None if self.at is None else self.at - now

    def expired(self, now: float) -> bool:
        return self.at is not None and now >= self.at

    def bound(self, timeout: float | None, now: float) -> float | None:
        """The time an attempt may take: the smaller of `timeout` and what is left."""
        left = self.remaining(now)
        if left is None:
            return timeout
        if timeout is None:
            return max(left, 0.0)
        return max(min(timeout, left), 0.0)

    def outgoing_headers(self, now: float, *, grpc: bool, had_header: bool) -> dict[str, str]:
        left = self.remaining(now)
        if left is None:
            return {}
        out: dict[str, str] = {}
        if grpc:
            out[GRPC_TIMEOUT_HEADER] = format_grpc_timeout(max(left, 0.0))
        if had_header or not grpc:
            out[DEADLINE_HEADER] = str(max(int(left * 1000), 0))
        return out


def deadline_from_headers(
    grpc_timeout: str | None,
    deadline_ms: str | None,
    route_timeout: float | None,
    now: float,
) -> Deadline:
    """The request's deadline: the earliest of the caller's and the route's.

    Malformed caller values raise DeadlineHeaderError; the adapter answers 400
    (or gRPC INVALID_ARGUMENT) rather than guessing a deadline."""
    candidates: list[float] = []
    if grpc_timeout is not None:
        candidates.append(parse_grpc_timeout(grpc_timeout))
    if deadline_ms is not None:
        candidates.append(parse_deadline_ms(deadline_ms))
    if route_timeout is not None:
        candidates.append(route_timeout)
    return Deadline(now + min(candidates) if candidates else None)
