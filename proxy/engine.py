"""The per-request traffic engine shared by HTTP/1, HTTP/2 and opaque TCP.

Given a request's destination, head and the config in force, `Engine.request`
answers with one of:

- `None`: nothing to decide (no config, an unknown destination under
  ALLOW_ANY): the adapter sends the request where the client was going;
- a `Reply` to answer locally (REGISTRY_ONLY refusal, a RequestRedirect, no
  healthy endpoint, circuit breaker open, injected abort, rate limited, deadline
  already passed, a malformed deadline header);
- a `Call`: the traffic decisions for this request, attempt by attempt. The
  adapter asks `call.next_address(now)` for where the next attempt goes, bounds
  the attempt with `call.try_timeout(now)`, adds `call.deadline_headers(now)`,
  and reports each outcome with `call.result(...)`, which feeds the balancer
  (latency), the outlier detector and the breakers, and says whether and after
  how long to try again (to a different endpoint when one exists). `call.finish`
  releases what the request held.

The engine is sans-IO too: clock values come in as arguments, randomness from
its own `random.Random`; the adapters sleep, connect and write.

Per-config work (compiling route tables, resolving policies, endpoint lists)
happens once per service per config version, lazily on the first request that
needs it; per-service state (balancers, outlier detectors, retry budgets,
breakers; `proxy.traffic.state`) survives config updates.

Where a setting comes from, most specific first: the matched route's `retry` /
`timeouts`, then the called service's `TrafficPolicy`, then the workload's
annotations (`SYNCHRO_TIMEOUT`, `SYNCHRO_RETRIES`, `SYNCHRO_RETRY_ON`,
`SYNCHRO_LOAD_BALANCER`). Balancing, outlier detection and circuit breaking
belong to the backend service the request is sent to; the retry budget to the
service the client called. Without any retry setting, a request is retried once,
on another endpoint, when its first try never reached an upstream (connect
failure, refused stream): that is always safe.

Deadlines: an incoming `grpc-timeout` and Synchro's `synchro-deadline-ms`
(remaining milliseconds) bound the request together with the route timeout;
the remaining budget is written back into the same header(s) on every attempt,
so the next hop knows what is left. An expired deadline answers 504 (gRPC
DEADLINE_EXCEEDED) with flag DX and is never retried.

Fault injection (TrafficPolicy.faultInjection) is applied once per request: on
the inbound side of the destination's proxy when its endpoints run a sidecar
(that is where the control plane sends it), else on the caller's outbound side.
Local rate limiting is inbound only.
"""

from __future__ import annotations

import bisect
import logging
import operator
import random
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, overload

from proxy import config as pc
from proxy.conn import Address, Direction, ProxyContext
from proxy.registry import Passthrough, Refuse, Registry, ToEndpoint, ToService
from proxy.traffic import deadline as dl
from proxy.traffic import faults as fl
from proxy.traffic.breaker import Resource
from proxy.traffic.flags import GRPC_STATUS, STATUS, Flag, render
from proxy.traffic.ratelimit import RateLimiter, RateLimitPolicy, retry_after_header
from proxy.traffic.retry import (
    Failure,
    RetryConfigError,
    RetryPolicy,
    backoff,
    may_replay,
    retriable_outcome,
)
from proxy.traffic.routing import (
    CompiledRoute,
    RequestView,
    RouteTable,
    matched_prefix,
    redirect_location,
    rewrite_path,
)
from proxy.traffic.state import ServiceState, TrafficState

log = logging.getLogger(__name__)

Header = tuple[bytes, bytes]

ENV_TIMEOUT: Final = "SYNCHRO_TIMEOUT"
ENV_RETRIES: Final = "SYNCHRO_RETRIES"
ENV_RETRY_ON: Final = "SYNCHRO_RETRY_ON"
ENV_LOAD_BALANCER: Final = "SYNCHRO_LOAD_BALANCER"

# Retrying what never reached an upstream is always safe: the default.
SAFE_RETRY_ON: Final = frozenset({"connect-failure", "refused-stream"})
# What `retryOn` means when a retry count is given without conditions (Istio's default).
DEFAULT_RETRY_ON: Final = ("connect-failure", "refused-stream", "unavailable", "503")
MAX_MIRRORS_IN_FLIGHT: Final = 64
MATCH_MEMO: Final = 4096  # remembered route matches per service port

_GRPC_TIMEOUT: Final = b"grpc-timeout"
_DEADLINE_MS: Final = b"synchro-deadline-ms"
_HOST: Final = b"host"
_AUTHORITY: Final = b":authority"
_PATH: Final = b":path"
_COOKIE: Final = b"cookie"
_DEADLINE_NAMES: Final = frozenset({_GRPC_TIMEOUT, _DEADLINE_MS})
_NO_DEADLINE: Final = dl.Deadline(None)  # immutable: every call without one shares it
_NAME: Final = operator.itemgetter(0)  # a header's name
_LOWER: Final = bytes.lower


class EngineError(ValueError):
    """A traffic setting (environment, annotation default) the proxy cannot use."""


# --- workload defaults (Pod annotations -> environment) ----------------------------------


@dataclass(frozen=True, slots=True)
class OutboundDefaults:
    """The workload's outbound defaults from its Pod annotations (webhook/inject.py)."""

    timeout: float | None = None
    retries: int | None = None
    retry_on: tuple[str, ...] = ()
    load_balancer: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OutboundDefaults:
        def get(name: str) -> str:
            return env.get(name, "").strip()

        timeout = retries = None
        if text := get(ENV_TIMEOUT):
            try:
                timeout = float(text)
            except ValueError:
                raise EngineError(f"{ENV_TIMEOUT}: {text!r} is not a number of seconds") from None
            if timeout <= 0:
                raise EngineError(f"{ENV_TIMEOUT}: must be > 0, got {text}")
        if text := get(ENV_RETRIES):
            if not text.isdigit() or int(text) > 10:
                raise EngineError(f"{ENV_RETRIES}: {text!r} is not an integer 0-10")
            retries = int(text)
        retry_on: tuple[str, ...] = ()
        if text := get(ENV_RETRY_ON):
            items = tuple(i.strip().lower() for i in text.split(",") if i.strip())
            try:
                RetryPolicy.parse_retry_on(items)
            except RetryConfigError as exc:
                raise EngineError(f"{ENV_RETRY_ON}: {exc}") from None
            retry_on = items
        lb = get(ENV_LOAD_BALANCER) or None
        if lb is not None and lb not in pc.LB_TYPES:
            raise EngineError(f"{ENV_LOAD_BALANCER}: {lb!r} is not one of {', '.join(pc.LB_TYPES)}")
        return cls(timeout, retries, retry_on, lb)

    def dump(self) -> dict[str, object]:
        return {
            "timeout": self.timeout,
            "retries": self.retries,
            "retry_on": list(self.retry_on),
            "load_balancer": self.load_balancer,
        }


