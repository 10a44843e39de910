"""Per-service traffic state that outlives config updates.

A new config (a new endpoint, a changed policy) must not reset what the proxy
learned: latency estimates, ejections, in-flight counts, the retry budget's
window. `TrafficState` keeps one `ServiceState` per service key and
`reconfigure`s it in place when the service's policy changes; endpoint state is
keyed by "ip:port" and dropped only when the endpoint leaves the service.

Pure: the clock is an argument, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from proxy import config as pc
from proxy.traffic.balancer import Balancer, PeakEwma, make_balancer
from proxy.traffic.breaker import BreakerLimits, CircuitBreaker
from proxy.traffic.outlier import OutlierDetector, OutlierPolicy
from proxy.traffic.retry import RetryBudget

# A limit nobody configured: large enough never to be reached.
UNLIMITED = 1 << 30


def outlier_policy(od: pc.OutlierDetection) -> OutlierPolicy:
    """The core's policy from the config's (None counts as "off" for a counter)."""
    return OutlierPolicy(
        consecutive_5xx=od.consecutive_5xx_errors or 0,
        consecutive_gateway_errors=od.consecutive_gateway_errors or 0,
        interval=od.interval,
        base_ejection_time=od.base_ejection_time or 30.0,
        max_ejection_time=(
            od.max_ejection_time
            if od.max_ejection_time is not None
            else max(300.0, od.base_ejection_time)
        ),
        max_ejection_percent=int(od.max_ejection_percent),
        success_rate_enabled=od.success_rate is not None,
        success_rate_minimum_hosts=od.success_rate.minimum_hosts if od.success_rate else 5,
        success_rate_request_volume=od.success_rate.request_volume if od.success_rate else 100,
        success_rate_stdev_factor=od.success_rate.stdev_factor if od.success_rate else 1.9,
    )


def breaker_limits(cb: pc.CircuitBreaker) -> BreakerLimits:
    def lim(v: int | None) -> int:
        return UNLIMITED if v is None else v

    return BreakerLimits(
        max_connections=lim(cb.max_connections),
        max_pending_requests=lim(cb.max_pending_requests),
        max_requests=lim(cb.max_requests),
        max_retries=lim(cb.max_retries),
    )


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0

    @classmethod
    def of(cls, budget: pc.RetryBudget | None) -> BudgetSettings:
        if budget is None:
            return cls()
        return cls(budget.percent / 100.0, budget.min_retries_per_second, budget.window)


class ServiceState:
    """What one service's endpoints taught us: balancer, ejections, limits, budget."""

    __slots__ = (
        "balancer",
        "breaker",
        "budget",
        "budget_settings",
        "clear_after",
        "endpoints",
        "lb_kind",
        "next_sweep",
        "outlier",
        "plain_after",
    )

    def __init__(self, lb_kind: str) -> None:
        self.lb_kind = lb_kind
        self.balancer: Balancer = make_balancer(lb_kind)
        self.outlier: OutlierDetector | None = None
        self.breaker: CircuitBreaker | None = None
        self.budget_settings = BudgetSettings()
        self.budget = RetryBudget()
        self.next_sweep = 0.0
        # No endpoint can be ejected from this time on (until the next ejection):
        # until then `healthy` must ask the detector, after it, it need not.
        self.clear_after = 0.0
        # From this time on `healthy` returns the endpoints unchanged and has
        # nothing to do (no detector, or nothing ejected and no sweep to run):
        # the engine skips the call then.
        self.plain_after = -math.inf
        self.endpoints: frozenset[str] = frozenset()

    def reconfigure(
        self,
        *,
        lb_kind: str,
        outlier: pc.OutlierDetection | None,
        breaker: pc.CircuitBreaker | None,
        budget: pc.RetryBudget | None,
        endpoints: Collection[str],
    ) -> None:
        if lb_kind != self.lb_kind:
            self.lb_kind = lb_kind
            self.balancer = make_balancer(lb_kind)
        if outlier is None:
            self.outlier = None
        else:
            policy = outlier_policy(outlier)
            if self.outlier is None:
                self.outlier = OutlierDetector(policy)
            elif self.outlier.policy != policy:
                self.outlier.policy = policy
        self._update_plain_after()
        if breaker is None:
            if self.breaker is not None:
                self.breaker.wake_all()  # nobody may wait for a limit that is gone
            self.breaker = None
        else:
            limits = breaker_limits(breaker)
            if self.breaker is None:
                self.breaker = CircuitBreaker(limits)
            else:
                # In-flight counts stay: requests started under the old limits still end.
                self.breaker.limits = limits
        settings = BudgetSettings.of(budget)
        if settings != self.budget_settings:
            self.budget_settings = settings
            self.budget.configure(
                ratio=settings.ratio,
                min_per_second=settings.min_per_second,
                window=settings.window,
            )
        keep = frozenset(endpoints)
        if keep != self.endpoints:
            self.endpoints = keep
            if isinstance(self.balancer, PeakEwma):
                self.balancer.forget(keep)
            if self.outlier is not None:
                self.outlier.forget(keep)

    def ejected(self, now: float) -> None:
        """The detector just ejected an endpoint (at `now`)."""
        p = self.outlier.policy if self.outlier is not None else None
        if p is not None:
            longest = max(p.max_ejection_time, p.base_ejection_time)
            self.clear_after = max(self.clear_after, now + longest)
        self._update_plain_after()

    def _update_plain_after(self) -> None:
        od = self.outlier
        if od is None:
            self.plain_after = -math.inf
        elif od.policy.success_rate_enabled:
            self.plain_after = math.inf  # sweeps are due every interval
        else:
            self.plain_after = self.clear_after

    def healthy(self, endpoints: list[str], now: float) -> tuple[list[str], bool]:
        """Endpoints not ejected (all of them in panic mode) and whether we panic."""
        od = self.outlier
        if od is None:
            return endpoints, False
        if od.policy.success_rate_enabled and now >= self.next_sweep:
            self.next_sweep = now + od.policy.interval
            if od.sweep(endpoints, now):
                self.ejected(now)
        if now >= self.clear_after:
            return endpoints, False  # nothing is ejected: the common case, cheaply
        live, panic = od.healthy(endpoints, now)
        return list(live), panic


class TrafficState:
    """Every service's `ServiceState`, by "<namespace>/<name>"."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceState] = {}

    def service(self, key: str, lb_kind: str) -> ServiceState:
        st = self.services.get(key)
        if st is None:
            st = self.services[key] = ServiceState(lb_kind)
        return st

    def retain(self, keys: Collection[str]) -> None:
        """Forget services that left the config."""
        for key in [k for k in self.services if k not in keys]:
            del self.services[key]
