"""Load balancers: pick one endpoint of a service for one request.

A balancer keeps per-endpoint state (in-flight requests, latency estimate) that
the adapter feeds through `on_start`/`on_end`; `pick` is a decision over that
state, the candidate endpoints, `now` and `rng`. Endpoints are identified by a
string key ("10.0.0.5:8080").
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol


class Balancer(Protocol):
    def pick(
        self,
        endpoints: Sequence[str],
        now: float,
        rng: random.Random,
        *,
        hash_key: bytes | None = None,
        avoid: Collection[str] = (),
    ) -> str | None: ...

    def on_start(self, endpoint: str, now: float) -> None: ...

    def on_end(self, endpoint: str, now: float, latency: float, ok: bool) -> None: ...


def _candidates(endpoints: Sequence[str], avoid: Collection[str]) -> Sequence[str]:
    """Endpoints minus those to avoid (a retry prefers a new endpoint), unless
    that leaves nothing: then any endpoint is better than none."""
    if not avoid:
        return endpoints
    rest = [e for e in endpoints if e not in avoid]
    return rest or endpoints


class _InFlight:
    def __init__(self) -> None:
        self.outstanding: dict[str, int] = {}

    def on_start(self, endpoint: str, now: float) -> None:
        self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + 1

    def on_end(self, endpoint: str, now: float, latency: float, ok: bool) -> None:
        n = self.outstanding.get(endpoint, 0) - 1
        if n > 0:
            self.outstanding[endpoint] = n
        else:
            self.outstanding.pop(endpoint, None)


class _Chooser(_InFlight):
    """Balancers that choose among the candidates left after `avoid`."""

    def pick(
        self,
        endpoints: Sequence[str],
        now: float,
        rng: random.Random,
        *,
        hash_key: bytes | None = None,
        avoid: Collection[str] = (),
    ) -> str | None:
        cands = _candidates(endpoints, avoid) if avoid else endpoints
        if len(cands) <= 1:
            return cands[0] if cands else None
        return self._choose(cands, now, rng)

    def _choose(self, cands: Sequence[str], now: float, rng: random.Random) -> str:
        raise NotImplementedError

    def _two_choices(
        self, cands: Sequence[str], rng: random.Random, score: Callable[[str], float]
    ) -> str:
        """Power of two choices: the better-scoring of two distinct random picks."""
        ea, eb = _two_distinct(cands, rng)
        return ea if score(ea) <= score(eb) else eb


def _two_distinct(cands: Sequence[str], rng: random.Random) -> tuple[str, str]:
    """Two distinct candidates, uniformly over ordered pairs (so that a tie in the
    comparison goes either way). Two `random()` draws: `rng.sample` costs several
    Python calls, on every request."""
    n = len(cands)
    a = int(rng.random() * n)
    b = int(rng.random() * (n - 1))
    if b >= a:
        b += 1
    return cands[a], cands[b]


class RoundRobin(_Chooser):
    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def _choose(self, cands: Sequence[str], now: float, rng: random.Random) -> str:
        choice = cands[self._next % len(cands)]
        self._next += 1
        return choice


class RandomChoice(_Chooser):
    def _choose(self, cands: Sequence[str], now: float, rng: random.Random) -> str:
        return rng.choice(cands)


class LeastRequest(_Chooser):
    """Power of two choices on in-flight request counts (Envoy's default shape)."""

    def _choose(self, cands: Sequence[str], now: float, rng: random.Random) -> str:
        return self._two_choices(cands, rng, lambda e: self.outstanding.get(e, 0))


@dataclass(slots=True)
class _Ewma:
    cost: float  # seconds
    stamp: float


class PeakEwma(_Chooser):
    """Peak-EWMA with power of two choices, after Finagle and Linkerd.

    Each endpoint's latency estimate jumps up to any slower observation at once
    ("peak") and decays towards faster ones with time constant `decay`; the
    load score is estimate x (in-flight + 1), so a slow or busy endpoint loses
    the comparison. An endpoint never measured scores 0 while nothing is in
    flight to it, so a new replica is probed at once instead of losing every
    comparison to endpoints faster than `default_rtt`; once a request is in
    flight it counts `default_rtt` until its first answer is measured.
    """

    def __init__(self, *, decay: float = 10.0, default_rtt: float = 0.030) -> None:
        super().__init__()
        if decay <= 0 or default_rtt <= 0:
            raise ValueError("decay and default_rtt must be positive")
        self.decay = decay
        self.default_rtt = default_rtt
        self._ewma: dict[str, _Ewma] = {}

    def estimate(self, endpoint: str, now: float) -> float:
        state = self._ewma.get(endpoint)
        return self.default_rtt if state is None else state.cost

    def score(self, endpoint: str, now: float) -> float:
        in_flight = self.outstanding.get(endpoint, 0)
        state = self._ewma.get(endpoint)
        if state is None:
            return 0.0 if in_flight == 0 else self.default_rtt * (in_flight + 1)
        return state.cost * (in_flight + 1)

    def on_end(self, endpoint: str, now: float, latency: float, ok: bool) -> None:
        # _InFlight.on_end, inlined: this runs once per attempt.
        outstanding = self.outstanding
        n = outstanding.get(endpoint, 0) - 1
        if n > 0:
            outstanding[endpoint] = n
        else:
            outstanding.pop(endpoint, None)
        state = self._ewma.get(endpoint)
        if state is None:
            self._ewma[endpoint] = _Ewma(cost=latency if latency > 0.0 else 0.0, stamp=now)
            return
        if latency > state.cost:
            state.cost = latency
        else:
            elapsed = now - state.stamp
            if elapsed > 0.0:
                w = math.exp(-elapsed / self.decay)
                state.cost = state.cost * w + latency * (1.0 - w)
            # else: w = 1 (no time passed), the estimate stays as it is
        state.stamp = now

    def forget(self, keep: Collection[str]) -> None:
        """Drop state of endpoints that left the service."""
        for key in [k for k in self._ewma if k not in keep]:
            del self._ewma[key]

    def _choose(self, cands: Sequence[str], now: float, rng: random.Random) -> str:
        ea, eb = _two_distinct(cands, rng)
        return ea if self.score(ea, now) <= self.score(eb, now) else eb


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class _Hashing(_InFlight):
    """Consistent hashing on `hash_key`; without a key, a random candidate. The
    lookup structure is rebuilt only when the endpoint set changes."""

    def __init__(self) -> None:
        super().__init__()
        self._members: tuple[str, ...] = ()

    def pick(
        self,
        endpoints: Sequence[str],
        now: float,
        rng: random.Random,
        *,
        hash_key: bytes | None = None,
        avoid: Collection[str] = (),
    ) -> str | None:
        if not endpoints:
            return None
        if hash_key is None:
            return rng.choice(_candidates(endpoints, avoid))
        if tuple(endpoints) != self._members:
            self._rebuild(endpoints)
            self._members = tuple(endpoints)
        return self._lookup(endpoints, _hash64(hash_key), avoid)

    def _rebuild(self, endpoints: Sequence[str]) -> None:
        raise NotImplementedError

    def _lookup(self, endpoints: Sequence[str], h: int, avoid: Collection[str]) -> str:
        raise NotImplementedError


class RingHash(_Hashing):
    """Consistent hashing on a ring of virtual nodes (Ketama style).

    The same `hash_key` (a header or cookie value) lands on the same endpoint
    while the endpoint set is stable; adding or removing one endpoint moves only
    about 1/n of the keys. The ring is rebuilt only when the endpoint set changes.
    """

    def __init__(self, *, vnodes: int = 100) -> None:
        super().__init__()
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owners: list[str] = []

    def _rebuild(self, endpoints: Sequence[str]) -> None:
        ring = sorted(
            (_hash64(f"{ep}#{i}".encode()), ep) for ep in endpoints for i in range(self.vnodes)
        )
        self._points = [p for p, _ in ring]
        self._owners = [o for _, o in ring]

    def _lookup(self, endpoints: Sequence[str], h: int, avoid: Collection[str]) -> str:
        i = bisect.bisect(self._points, h) % len(self._points)
        # Walk the ring past endpoints to avoid, so a retry still lands consistently.
        for step in range(len(self._points)):
            owner = self._owners[(i + step) % len(self._points)]
            if owner not in avoid:
                return owner
        return self._owners[i]


class Maglev(_Hashing):
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of
    prime size filled by each endpoint's permutation; even spread, minimal
    disruption, O(1) lookups."""

    TABLE_SIZE = 65537

    def __init__(self, *, table_size: int = TABLE_SIZE) -> None:
        super().__init__()
        self.table_size = table_size
        self._table: list[int] = []

    def _rebuild(self, endpoints: Sequence[str]) -> None:
        m = self.table_size
        n = len(endpoints)
        offsets = [_hash64(b"o" + e.encode()) % m for e in endpoints]
        skips = [_hash64(b"s" + e.encode()) % (m - 1) + 1 for e in endpoints]
        nexts = [0] * n
        table = [-1] * m
        filled = 0
        while True:
            for i in range(n):
                c = (offsets[i] + nexts[i] * skips[i]) % m
                while table[c] >= 0:
                    nexts[i] += 1
                    c = (offsets[i] + nexts[i] * skips[i]) % m
                table[c] = i
                nexts[i] += 1
                filled += 1
                if filled == m:
                    self._table = table
                    return

    def _lookup(self, endpoints: Sequence[str], h: int, avoid: Collection[str]) -> str:
        choice = endpoints[self._table[h % self.table_size]]
        if choice in avoid:
            rest = _candidates(endpoints, avoid)
            return rest[h % len(rest)]
        return choice


BALANCERS = {
    "ewma": PeakEwma,
    "round_robin": RoundRobin,
    "least_request": LeastRequest,
    "random": RandomChoice,
    "ring_hash": RingHash,
    "maglev": Maglev,
}


def make_balancer(kind: str) -> Balancer:
    try:
        factory = BALANCERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown load balancer {kind!r}; expected one of {', '.join(BALANCERS)}"
        ) from None
    return factory()  # type: ignore[no-any-return]