# --- decisions -------------------------------------------------------------------------


@dataclass(slots=True)
class Reply:
    """Answer the client locally."""

    status: int
    message: str
    flag: Flag | None = None
    headers: list[Header] = field(default_factory=list)
    grpc_status: int | None = None

    @property
    def flags(self) -> str:
        return self.flag.value if self.flag is not None else "-"


def flag_reply(flag: Flag, message: str) -> Reply:
    return Reply(STATUS.get(flag, 502), message, flag, grpc_status=GRPC_STATUS.get(flag))


class Pending:
    """`Call.next_address`: wait for a connection slot (the `wait` callback), then ask again."""

    __slots__ = ()


PENDING: Final = Pending()


# --- per-config compiled plans ---------------------------------------------------------


class _Backend:
    """One service port's endpoints, for one config."""

    __slots__ = (
        "addresses",
        "connect_timeout",
        "endpoints",
        "hash",
        "idle_timeout",
        "key",
        "meshed",
        "port",
        "state",
    )

    def __init__(
        self,
        key: str,
        port: int,
        eps: tuple[pc.Endpoint, ...],
        state: ServiceState,
        timeouts: pc.Timeouts | None = None,
        hash: pc.ConsistentHash | None = None,
    ):
        self.key = key
        # The balancing service's own consistentHash: a route to this backend
        # hashes by what the backend's policy names, not the parent's (Istio).
        self.hash = hash
        self.port = port
        self.endpoints = [f"{e.ip}:{e.port}" for e in eps]
        self.addresses = {f"{e.ip}:{e.port}": Address(e.ip, e.port) for e in eps}
        self.meshed = bool(eps) and all(e.meshed for e in eps)
        self.state = state
        # TrafficPolicy.timeouts of the service (None or 0: the proxy's defaults).
        self.connect_timeout = (timeouts.connect or None) if timeouts is not None else None
        self.idle_timeout = (timeouts.idle or None) if timeouts is not None else None


def _bytes_modifier(mod: pc.HeaderModifier | None) -> _HeaderOps | None:
    if mod is None:
        return None
    return _HeaderOps(
        drop=frozenset(n.lower().encode() for n in (*mod.remove, *mod.set)),
        add=tuple(
            (n.lower().encode(), v.encode()) for n, v in (*mod.set.items(), *mod.add.items())
        ),
    )


@dataclass(frozen=True, slots=True)
class _HeaderOps:
    drop: frozenset[bytes]
    add: tuple[Header, ...]

    def apply(self, headers: list[Header]) -> list[Header]:
        drop = self.drop
        out = [h for h in headers if h[0].lower() not in drop] if drop else list(headers)
        out.extend(self.add)
        return out


@dataclass(frozen=True, slots=True)
class _Choice:
    """A route's backend with the filters that apply when it is chosen."""

    backend: _Backend | None
    missing: str  # why `backend` is None
    request_ops: _HeaderOps | None
    response_ops: _HeaderOps | None
    rewrite: pc.URLRewrite | None
    redirect: pc.RequestRedirect | None
    mirrors: tuple[tuple[pc.RequestMirror, _Backend | None], ...]
    # A backend and nothing to do but send to it (no redirect, rewrite, mirror or
    # consistent hash): the request path skips those checks.
    simple: bool = False


@dataclass(frozen=True, slots=True)
class _RoutePlan:
    name: str
    route: CompiledRoute | None
    choices: tuple[_Choice, ...]
    cumulative: tuple[int, ...]
    retry: RetryPolicy
    retry_backoff: float
    request_timeout: float | None
    prefix: str | None
    single: _Choice | None = None  # the only choice, when there is no weighted pick


@dataclass(slots=True)
class _ServicePlan:
    service: pc.Service
    port: int
    table: RouteTable | None
    needs_headers: bool
    routes: dict[int, _RoutePlan]
    default: _RoutePlan
    caller: ServiceState  # the called service's state: its retry budget
    hash: pc.ConsistentHash | None
    faults: fl.FaultPolicy | None
    needs_host: bool  # a redirect needs the request's host
    # Route matches by (method, target) when no route looks at headers; bounded.
    matched: dict[tuple[bytes, bytes], _RoutePlan]
    key: str  # service.key, which is built anew on every access


def fault_policy(fi: pc.FaultInjection | None) -> fl.FaultPolicy | None:
    if fi is None or (fi.delay is None and fi.abort is None):
        return None
    return fl.FaultPolicy(
        delay=fi.delay.fixed_delay if fi.delay else None,
        delay_percent=fi.delay.percentage if fi.delay else 0.0,
        abort_http_status=fi.abort.http_status if fi.abort else None,
        abort_grpc_status=fi.abort.grpc_status if fi.abort else None,
        abort_percent=fi.abort.percentage if fi.abort else 0.0,
    )


class _InboundPlan:
    __slots__ = ("faults", "limiter", "name")

    def __init__(self, name: str, limiter: RateLimiter | None, faults: fl.FaultPolicy | None):
        self.name = name
        self.limiter = limiter
        self.faults = faults


# --- the per-request object ----------------------------------------------------------------


