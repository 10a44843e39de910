"""Circuit breaking: per-service limits on connections, pending requests,
concurrent requests and concurrent retries. Over a limit, the request fails at
once with 503 (response flag UO) instead of queueing behind a sick upstream."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Resource(enum.Enum):
    CONNECTIONS = "maxConnections"
    PENDING = "maxPendingRequests"
    REQUESTS = "maxRequests"
    RETRIES = "maxRetries"


@dataclass(frozen=True)
class BreakerLimits:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3

    def limit(self, resource: Resource) -> int:
        return {
            Resource.CONNECTIONS: self.max_connections,
            Resource.PENDING: self.max_pending_requests,
            Resource.REQUESTS: self.max_requests,
            Resource.RETRIES: self.max_retries,
        }[resource]


class CircuitBreaker:
    def __init__(self, limits: BreakerLimits) -> None:
        self.limits = limits
        self.in_use = dict.fromkeys(Resource, 0)

    def try_acquire(self, resource: Resource) -> bool:
        if self.in_use[resource] >= self.limits.limit(resource):
            return False
        self.in_use[resource] += 1
        return True

    def release(self, resource: Resource) -> None:
        if self.in_use[resource] > 0:
            self.in_use[resource] -= 1

    def is_open(self, resource: Resource = Resource.REQUESTS) -> bool:
        """ "Open" in Envoy's sense: the limit is reached right now."""
        return self.in_use[resource] >= self.limits.limit(resource)
