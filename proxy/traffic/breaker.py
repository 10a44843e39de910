"""Circuit breaking: per-service limits on connections, pending requests,
concurrent requests and concurrent retries. Over a limit, the request fails at
once with 503 (response flag UO) instead of queueing behind a sick upstream.

Pending requests, in Envoy's sense: a request that finds every connection slot
(`maxConnections`) taken may wait for one, in a FIFO queue of at most
`maxPendingRequests`; only when that queue is full does it fail at once. A slot
given back goes straight to the oldest waiter (its `wake` callback is called,
the slot is already counted for it), so a later arrival cannot overtake it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Waiter = Callable[[], None]


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
        self._limits = limits
        self.in_use = dict.fromkeys(Resource, 0)
        # Requests waiting for a connection slot, oldest first.
        self.waiting: deque[Waiter] = deque()

    @property
    def limits(self) -> BreakerLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: BreakerLimits) -> None:
        """New limits; a raised connection limit lets waiters through at once."""
        self._limits = limits
        self._grant()

    def try_acquire(self, resource: Resource) -> bool:
        if self.in_use[resource] >= self._limits.limit(resource):
            return False
        self.in_use[resource] += 1
        return True

    def release(self, resource: Resource) -> None:
        if self.in_use[resource] > 0:
            self.in_use[resource] -= 1
        if resource is Resource.CONNECTIONS:
            self._grant()

    def is_open(self, resource: Resource = Resource.REQUESTS) -> bool:
        """ "Open" in Envoy's sense: the limit is reached right now."""
        return self.in_use[resource] >= self._limits.limit(resource)

    # -- pending requests -------------------------------------------------------------

    def enqueue(self, wake: Waiter) -> bool:
        """Wait for a connection slot; False (fail the request) when the pending
        queue is full. `wake` is called once the slot is this waiter's."""
        if not self.try_acquire(Resource.PENDING):
            return False
        self.waiting.append(wake)
        return True

    def cancel(self, wake: Waiter) -> bool:
        """The waiter gives up (deadline, client gone); False if it was not waiting."""
        try:
            self.waiting.remove(wake)
        except ValueError:
            return False
        self.in_use[Resource.PENDING] = max(0, self.in_use[Resource.PENDING] - 1)
        return True

    def wake_all(self) -> None:
        """Let every waiter go, each holding a slot (the breaker is being removed)."""
        while self.waiting:
            wake = self.waiting.popleft()
            self.in_use[Resource.PENDING] = max(0, self.in_use[Resource.PENDING] - 1)
            self.in_use[Resource.CONNECTIONS] += 1
            wake()

    def _grant(self) -> None:
        limit = self._limits.max_connections
        while self.waiting and self.in_use[Resource.CONNECTIONS] < limit:
            wake = self.waiting.popleft()
            self.in_use[Resource.PENDING] = max(0, self.in_use[Resource.PENDING] - 1)
            self.in_use[Resource.CONNECTIONS] += 1
            wake()
