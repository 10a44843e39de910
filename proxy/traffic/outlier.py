"""Outlier detection: eject endpoints that keep failing, re-admit them later.

Consecutive 5xx, consecutive gateway errors (502/503/504 and connect failures)
and optional success-rate ejection, with ejection time = base x number of times
ejected (capped), and at most `max_ejection_percent` of endpoints out at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OutlierPolicy:
    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: float = 1.9
    success_rate_enabled: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("maxEjectionPercent must be 0..100")
        if self.base_ejection_time <= 0 or self.interval <= 0:
            raise ValueError("baseEjectionTime and interval must be positive")


@dataclass(slots=True)
class _State:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejected_until: float | None = None
    times_ejected: int = 0
    window_ok: int = 0
    window_total: int = 0


@dataclass
class OutlierDetector:
    policy: OutlierPolicy
    _states: dict[str, _State] = field(default_factory=dict)
    ejections_total: int = 0

    def _state(self, endpoint: str) -> _State:
        st = self._states.get(endpoint)
        if st is None:
            st = self._states[endpoint] = _State()
        return st

    def is_ejected(self, endpoint: str, now: float) -> bool:
        st = self._states.get(endpoint)
        return st is not None and st.ejected_until is not None and now < st.ejected_until

    def _ejected_count(self, now: float) -> int:
        return sum(
            1
            for st in self._states.values()
            if st.ejected_until is not None and now < st.ejected_until
        )

    def _can_eject(self, now: float, total: int) -> bool:
        # Envoy's rule: at least one host may be ejected even if the percentage rounds to 0.
        limit = (
            max(1, total * self.policy.max_ejection_percent // 100)
            if self.policy.max_ejection_percent
            else 0
        )
        return self._ejected_count(now) < limit

    def _eject(self, st: _State, now: float) -> bool:
        st.times_ejected += 1
        duration = min(
            self.policy.base_ejection_time * st.times_ejected,
            max(self.policy.max_ejection_time, self.policy.base_ejection_time),
        )
        st.ejected_until = now + duration
        st.consecutive_5xx = st.consecutive_gateway = 0
        self.ejections_total += 1
        return True

    def on_success(self, endpoint: str) -> None:
        """An answer that is no error (what `on_result` does for one, in fewer steps:
        this runs for nearly every request)."""
        st = self._states.get(endpoint)
        if st is None:
            st = self._states[endpoint] = _State()
        st.window_total += 1
        st.window_ok += 1
        if st.consecutive_5xx or st.consecutive_gateway:
            st.consecutive_5xx = st.consecutive_gateway = 0

    def on_result(
        self,
        endpoint: str,
        now: float,
        *,
        status: int | None,
        connect_failure: bool = False,
        total_endpoints: int,
    ) -> bool:
        """Record one attempt's outcome; True if it ejected the endpoint."""
        st = self._states.get(endpoint)
        if st is None:
            st = self._states[endpoint] = _State()
        st.window_total += 1
        if not connect_failure and (status is None or status < 500):
            st.window_ok += 1
            if st.consecutive_5xx or st.consecutive_gateway:
                st.consecutive_5xx = st.consecutive_gateway = 0
            return False
        gateway = connect_failure or status in (502, 503, 504)
        st.consecutive_5xx += 1
        st.consecutive_gateway = st.consecutive_gateway + 1 if gateway else 0
        if self.is_ejected(endpoint, now):
            return False
        tripped = (
            self.policy.consecutive_5xx and st.consecutive_5xx >= self.policy.consecutive_5xx
        ) or (
            self.policy.consecutive_gateway_errors
            and st.consecutive_gateway >= self.policy.consecutive_gateway_errors
        )
        if tripped and self._can_eject(now, total_endpoints):
            return self._eject(st, now)
        return False

    def sweep(self, endpoints: Sequence[str], now: float) -> list[str]:
        """Run once per `interval`: success-rate ejection, then reset windows.
        Returns endpoints ejected by success rate."""
        ejected: list[str] = []
        p = self.policy
        if p.success_rate_enabled:
            rates = {
                e: st.window_ok / st.window_total
                for e in endpoints
                if (st := self._states.get(e)) and st.window_total >= p.success_rate_request_volume
            }
            if len(rates) >= p.success_rate_minimum_hosts:
                mean = sum(rates.values()) / len(rates)
                var = sum((r - mean) ** 2 for r in rates.values()) / len(rates)
                threshold = mean - p.success_rate_stdev_factor * var**0.5
                for e, r in sorted(rates.items(), key=lambda kv: kv[1]):
                    if (
                        r < threshold
                        and not self.is_ejected(e, now)
                        and self._can_eject(now, len(endpoints))
                    ):
                        self._eject(self._state(e), now)
                        ejected.append(e)
        for st in self._states.values():
            st.window_ok = st.window_total = 0
        return ejected

    def forget(self, keep: Iterable[str]) -> None:
        keep_set = set(keep)
        for key in [k for k in self._states if k not in keep_set]:
            del self._states[key]

    def healthy(self, endpoints: Sequence[str], now: float) -> tuple[Sequence[str], bool]:
        """Endpoints to balance over, and whether we are in panic mode: when every
        endpoint is ejected, balance over all rather than fail everything."""
        live = [e for e in endpoints if not self.is_ejected(e, now)]
        if live or not endpoints:
            return live, False
        return endpoints, True