class Call:
    """The traffic decisions of one request, attempt by attempt (sans-IO)."""

    __slots__ = (
        "attempts",
        "authority",
        "backend",
        "backoff_base",
        "body_size",
        "caller",
        "current",
        "deadline",
        "delay",
        "engine",
        "fixed",
        "flag_set",
        "granted",
        "grpc",
        "had_deadline_header",
        "hash_key",
        "held_retry",
        "method",
        "mirrors",
        "per_try",
        "request_ops",
        "response_ops",
        "retry",
        "route",
        "service",
        "started",
        "target",
        "touches_headers",
        "tried",
        "upstream",
        "waiter",
    )

    def __init__(
        self,
        engine: Engine,
        service: str = "",
        route: str = "",
        backend: _Backend | None = None,
        caller: ServiceState | None = None,
        retry: RetryPolicy | None = None,
        backoff_base: float = 0.025,
        request_ops: _HeaderOps | None = None,
        response_ops: _HeaderOps | None = None,
        method: bytes = b"GET",
    ) -> None:
        # Every request builds one: each field is stored once (a default that the
        # caller then overwrites costs a second store), and the hot path passes
        # them by position (keywords to a class call cost a dict).
        self.engine = engine
        self.service = service
        self.route = route
        self.backend = backend
        self.fixed: Address | None = None
        self.caller = caller
        self.retry = retry
        self.backoff_base = backoff_base
        self.per_try = retry.per_try_timeout if retry is not None else None
        self.deadline = _NO_DEADLINE
        self.had_deadline_header = False
        self.grpc = False
        self.method = method
        self.hash_key: bytes | None = None
        self.request_ops = request_ops
        self.response_ops = response_ops
        # Whether `rewrite_headers` has anything to do: a request header modifier,
        # a rewritten host or a deadline (kept up to date by the engine, which sets those).
        self.touches_headers = request_ops is not None
        self.target: bytes | None = None  # rewritten path (and query)
        self.authority: bytes | None = None  # rewritten host
        self.mirrors: Sequence[Address] = ()
        self.delay = 0.0
        self.flag_set: set[Flag] = set()
        self.attempts = 0
        self.tried: list[str] = []
        self.current: str | None = None
        self.started = 0.0
        self.held_retry = False
        self.body_size: int | None = 0
        self.upstream = ""
        # Pending request (maxPendingRequests): the queued wake-up, and whether
        # this call holds a connection slot between attempts (handed over while it
        # waited, or kept from an answered attempt until the response is over).
        self.waiter: Callable[[], None] | None = None
        self.granted = False

    # -- what the adapter applies to the request --------------------------------------

    def rewrite_headers(self, headers: list[Header]) -> list[Header]:
        """Headers to send: route modifiers and rewrites applied, incoming deadline
        headers removed (each attempt adds `deadline_headers`). HTTP/2 pseudo-headers
        stay first."""
        out = headers
        if self.deadline.at is not None:
            out = [h for h in out if h[0].lower() not in _DEADLINE_NAMES]
        if self.request_ops is not None:
            out = self.request_ops.apply(out)
        if self.authority is not None or self.target is not None:
            out = [self._rewrite_one(h) for h in out]
        return out

    def _rewrite_one(self, h: Header) -> Header:
        name = h[0]
        if self.authority is not None and (name == _AUTHORITY or name.lower() == _HOST):
            return (name, self.authority)
        if self.target is not None and name == _PATH:
            return (name, self.target)
        return h

    def deadline_headers(self, now: float) -> list[Header]:
        if self.deadline.at is None:
            return []
        out = self.deadline.outgoing_headers(
            now, grpc=self.grpc, had_header=self.had_deadline_header
        )
        return [(k.encode(), v.encode()) for k, v in out.items()]

    def response_headers(self, headers: list[Header]) -> list[Header]:
        ops = self.response_ops
        return headers if ops is None else ops.apply(headers)

    @property
    def flags(self) -> str:
        fs = self.flag_set
        return render(fs) if fs else "-"

    # -- attempts ------------------------------------------------------------------------

    def expired(self, now: float) -> bool:
        return self.deadline.expired(now)

    def deadline_reply(self) -> Reply:
        self.flag_set.add(Flag.DEADLINE_EXCEEDED)
        return flag_reply(Flag.DEADLINE_EXCEEDED, "request deadline exceeded")

    def try_timeout(self, now: float) -> float | None:
        """How long the next attempt may take (per-try timeout within the deadline)."""
        return self.deadline.bound(self.per_try, now)

    @overload
    def next_address(self, now: float) -> Address | Reply: ...
    @overload
    def next_address(self, now: float, wait: Callable[[], None]) -> Address | Reply | Pending: ...

    def next_address(
        self, now: float, wait: Callable[[], None] | None = None
    ) -> Address | Reply | Pending:
        """Where the next attempt goes, or why there is nowhere to go.

        With `wait`, a request that finds every connection slot of the backend
        taken (maxConnections) waits for one as a pending request: the answer is
        `PENDING`, and `wait` is called once a slot is this call's; then ask
        again. Beyond maxPendingRequests it fails at once (503, UO). Without
        `wait` (opaque TCP) a full connection limit fails at once."""
        at = self.deadline.at
        if at is not None and now >= at:
            return self.deadline_reply()
        if self.fixed is not None:
            self.attempts += 1
            self.started = now
            self.upstream = str(self.fixed)
            return self.fixed
        b = self.backend
        assert b is not None
        st = b.state
        # (`healthy` has nothing to do while no detector has ejected anything.)
        eps = b.endpoints if now >= st.plain_after else st.healthy(b.endpoints, now)[0]
        balancer = st.balancer
        key = balancer.pick(eps, now, self.engine.rng, hash_key=self.hash_key, avoid=self.tried)
        if key is None:
            self.flag_set.add(Flag.NO_HEALTHY_UPSTREAM)
            return flag_reply(Flag.NO_HEALTHY_UPSTREAM, f"no healthy endpoint of {b.key}:{b.port}")
        br = st.breaker
        if self.granted:
            self.granted = False  # the slot handed over while this call waited
        elif br is not None and not br.try_acquire(Resource.CONNECTIONS):
            if wait is not None and self.waiter is None:
                waiter = self._waker(wait)
                if br.enqueue(waiter):
                    self.waiter = waiter
                    return PENDING
            self.flag_set.add(Flag.UPSTREAM_OVERFLOW)
            return flag_reply(Flag.UPSTREAM_OVERFLOW, f"circuit breaker open for {b.key}")
        balancer.on_start(key, now)
        self.attempts += 1
        self.tried.append(key)
        self.current = key
        self.started = now
        self.upstream = key
        return b.addresses[key]

    def _waker(self, wait: Callable[[], None]) -> Callable[[], None]:
        def wake() -> None:
            self.waiter = None
            self.granted = True
            wait()

        return wake

    def cancel_wait(self) -> None:
        """Stop waiting for a connection slot (deadline passed, client gone)."""
        waiter, self.waiter = self.waiter, None
        b = self.backend
        br = b.state.breaker if b is not None else None
        if waiter is not None and br is not None:
            br.cancel(waiter)
        if self.granted:
            self.granted = False
            if br is not None:
                br.release(Resource.CONNECTIONS)

    def result(
        self,
        now: float,
        *,
        status: int | None = None,
        grpc_status: int | None = None,
        failure: Failure | None = None,
    ) -> float | None:
        """Record one attempt's outcome; the backoff before the next attempt, or
        None when this outcome is final (answer it, or fail with `failure`)."""
        # The attempt in flight ends: balancer, breaker and outlier detector learn
        # its outcome. (Inline: this runs once per attempt.)
        key = self.current
        if key is not None:
            self.current = None
            b = self.backend
            assert b is not None
            st = b.state
            # An answer that is no error, without gRPC status: the common case.
            plain = failure is None and grpc_status is None and (status is None or status < 500)
            ok = plain or (
                failure is None and (status is None or status < 500) and grpc_status in (0, 1)
            )
            latency = now - self.started
            st.balancer.on_end(key, now, latency if latency > 0.0 else 0.0, ok)
            if st.breaker is not None:
                if failure is None:
                    # Answered: the connection stays busy until the response is over
                    # (`finish`), or the next attempt reuses the slot.
                    self.granted = True
                else:
                    st.breaker.release(Resource.CONNECTIONS)
                if self.held_retry:
                    st.breaker.release(Resource.RETRIES)
                    self.held_retry = False
            od = st.outlier
            if od is None:
                pass
            elif plain:
                od.on_success(key)
            else:
                gateway_status = status
                if grpc_status == 14 and (status is None or status < 500):
                    gateway_status = 503  # UNAVAILABLE: the gRPC spelling of 503
                elif failure is None:
                    pass
                elif failure is Failure.TIMEOUT:
                    gateway_status = 504
                elif failure is Failure.RESET:
                    gateway_status = 502
                ejected = od.on_result(
                    key,
                    now,
                    status=gateway_status,
                    connect_failure=failure is Failure.CONNECT_FAILURE,
                    total_endpoints=len(b.endpoints),
                )
                if ejected:
                    st.ejected(now)
                    log.info("outlier detection ejected %s of %s", key, b.key)
                    if self.engine.on_ejection is not None:
                        self.engine.on_ejection(b.key)
        if failure is None:
            if (status is None or status < 400) and not grpc_status:
                return None  # the common case: done
        elif failure is Failure.CONNECT_FAILURE:
            self.flag_set.add(Flag.UPSTREAM_CONNECT_FAILURE)
        elif failure is Failure.TIMEOUT:
            self.flag_set.add(Flag.UPSTREAM_TIMEOUT)
        elif failure is not None:
            self.flag_set.add(Flag.UPSTREAM_RESET)
        policy = self.retry
        if policy is None or self.fixed is not None:
            return None
        if not retriable_outcome(policy, status=status, grpc_status=grpc_status, failure=failure):
            return None
        if self.deadline.expired(now):
            self.flag_set.add(Flag.DEADLINE_EXCEEDED)
            return None
        if self.attempts >= policy.attempts:
            self.flag_set.add(Flag.RETRIES_EXHAUSTED)
            return None
        # gRPC calls are all POSTs; a status listed in retryOn (UNAVAILABLE...) is the
        # service owner saying the call is safe to repeat, as in gRPC's own retry policy.
        method = "PUT" if self.grpc and grpc_status else self.method.decode("latin-1")
        if not may_replay(method, self.body_size, failure):
            return None
        caller = self.caller
        if caller is not None and not caller.budget.try_withdraw(now):
            self.flag_set.add(Flag.RETRIES_EXHAUSTED)
            return None
        b = self.backend
        assert b is not None
        br = b.state.breaker
        if br is not None:
            if not br.try_acquire(Resource.RETRIES):
                self.flag_set.add(Flag.UPSTREAM_OVERFLOW)
                return None
            self.held_retry = True
        pause = backoff(
            self.attempts, self.engine.rng, base=self.backoff_base, cap=self.backoff_base * 10
        )
        left = self.deadline.remaining(now)
        if left is not None and left <= pause:
            self.flag_set.add(Flag.DEADLINE_EXCEEDED)
            return None
        if self.engine.on_retry is not None:
            reason = failure.value if failure is not None else str(status or grpc_status)
            self.engine.on_retry(self.service, reason)
        return pause

    def finish(self, now: float) -> None:
        """The request is over (answered, failed or abandoned): release what it held."""
        if self.current is not None:
            # Abandoned mid-attempt (the client went away): not the endpoint's fault.
            self.result(now)  # no outcome: ends the attempt, decides nothing
        if self.waiter is not None or self.granted:
            self.cancel_wait()
        b = self.backend
        if b is None:
            return
        br = b.state.breaker
        if br is not None:
            if self.held_retry:
                br.release(Resource.RETRIES)
                self.held_retry = False
            if self.fixed is None:
                br.release(Resource.REQUESTS)
        self.backend = None


