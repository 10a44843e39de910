"""Pending requests (maxPendingRequests) and per-service timeouts in the engine:
fake clock, no sockets."""

from __future__ import annotations

import random

from proxy import config as pc
from proxy.conn import Address, Direction
from proxy.engine import PENDING, Call, Engine, Reply
from proxy.registry import Registry
from proxy.traffic.breaker import BreakerLimits, CircuitBreaker, Resource
from proxy.traffic.flags import Flag
from proxy.traffic.retry import Failure

VIP = "10.96.0.10"


def engine(policy: pc.TrafficPolicy, *, inbound: tuple[str, ...] = ()) -> Engine:
    service = pc.Service(
        name="web",
        namespace="a",
        cluster_ips=(VIP,),
        ports=(
            pc.ServicePort(
                port=80,
                protocol="http",
                target_port=8080,
                endpoints=(pc.Endpoint(ip="10.0.0.1", port=8080),),
            ),
        ),
        policy=policy,
    )
    e = Engine(rng=random.Random(3))
    e.apply(
        Registry(
            pc.ProxyConfig(version="v1", services=(service,), inbound=pc.Inbound(services=inbound))
        )
    )
    return e


def call(e: Engine) -> Call:
    c = e.request(Direction.OUTBOUND, Address(VIP, 80), b"GET", b"/", [], now=0.0)
    assert isinstance(c, Call)
    return c


def test_breaker_queue_is_fifo_and_bounded() -> None:
    b = CircuitBreaker(BreakerLimits(max_connections=1, max_pending_requests=2))
    woken: list[str] = []
    assert b.try_acquire(Resource.CONNECTIONS)
    assert b.enqueue(lambda: woken.append("first"))
    assert b.enqueue(lambda: woken.append("second"))
    assert not b.enqueue(lambda: woken.append("third"))  # the queue is full
    assert b.in_use[Resource.PENDING] == 2
    b.release(Resource.CONNECTIONS)
    # The slot went to the oldest waiter and stays counted for it.
    assert woken == ["first"]
    assert b.in_use[Resource.CONNECTIONS] == 1 and b.in_use[Resource.PENDING] == 1
    b.limits = BreakerLimits(max_connections=2, max_pending_requests=2)
    assert woken == ["first", "second"] and b.in_use[Resource.PENDING] == 0


def test_breaker_cancel_gives_the_pending_place_back() -> None:
    b = CircuitBreaker(BreakerLimits(max_connections=1, max_pending_requests=1))
    assert b.try_acquire(Resource.CONNECTIONS)

    def waiter() -> None:
        raise AssertionError("a cancelled waiter is never woken")

    assert b.enqueue(waiter)
    assert b.cancel(waiter) and not b.cancel(waiter)
    assert b.in_use[Resource.PENDING] == 0
    b.release(Resource.CONNECTIONS)
    assert b.in_use[Resource.CONNECTIONS] == 0


def test_engine_pending_then_overflow_then_granted() -> None:
    policy = pc.TrafficPolicy(
        circuit_breaker=pc.CircuitBreaker(max_connections=1, max_pending_requests=1)
    )
    e = engine(policy)
    first, second, third = call(e), call(e), call(e)
    assert isinstance(first.next_address(0.0), Address)
    woken: list[int] = []
    assert second.next_address(0.0, lambda: woken.append(2)) is PENDING
    over = third.next_address(0.0, lambda: woken.append(3))
    assert isinstance(over, Reply) and (over.status, over.flag) == (503, Flag.UPSTREAM_OVERFLOW)
    assert "UO" in third.flags
    # Without a way to wait (opaque TCP) a full connection limit fails at once.
    tcp_like = call(e)
    assert isinstance(tcp_like.next_address(0.0), Reply)
    tcp_like.finish(0.0)
    first.result(0.1, status=200)
    assert woken == []  # answered, but its connection is busy until the body is over
    first.finish(0.1)
    assert woken == [2]
    assert isinstance(second.next_address(0.1), Address)
    breaker = e.state.services["a/web"].breaker
    assert breaker is not None and breaker.in_use[Resource.CONNECTIONS] == 1
    second.result(0.2, status=200)
    second.finish(0.2)
    third.finish(0.2)
    assert breaker.in_use == dict.fromkeys(Resource, 0)


def test_failed_attempt_frees_its_slot_and_a_retry_reuses_a_kept_one() -> None:
    policy = pc.TrafficPolicy(
        circuit_breaker=pc.CircuitBreaker(max_connections=1, max_pending_requests=1),
        retry=pc.RetryPolicy(attempts=2, retry_on=("5xx", "connect-failure")),
    )
    e = engine(policy)
    c = call(e)
    breaker = e.state.services["a/web"].breaker
    assert breaker is not None
    assert isinstance(c.next_address(0.0), Address)
    pause = c.result(0.1, status=503)  # answered (kept the slot), retried
    assert pause is not None
    assert isinstance(c.next_address(0.2, lambda: None), Address)  # no queueing behind itself
    assert breaker.in_use[Resource.CONNECTIONS] == 1
    c.result(0.3, failure=Failure.CONNECT_FAILURE)
    assert breaker.in_use[Resource.CONNECTIONS] == 0  # a failed connect holds nothing
    c.finish(0.3)
    assert breaker.in_use == dict.fromkeys(Resource, 0)


def test_engine_waiter_that_gives_up_holds_nothing() -> None:
    policy = pc.TrafficPolicy(
        circuit_breaker=pc.CircuitBreaker(max_connections=1, max_pending_requests=4)
    )
    e = engine(policy)
    first, waiting, granted = call(e), call(e), call(e)
    assert isinstance(first.next_address(0.0), Address)
    assert waiting.next_address(0.0, lambda: None) is PENDING
    waiting.finish(0.5)  # gave up (deadline, client gone) while queued
    assert granted.next_address(0.0, lambda: None) is PENDING
    first.finish(1.0)
    # `granted` got the slot but went away before using it: the slot comes back.
    granted.finish(1.0)
    breaker = e.state.services["a/web"].breaker
    assert breaker is not None and breaker.in_use == dict.fromkeys(Resource, 0)


def test_service_timeouts_reach_backends_and_downstream_idle() -> None:
    policy = pc.TrafficPolicy(timeouts=pc.Timeouts(connect=0.25, idle=3.0))
    e = engine(policy, inbound=("a/web",))
    c = call(e)
    assert c.backend is not None
    assert (c.backend.connect_timeout, c.backend.idle_timeout) == (0.25, 3.0)
    assert e.downstream_idle_timeout(Direction.OUTBOUND, Address(VIP, 80)) == 3.0
    assert e.downstream_idle_timeout(Direction.INBOUND, Address("10.0.0.1", 8080)) == 3.0
    assert e.downstream_idle_timeout(Direction.OUTBOUND, Address("10.1.1.1", 80)) is None
    plain = engine(pc.TrafficPolicy())
    assert plain.downstream_idle_timeout(Direction.OUTBOUND, Address(VIP, 80)) is None
    b = call(plain).backend
    assert b is not None and b.connect_timeout is None and b.idle_timeout is None