# --- the engine ------------------------------------------------------------------------------


class Engine:
    """Config in force + per-service state; `request` per request, `tcp_call` per
    opaque TCP connection."""

    def __init__(
        self,
        defaults: OutboundDefaults | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.defaults = defaults or OutboundDefaults()
        self.rng = rng or random.Random()
        self.state = TrafficState()
        self.registry: Registry | None = None
        self.version = ""
        self._resolved: dict[tuple[str, int], object] = {}
        self._plans: dict[tuple[str, int], _ServicePlan] = {}
        # Outbound (ip, port) -> the plan of the service port it names: one lookup per request.
        self._dst_plans: dict[tuple[str, int], _ServicePlan] = {}
        self._inbound: dict[int, _InboundPlan | None] = {}
        self._limiters: dict[str, tuple[pc.RateLimit, RateLimiter]] = {}
        self.mirrors_in_flight = 0
        # Telemetry hooks (the process entry connects them to the metrics).
        self.on_retry: Callable[[str, str], None] | None = None
        self.on_ejection: Callable[[str], None] | None = None

    # -- config -----------------------------------------------------------------------

    def apply(self, registry: Registry) -> None:
        """Swap in a new config (its registry); compiled plans are rebuilt lazily."""
        self.registry = registry
        self.version = registry.version
        self._resolved = {}
        self._plans = {}
        self._dst_plans = {}
        self._inbound = {}
        self.state.retain({s.key for s in registry.config.services})

    @property
    def config(self) -> pc.ProxyConfig | None:
        return self.registry.config if self.registry is not None else None

    def _resolve(self, dst: Address) -> object:
        key = (dst.host, dst.port)
        hit = self._resolved.get(key)
        if hit is None:
            assert self.registry is not None
            hit = self.registry.resolve(dst.host, dst.port)
            if len(self._resolved) > 65536:
                self._resolved.clear()  # bounded whatever the destinations
            self._resolved[key] = hit
        return hit

    def _service_state(self, svc: pc.Service) -> ServiceState:
        policy = svc.policy
        lb = policy.load_balancer if policy else None
        kind = lb.type if lb is not None else (self.defaults.load_balancer or "ewma")
        st = self.state.service(svc.key, kind)
        endpoints = [f"{e.ip}:{e.port}" for p in svc.ports for e in p.endpoints if e.ready]
        st.reconfigure(
            lb_kind=kind,
            outlier=policy.outlier_detection if policy else None,
            breaker=policy.circuit_breaker if policy else None,
            budget=policy.retry.budget if policy and policy.retry else None,
            endpoints=endpoints,
        )
        return st

    def _backend(self, key: str, port: int) -> _Backend | None:
        assert self.registry is not None
        svc = self.registry.service(key)
        if svc is None or svc.port(port) is None:
            return None
        policy = svc.policy
        lb = policy.load_balancer if policy is not None else None
        return _Backend(
            key,
            port,
            self.registry.ready_endpoints(key, port),
            self._service_state(svc),
            policy.timeouts if policy is not None else None,
            lb.consistent_hash if lb is not None else None,
        )

    def _retry_policy(
        self, svc: pc.Service, route: pc.Route | None
    ) -> tuple[RetryPolicy, float, float | None, float | None]:
        """(policy, backoff base, request timeout, per-try timeout) for a route."""
        d = self.defaults
        tp = svc.policy
        rr = route.retry if route is not None else None
        pr = tp.retry if tp is not None else None
        retries = None
        if rr is not None and rr.attempts is not None:
            retries = rr.attempts
        elif pr is not None:
            retries = pr.attempts
        elif d.retries is not None:
            retries = d.retries
        items: tuple[str, ...] = ()
        if pr is not None and pr.retry_on:
            items = pr.retry_on
        elif d.retry_on:
            items = d.retry_on
        codes: set[int] = set(rr.codes) if rr is not None else set()
        if retries is None:
            attempts, conditions = 2, set(SAFE_RETRY_ON)
        else:
            attempts = min(retries, 10) + 1
            if not items and not codes:
                items = DEFAULT_RETRY_ON
            conds, parsed = RetryPolicy.parse_retry_on(items)
            conditions = set(conds) | set(SAFE_RETRY_ON)
            codes |= parsed
        per_try = pr.per_try_timeout if pr is not None else None
        timeouts = route.timeouts if route is not None else None
        if timeouts is not None and timeouts.backend_request is not None:
            per_try = timeouts.backend_request
        request: float | None = None
        if timeouts is not None and timeouts.request is not None:
            request = timeouts.request or None  # Gateway API: 0 disables the timeout
        elif tp is not None and tp.timeouts is not None and tp.timeouts.request is not None:
            request = tp.timeouts.request or None
        else:
            request = d.timeout
        policy = RetryPolicy(
            attempts=attempts,
            per_try_timeout=per_try or None,
            retry_on=frozenset(conditions),
            status_codes=frozenset(codes),
        )
        base = rr.backoff if rr is not None and rr.backoff else 0.025
        return policy, base, request, per_try or None

    def _choice(
        self, route: pc.Route | None, wb: pc.WeightedBackend | None, own: _Backend | None
    ) -> _Choice:
        filters = (route.filters if route is not None else ()) + (wb.filters if wb else ())
        req = resp = None
        rewrite = redirect = None
        mirrors: list[tuple[pc.RequestMirror, _Backend | None]] = []
        for f in filters:
            if f.request_header_modifier is not None:
                req = _bytes_modifier(f.request_header_modifier)
            elif f.response_header_modifier is not None:
                resp = _bytes_modifier(f.response_header_modifier)
            elif f.url_rewrite is not None:
                rewrite = f.url_rewrite
            elif f.request_redirect is not None:
                redirect = f.request_redirect
            elif f.request_mirror is not None:
                m = f.request_mirror
                mirrors.append((m, self._backend(m.service, m.port)))
        if wb is None:
            backend, missing = own, ""
        else:
            backend = self._backend(wb.service, wb.port)
            missing = "" if backend is not None else f"backend {wb.service}:{wb.port} not found"
        simple = (
            backend is not None
            and backend.hash is None
            and rewrite is None
            and redirect is None
            and not mirrors
        )
        return _Choice(backend, missing, req, resp, rewrite, redirect, tuple(mirrors), simple)

    def _route_plan(
        self, svc: pc.Service, port: int, compiled: CompiledRoute | None, own: _Backend | None
    ) -> _RoutePlan:
        route = compiled.route if compiled is not None else None
        policy, base, request, _ = self._retry_policy(svc, route)
        if route is None:
            choices: tuple[_Choice, ...] = (self._choice(None, None, own),)
            cumulative: tuple[int, ...] = (1,)
        else:
            choices = tuple(self._choice(route, wb, own) for wb in route.backends)
            cumulative = compiled.cumulative if compiled is not None else ()
            if not route.backends:
                # A rule with only a redirect filter has no backends: keep its filters.
                choices = (self._choice(route, None, None),)
                cumulative = (1,) if any(f.request_redirect for f in route.filters) else ()
        return _RoutePlan(
            name=route.name if route is not None else "",
            route=compiled,
            choices=choices,
            cumulative=cumulative,
            retry=policy,
            retry_backoff=base,
            request_timeout=request,
            prefix=matched_prefix(route) if route is not None else None,
            single=choices[0] if len(choices) == 1 and cumulative and cumulative[-1] else None,
        )

    def _plan(self, svc: pc.Service, port: int) -> _ServicePlan:
        plan = self._plans.get((svc.key, port))
        if plan is not None:
            return plan
        own = self._backend(svc.key, port)
        routes = tuple(r for r in svc.routes if r.port is None or r.port == port)
        table = RouteTable(routes) if routes else None
        tp = svc.policy
        lb = tp.load_balancer if tp is not None else None
        caller = own.state if own is not None else self._service_state(svc)
        faults = fault_policy(tp.fault_injection if tp is not None else None)
        if faults is not None and own is not None and own.meshed:
            faults = None  # the destination's own proxy injects them (inbound)
        plan = _ServicePlan(
            service=svc,
            port=port,
            table=table,
            needs_headers=any(r.match.headers for r in routes),
            needs_host=any(
                f.request_redirect is not None
                for r in routes
                for f in (*r.filters, *(f for b in r.backends for f in b.filters))
            ),
            matched={},
            routes={},
            key=svc.key,
            default=self._route_plan(svc, port, None, own),
            caller=caller,
            hash=lb.consistent_hash if lb is not None else None,
            faults=faults,
        )
        if table is not None:
            for compiled in table.routes:
                plan.routes[id(compiled)] = self._route_plan(svc, port, compiled, own)
        self._plans[(svc.key, port)] = plan
        return plan

    # -- per request --------------------------------------------------------------------

    def request(
        self,
        direction: Direction,
        dst: Address,
        method: bytes,
        target: bytes,
        headers: list[Header],
        *,
        now: float,
        grpc: bool = False,
        peer: Address | None = None,
        source: str = "",
    ) -> Call | Reply | None:
        """The traffic decision for one HTTP request (see the module docstring)."""
        if self.registry is None:
            return None
        if direction is Direction.INBOUND:
            return self._inbound_request(dst, now, grpc, peer, source)
        plan = self._dst_plans.get((dst.host, dst.port))
        if plan is not None:
            return self._service_call(plan, method, target, headers, now, grpc, peer)
        res = self._resolve(dst)
        if type(res) is ToService:
            plan = self._plan(res.service, res.port.port)
            if len(self._dst_plans) > 65536:
                self._dst_plans.clear()  # bounded whatever the destinations
            self._dst_plans[(dst.host, dst.port)] = plan
            return self._service_call(plan, method, target, headers, now, grpc, peer)
        if type(res) is Passthrough:
            return None
        if type(res) is Refuse:
            log.warning("refusing request to %s: %s", dst, res.reason)
            return Reply(502, res.reason, Flag.NO_ROUTE, grpc_status=14)
        assert isinstance(res, ToEndpoint)
        call = Call(self, res.service.key)
        call.fixed = Address(res.endpoint.ip, res.endpoint.port)
        return self._with_deadline(call, headers, None, now, grpc)

    def _with_deadline(
        self,
        call: Call,
        headers: list[Header],
        timeout: float | None,
        now: float,
        grpc: bool,
    ) -> Call | Reply:
        grpc_timeout = deadline_ms = None
        for name, value in headers:
            n = len(name)
            if n == 12 or n == 19:
                low = name.lower()
                if low == _GRPC_TIMEOUT:
                    grpc_timeout = value.decode("latin-1")
                elif low == _DEADLINE_MS:
                    deadline_ms = value.decode("latin-1")
        call.grpc = grpc
        if grpc_timeout is None and deadline_ms is None and timeout is None:
            return call
        try:
            call.deadline = dl.deadline_from_headers(grpc_timeout, deadline_ms, timeout, now)
        except dl.DeadlineHeaderError as exc:
            return Reply(400, str(exc), grpc_status=3)
        call.had_deadline_header = deadline_ms is not None
        call.touches_headers = True
        if call.deadline.expired(now):
            return call.deadline_reply()
        return call

    def _service_call(
        self,
        plan: _ServicePlan,
        method: bytes,
        target: bytes,
        headers: list[Header],
        now: float,
        grpc: bool,
        peer: Address | None,
    ) -> Call | Reply:
        if plan.table is None:
            rp = plan.default
        else:
            memo = None if plan.needs_headers else plan.matched.get((method, target))
            if memo is not None:
                rp = memo
            else:
                routed = self._route(plan, method, target, headers)
                if type(routed) is Reply:
                    return routed
                assert isinstance(routed, _RoutePlan)
                rp = routed
        choice = rp.single
        delay = 0.0
        if choice is None or not choice.simple or plan.faults is not None:
            picked = self._pick(plan, rp, target, headers, grpc)
            if type(picked) is Reply:
                return picked
            assert isinstance(picked, tuple)
            choice, delay = picked
        b = choice.backend
        assert b is not None
        br = b.state.breaker
        if br is not None and not br.try_acquire(Resource.REQUESTS):
            return flag_reply(Flag.UPSTREAM_OVERFLOW, f"circuit breaker open for {b.key}")
        retry = rp.retry
        call = Call(
            self,
            plan.key,
            rp.name,
            b,
            plan.caller,
            retry,
            rp.retry_backoff,
            choice.request_ops,
            choice.response_ops,
            method,
        )
        if delay:
            call.delay = delay
            call.flag_set.add(Flag.FAULT_INJECTED)
        if retry.attempts > 1:
            plan.caller.budget.on_request(now)
        if not choice.simple:
            if choice.rewrite is not None:
                self._rewrite(call, choice.rewrite, rp, target)
            if b.hash is not None:
                call.hash_key = _hash_key(b.hash, headers, peer)
            if choice.mirrors:
                self._choose_mirrors(call, choice)
        call.grpc = grpc
        timeout = rp.request_timeout
        # (The names are lowered and looked up in C: this runs for every request.)
        if timeout is None and _DEADLINE_NAMES.isdisjoint(map(_LOWER, map(_NAME, headers))):
            return call  # no deadline: the common case, without _with_deadline's call
        out = self._with_deadline(call, headers, timeout, now, grpc)
        if type(out) is Reply:
            call.finish(now)
        return out

    def _route(
        self, plan: _ServicePlan, method: bytes, target: bytes, headers: list[Header]
    ) -> _RoutePlan | Reply:
        """Match the route table: the remembered matches missed, or a route looks
        at headers."""
        assert plan.table is not None
        hdrs: dict[str, str] = {}
        if plan.needs_headers:
            for name, value in headers:
                hdrs.setdefault(name.lower().decode("latin-1"), value.decode("latin-1"))
        view = RequestView.from_target(method.decode("latin-1"), target.decode("latin-1"), hdrs)
        matched = plan.table.match(view, plan.port)
        if matched is None:
            return Reply(404, f"no route of {plan.key} matches", Flag.NO_ROUTE, grpc_status=12)
        rp = plan.routes[id(matched)]
        if not plan.needs_headers:
            if len(plan.matched) >= MATCH_MEMO:
                plan.matched.clear()
            plan.matched[(method, target)] = rp
        return rp

    def _pick(
        self, plan: _ServicePlan, rp: _RoutePlan, target: bytes, headers: list[Header], grpc: bool
    ) -> tuple[_Choice, float] | Reply:
        """The route's backend and injected delay when it is not a lone simple
        backend: weighted choice, redirect, missing backend, fault injection."""
        if not rp.cumulative or rp.cumulative[-1] == 0:
            return Reply(500, f"route {rp.name} has no backend", Flag.NO_ROUTE, grpc_status=13)
        i = 0
        if len(rp.choices) > 1:
            i = bisect.bisect_right(rp.cumulative, self.rng.random() * rp.cumulative[-1])
        choice = rp.choices[i]
        if choice.redirect is not None:
            host = b""
            for name, value in headers:
                if name.lower() in (_HOST, _AUTHORITY):
                    host = value
            return self._redirect(choice.redirect, rp, target, host)
        if choice.backend is None:
            return Reply(500, choice.missing or "no backend", Flag.NO_ROUTE, grpc_status=13)
        delay = 0.0
        if plan.faults is not None:
            fault = fl.decide(plan.faults, self.rng, grpc=grpc)
            if fault.abort_http_status is not None or fault.abort_grpc_status is not None:
                return _fault_reply(fault, grpc)
            delay = fault.delay
        return choice, delay

    def _redirect(
        self, redirect: pc.RequestRedirect, rp: _RoutePlan, target: bytes, host: bytes
    ) -> Reply:
        path, _, query = target.decode("latin-1").partition("?")
        location = redirect_location(
            redirect,
            scheme="http",
            host=host.decode("latin-1"),
            path=path,
            query=query,
            matched_prefix=rp.prefix,
        )
        return Reply(
            redirect.status_code,
            f"redirect to {location}",
            headers=[(b"location", location.encode())],
        )

    def _rewrite(self, call: Call, rewrite: pc.URLRewrite, rp: _RoutePlan, target: bytes) -> None:
        if rewrite.hostname:
            call.authority = rewrite.hostname.encode()
            call.touches_headers = True
        if rewrite.path is not None:
            path, sep, query = target.decode("latin-1").partition("?")
            new = rewrite_path(path, rewrite.path, rp.prefix)
            call.target = (new + sep + query).encode("latin-1")

    def _choose_mirrors(self, call: Call, choice: _Choice) -> None:
        mirrors: list[Address] = []
        for mirror, backend in choice.mirrors:
            if backend is None or not backend.endpoints:
                continue
            if mirror.percent < 100.0 and self.rng.random() * 100.0 >= mirror.percent:
                continue
            key = backend.endpoints[self.rng.randrange(len(backend.endpoints))]
            mirrors.append(backend.addresses[key])
        call.mirrors = mirrors

    def mirror_slot(self) -> bool:
        """Fire-and-forget copies are bounded: beyond the limit they are skipped."""
        if self.mirrors_in_flight >= MAX_MIRRORS_IN_FLIGHT:
            return False
        self.mirrors_in_flight += 1
        return True

    def mirror_done(self) -> None:
        self.mirrors_in_flight = max(0, self.mirrors_in_flight - 1)

    # -- inbound ------------------------------------------------------------------------

    def _inbound_plan(self, port: int) -> _InboundPlan | None:
        if port in self._inbound:
            return self._inbound[port]
        assert self.registry is not None
        plan = None
        fallback = None
        for key in self.registry.config.inbound.services:
            svc = self.registry.service(key)
            if svc is None or svc.policy is None:
                continue
            tp = svc.policy
            if tp.rate_limit is None and tp.fault_injection is None:
                continue
            candidate = _InboundPlan(
                key, self._limiter(key, tp.rate_limit), fault_policy(tp.fault_injection)
            )
            if any(port in (p.port, p.target_port) or _ep_port(p, port) for p in svc.ports):
                plan = candidate
                break
            fallback = fallback or candidate
        plan = plan or fallback
        self._inbound[port] = plan
        return plan

    def _limiter(self, key: str, rl: pc.RateLimit | None) -> RateLimiter | None:
        if rl is None:
            self._limiters.pop(key, None)
            return None
        held = self._limiters.get(key)
        if held is not None and held[0] == rl:
            return held[1]  # same policy: the bucket keeps its tokens
        limiter = RateLimiter(
            RateLimitPolicy(
                requests_per_unit=max(1, round(rl.requests_per_second)),
                unit_seconds=max(1, round(rl.requests_per_second)) / rl.requests_per_second,
                burst=rl.burst or None,
                per_source=rl.per_source,
            )
        )
        self._limiters[key] = (rl, limiter)
        return limiter

    def _inbound_request(
        self, dst: Address, now: float, grpc: bool, peer: Address | None, source: str
    ) -> Call | Reply | None:
        plan = self._inbound_plan(dst.port)
        if plan is None:
            return None
        if plan.limiter is not None:
            wait = plan.limiter.check(source or (peer.host if peer else ""), now)
            if wait > 0:
                reply = flag_reply(Flag.RATE_LIMITED, f"rate limit of {plan.name}")
                reply.headers.append((b"retry-after", retry_after_header(wait).encode()))
                return reply
        if plan.faults is not None:
            fault = fl.decide(plan.faults, self.rng, grpc=grpc)
            if fault.abort_http_status is not None or fault.abort_grpc_status is not None:
                return _fault_reply(fault, grpc)
            if fault.delay:
                call = Call(self, service=plan.name)
                call.fixed = dst
                call.delay = fault.delay
                call.flag_set.add(Flag.FAULT_INJECTED)
                return call
        return None

    # -- opaque TCP -----------------------------------------------------------------------

    def tcp_call(self, dst: Address, now: float) -> Call | Reply | None:
        """Per TCP connection: None (connect to `dst`), a Reply (refuse: reset), or a
        Call whose `next_address` picks an endpoint (retried on connect failure)."""
        if self.registry is None:
            return None
        res = self._resolve(dst)
        if type(res) is Passthrough:
            return None
        if type(res) is Refuse:
            log.warning("refusing TCP connection to %s: %s", dst, res.reason)
            return Reply(502, res.reason, Flag.NO_ROUTE)
        if type(res) is ToEndpoint:
            call = Call(self, service=res.service.key)
            call.fixed = Address(res.endpoint.ip, res.endpoint.port)
            return call
        assert isinstance(res, ToService)
        plan = self._plan(res.service, res.port.port)
        b = plan.default.choices[0].backend
        if b is None:
            return flag_reply(Flag.NO_HEALTHY_UPSTREAM, f"{res.service.key} has no port")
        call = Call(self, service=res.service.key)
        call.backend = b
        call.caller = None
        # Only connect failures are retried for opaque TCP (nothing was sent yet).
        call.retry = RetryPolicy(attempts=3, retry_on=frozenset({"connect-failure"}))
        call.body_size = 0
        br = b.state.breaker
        if br is not None and not br.try_acquire(Resource.REQUESTS):
            return flag_reply(Flag.UPSTREAM_OVERFLOW, f"circuit breaker open for {b.key}")
        return call

    def downstream_idle_timeout(self, direction: Direction, dst: Address) -> float | None:
        """TrafficPolicy.timeouts.idle of the service a downstream connection is for
        (outbound: the service the client dialled; inbound: the one served on that
        port), or None for the proxy's default."""
        if self.registry is None:
            return None
        svc: pc.Service | None = None
        if direction is Direction.INBOUND:
            for key in self.registry.config.inbound.services:
                cand = self.registry.service(key)
                if cand is not None and any(
                    dst.port in (p.port, p.target_port) or _ep_port(p, dst.port) for p in cand.ports
                ):
                    svc = cand
                    break
        else:
            res = self._resolve(dst)
            if isinstance(res, (ToService, ToEndpoint)):
                svc = res.service
        tp = svc.policy if svc is not None else None
        if tp is None or tp.timeouts is None:
            return None
        return tp.timeouts.idle or None

    def dump(self) -> dict[str, object]:
        """For /config_dump: per-service balancer and ejection state."""
        out: dict[str, object] = {}
        for key, st in self.state.services.items():
            entry: dict[str, object] = {"load_balancer": st.lb_kind}
            if st.outlier is not None:
                entry["ejections_total"] = st.outlier.ejections_total
            if st.breaker is not None:
                entry["breaker_in_use"] = {r.value: n for r, n in st.breaker.in_use.items()}
            out[key] = entry
        return {"version": self.version, "defaults": self.defaults.dump(), "services": out}


def _ep_port(port: pc.ServicePort, wanted: int) -> bool:
    return any(e.port == wanted for e in port.endpoints)


def _fault_reply(fault: fl.FaultDecision, grpc: bool) -> Reply:
    if fault.abort_grpc_status is not None and (grpc or fault.abort_http_status is None):
        return Reply(
            200 if grpc else 503,
            "fault injected",
            Flag.FAULT_INJECTED,
            grpc_status=fault.abort_grpc_status,
        )
    status = fault.abort_http_status or 503
    return Reply(status, "fault injected", Flag.FAULT_INJECTED, grpc_status=14 if grpc else None)


def _hash_key(ch: pc.ConsistentHash, headers: list[Header], peer: Address | None) -> bytes | None:
    if ch.header:
        want = ch.header.lower().encode()
        for name, value in headers:
            if name.lower() == want:
                return value
    if ch.cookie:
        prefix = ch.cookie.encode() + b"="
        for name, value in headers:
            if name.lower() == _COOKIE:
                for part in value.split(b";"):
                    part = part.strip()
                    if part.startswith(prefix):
                        return part[len(prefix) :]
    if ch.source_ip and peer is not None:
        return peer.host.encode()
    return None


# --- where adapters find the engine ---------------------------------------------------------

_engines: weakref.WeakKeyDictionary[ProxyContext, Engine] = weakref.WeakKeyDictionary()


def attach(ctx: ProxyContext, engine: Engine) -> None:
    """Install the engine the handlers of `ctx` consult (the process entry does this)."""
    _engines[ctx] = engine


def engine_for(ctx: ProxyContext) -> Engine | None:
    return _engines.get(ctx)
