"""The per-request engine with a fake clock and seeded randomness: config in,
decisions out, no sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy import config as pc
from proxy.conn import Address, Direction
from proxy.engine import Call, Engine, EngineError, OutboundDefaults, Reply
from proxy.registry import Registry
from proxy.traffic.flags import Flag
from proxy.traffic.retry import Failure

VIP = "10.96.0.10"
OUT = Direction.OUTBOUND


def svc(
    key: str,
    ips: list[str],
    *,
    vip: str = VIP,
    port: int = 80,
    routes: tuple[pc.Route, ...] = (),
    policy: pc.TrafficPolicy | None = None,
) -> pc.Service:
    ns, name = key.split("/")
    return pc.Service(
        name=name,
        namespace=ns,
        cluster_ips=(vip,),
        ports=(
            pc.ServicePort(
                port=port,
                protocol="http",
                endpoints=tuple(pc.Endpoint(ip=ip, port=8080) for ip in ips),
            ),
        ),
        routes=routes,
        policy=policy,
    )


def engine(*services: pc.Service, outbound: str = "ALLOW_ANY", **kw: object) -> Engine:
    e = Engine(rng=random.Random(7), **kw)  # type: ignore[arg-type]
    e.apply(Registry(config(*services, outbound=outbound)))
    return e


def config(
    *services: pc.Service, outbound: str = "ALLOW_ANY", version: str = "v1"
) -> pc.ProxyConfig:
    return pc.ProxyConfig(
        version=version, mesh=pc.MeshSettings(outbound_policy=outbound), services=services
    )


def call(
    e: Engine, headers: list[tuple[bytes, bytes]] | None = None, now: float = 0.0, **kw: object
) -> Call | Reply | None:
    return e.request(OUT, Address(VIP, 80), b"GET", b"/x", headers or [], now=now, **kw)  # type: ignore[arg-type]


def test_no_config_and_unknown_destinations() -> None:
    assert Engine().request(OUT, Address(VIP, 80), b"GET", b"/", [], now=0) is None
    e = engine(svc("a/web", ["10.0.0.1"]))
    assert e.request(OUT, Address("10.1.1.1", 80), b"GET", b"/", [], now=0) is None
    strict = engine(svc("a/web", ["10.0.0.1"]), outbound="REGISTRY_ONLY")
    reply = strict.request(OUT, Address("10.1.1.1", 80), b"GET", b"/", [], now=0)
    assert isinstance(reply, Reply) and reply.status == 502
    assert "REGISTRY_ONLY" in reply.message


def test_headless_pod_ip_goes_to_that_pod() -> None:
    e = engine(svc("a/db", ["10.0.0.5"]))
    c = e.request(OUT, Address("10.0.0.5", 8080), b"GET", b"/", [], now=0)
    assert isinstance(c, Call)
    assert c.next_address(0) == Address("10.0.0.5", 8080)


def test_weighted_split_90_10() -> None:
    route = pc.Route(
        kind="http",
        name="a/split",
        rule=0,
        backends=(pc.WeightedBackend("a/v1", 80, 90), pc.WeightedBackend("a/v2", 80, 10)),
    )
    e = engine(
        svc("a/web", ["10.0.0.1"], routes=(route,)),
        svc("a/v1", ["10.0.1.1"], vip="10.96.0.11"),
        svc("a/v2", ["10.0.2.1"], vip="10.96.0.12"),
    )
    picks: Counter[str] = Counter()
    for _ in range(10_000):
        c = call(e)
        assert isinstance(c, Call)
        target = c.next_address(0)
        assert isinstance(target, Address)
        picks[target.host] += 1
        c.result(0.001, status=200)
        c.finish(0.001)
    assert abs(picks["10.0.2.1"] / 10_000 - 0.10) < 0.015


def test_retry_goes_elsewhere_until_attempts_are_spent() -> None:
    policy = pc.TrafficPolicy(retry=pc.RetryPolicy(attempts=2, retry_on=("5xx",)))
    e = engine(svc("a/web", ["10.0.0.1", "10.0.0.2", "10.0.0.3"], policy=policy))
    c = call(e)
    assert isinstance(c, Call)
    seen = []
    now = 0.0
    while True:
        target = c.next_address(now)
        assert isinstance(target, Address)
        seen.append(target.host)
        now += 0.01
        pause = c.result(now, status=503)
        if pause is None:
            break
        assert 0 <= pause <= 0.025 * 2 ** (len(seen) - 1)
        now += pause
    assert len(seen) == 3 and len(set(seen)) == 3
    assert "URX" in c.flags


def test_default_retries_only_what_never_reached_an_upstream() -> None:
    e = engine(svc("a/web", ["10.0.0.1", "10.0.0.2"]))
    c = call(e)
    assert isinstance(c, Call)
    c.next_address(0)
    assert c.result(0.01, status=503) is None  # no retry policy: a 503 is final
    c = call(e)
    assert isinstance(c, Call)
    first = c.next_address(0)
    assert c.result(0.01, failure=Failure.CONNECT_FAILURE) is not None
    assert c.next_address(0.02) != first


def test_post_is_not_replayed_after_it_reached_the_upstream() -> None:
    policy = pc.TrafficPolicy(retry=pc.RetryPolicy(attempts=3, retry_on=("5xx", "reset")))
    e = engine(svc("a/web", ["10.0.0.1", "10.0.0.2"], policy=policy))
    c = e.request(OUT, Address(VIP, 80), b"POST", b"/", [], now=0)
    assert isinstance(c, Call)
    c.body_size = 10
    c.next_address(0)
    assert c.result(0.01, failure=Failure.RESET) is None
    c.next_address(0.02)
    assert c.result(0.03, failure=Failure.CONNECT_FAILURE) is not None
    c.body_size = None  # a body too large to keep
    c.next_address(0.04)
    assert c.result(0.05, failure=Failure.CONNECT_FAILURE) is None


def test_budget_caps_retries_of_a_failing_service() -> None:
    policy = pc.TrafficPolicy(retry=pc.RetryPolicy(attempts=5, retry_on=("5xx",)))
    e = engine(svc("a/web", ["10.0.0.1", "10.0.0.2"], policy=policy))
    requests = upstream = 0
    now = 0.0
    for _ in range(2000):
        c = call(e, now=now)
        assert isinstance(c, Call)
        requests += 1
        while True:
            c.next_address(now)
            upstream += 1
            if c.result(now, status=503) is None:
                break
        c.finish(now)
        now += 0.002
    assert upstream <= 1.3 * requests


def test_deadline_from_header_bounds_attempts_and_propagates() -> None:
    policy = pc.TrafficPolicy(retry=pc.RetryPolicy(attempts=3, retry_on=("5xx",)))
    e = engine(svc("a/web", ["10.0.0.1", "10.0.0.2"], policy=policy))
    c = call(e, [(b"Synchro-Deadline-Ms", b"50")], now=10.0)
    assert isinstance(c, Call)
    assert c.try_timeout(10.0) == pytest.approx(0.05)
    assert c.deadline_headers(10.02) == [(b"synchro-deadline-ms", b"30")]
    assert c.rewrite_headers([(b"synchro-deadline-ms", b"50"), (b"a", b"b")]) == [(b"a", b"b")]
    c.next_address(10.0)
    assert c.result(10.05, failure=Failure.TIMEOUT) is None  # never retried past it
    assert "DX" in c.flags
    expired = call(e, [(b"grpc-timeout", b"0m")], now=5.0)
    assert isinstance(expired, Reply) and expired.status == 504 and expired.grpc_status == 4
    bad = call(e, [(b"grpc-timeout", b"soon")])
    assert isinstance(bad, Reply) and bad.status == 400


def test_route_timeout_is_a_deadline() -> None:
    route = pc.Route(
        kind="http",
        name="a/r",
        rule=0,
        backends=(pc.WeightedBackend("a/web", 80),),
        timeouts=pc.RouteTimeouts(request=0.25),
    )
    e = engine(svc("a/web", ["10.0.0.1"], routes=(route,)))
    c = call(e, now=1.0)
    assert isinstance(c, Call)
    assert c.try_timeout(1.0) == pytest.approx(0.25)
    assert c.deadline_headers(1.125) == [(b"synchro-deadline-ms", b"125")]


def test_breaker_overflow_answers_503_uo_and_recovers() -> None:
    policy = pc.TrafficPolicy(circuit_breaker=pc.CircuitBreaker(max_requests=1))
    e = engine(svc("a/web", ["10.0.0.1"], policy=policy))
    first = call(e)
    assert isinstance(first, Call)
    second = call(e)
    assert isinstance(second, Reply)
    assert (second.status, second.flag) == (503, Flag.UPSTREAM_OVERFLOW)
    first.finish(0.1)
    assert isinstance(call(e), Call)


def test_outlier_ejection_panic_and_state_kept_across_configs() -> None:
    od = pc.OutlierDetection(
        consecutive_5xx_errors=2, base_ejection_time=10.0, max_ejection_percent=100.0
    )
    policy = pc.TrafficPolicy(outlier_detection=od, load_balancer=pc.LoadBalancer("round_robin"))
    e = engine(svc("a/web", ["10.0.0.1", "10.0.0.2"], policy=policy))
    now = 0.0
    for _ in range(4):  # round robin: each endpoint fails twice
        c = call(e, now=now)
        assert isinstance(c, Call)
        c.next_address(now)
        c.result(now, status=500)
        c.finish(now)
    state = e.state.services["a/web"]
    assert state.outlier is not None and state.outlier.ejections_total == 2
    # Both ejected: panic mode balances over all rather than failing.
    c = call(e, now=1.0)
    assert isinstance(c, Call)
    assert isinstance(c.next_address(1.0), Address)
    # A new config (one more endpoint) keeps what was learned.
    e.apply(Registry(config(svc("a/web", ["10.0.0.1", "10.0.0.2", "10.0.0.3"], policy=policy))))
    assert e.state.services["a/web"] is state
    hosts = set()
    for _ in range(6):
        c = call(e, now=2.0)
        assert isinstance(c, Call)
        target = c.next_address(2.0)
        assert isinstance(target, Address)
        hosts.add(target.host)
        c.finish(2.0)
    assert hosts == {"10.0.0.3"}
    # Re-admitted after the ejection time.
    for _ in range(6):
        c = call(e, now=11.0)
        assert isinstance(c, Call)
        target = c.next_address(11.0)
        assert isinstance(target, Address)
        hosts.add(target.host)
        c.finish(11.0)
    assert hosts == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


def test_redirect_rewrite_and_header_modifiers() -> None:
    redirect = pc.Route(
        kind="http",
        name="a/old",
        rule=0,
        match=pc.RouteMatch(path=pc.PathMatch("PathPrefix", "/old")),
        filters=(
            pc.Filter(
                "RequestRedirect",
                request_redirect=pc.RequestRedirect(scheme="https", status_code=301),
            ),
        ),
    )
    rewrite = pc.Route(
        kind="http",
        name="a/api",
        rule=0,
        match=pc.RouteMatch(path=pc.PathMatch("PathPrefix", "/x")),
        backends=(pc.WeightedBackend("a/web", 80),),
        filters=(
            pc.Filter(
                "URLRewrite",
                url_rewrite=pc.URLRewrite(
                    hostname="api", path=pc.PathModifier("ReplacePrefixMatch", "/y")
                ),
            ),
            pc.Filter(
                "RequestHeaderModifier",
                request_header_modifier=pc.HeaderModifier(
                    set=pc.frozen_map({"X-A": "1"}),
                    add=pc.frozen_map({"x-b": "2"}),
                    remove=("x-c",),
                ),
            ),
        ),
    )
    e = engine(svc("a/web", ["10.0.0.1"], routes=(redirect, rewrite)))
    r = e.request(OUT, Address(VIP, 80), b"GET", b"/old/a?q=1", [(b"Host", b"web:80")], now=0)
    assert isinstance(r, Reply) and r.status == 301
    assert r.headers == [(b"location", b"https://web/old/a?q=1")]
    c = e.request(OUT, Address(VIP, 80), b"GET", b"/x/z?k=v", [], now=0)
    assert isinstance(c, Call)
    assert c.target == b"/y/z?k=v"
    out = c.rewrite_headers([(b"Host", b"web"), (b"X-A", b"0"), (b"x-c", b"gone"), (b"d", b"e")])
    assert out == [(b"Host", b"api"), (b"d", b"e"), (b"x-a", b"1"), (b"x-b", b"2")]
    none = e.request(OUT, Address(VIP, 80), b"GET", b"/nothing", [], now=0)
    assert isinstance(none, Reply) and none.status == 404


def test_inbound_rate_limit_and_fault_abort() -> None:
    limited = svc(
        "a/web",
        ["10.0.0.1"],
        policy=pc.TrafficPolicy(rate_limit=pc.RateLimit(requests_per_second=2, burst=2)),
    )
    cfg = pc.ProxyConfig(version="v", services=(limited,), inbound=pc.Inbound(services=("a/web",)))
    e = Engine(rng=random.Random(1))
    e.apply(Registry(cfg))
    here = Address("127.0.0.1", 8080)
    answers = [e.request(Direction.INBOUND, here, b"GET", b"/", [], now=0.0) for _ in range(3)]
    assert answers[:2] == [None, None]
    reply = answers[2]
    assert isinstance(reply, Reply) and reply.status == 429
    assert reply.headers == [(b"retry-after", b"1")]
    assert e.request(Direction.INBOUND, here, b"GET", b"/", [], now=0.6) is None  # refilled


def test_outbound_faults_only_when_the_destination_has_no_sidecar() -> None:
    fi = pc.FaultInjection(abort=pc.FaultAbort(http_status=503, percentage=100.0))
    plain = engine(svc("a/web", ["10.0.0.1"], policy=pc.TrafficPolicy(fault_injection=fi)))
    reply = call(plain)
    assert isinstance(reply, Reply) and reply.status == 503 and reply.flag is Flag.FAULT_INJECTED
    meshed = pc.Service(
        name="web",
        namespace="a",
        cluster_ips=(VIP,),
        ports=(
            pc.ServicePort(80, "http", endpoints=(pc.Endpoint("10.0.0.1", 8080, meshed=True),)),
        ),
        policy=pc.TrafficPolicy(fault_injection=fi),
    )
    assert isinstance(call(engine(meshed)), Call)


def test_outbound_defaults_from_the_environment() -> None:
    d = OutboundDefaults.from_env(
        {
            "SYNCHRO_TIMEOUT": "0.5",
            "SYNCHRO_RETRIES": "2",
            "SYNCHRO_RETRY_ON": "5xx,409",
            "SYNCHRO_LOAD_BALANCER": "round_robin",
        }
    )
    assert d == OutboundDefaults(0.5, 2, ("5xx", "409"), "round_robin")
    for env in (
        {"SYNCHRO_TIMEOUT": "soon"},
        {"SYNCHRO_RETRIES": "11"},
        {"SYNCHRO_RETRY_ON": "sometimes"},
        {"SYNCHRO_LOAD_BALANCER": "fastest"},
    ):
        with pytest.raises(EngineError, match=next(iter(env))):
            OutboundDefaults.from_env(env)
    e = engine(svc("a/web", ["10.0.0.1", "10.0.0.2"]), defaults=d)
    c = call(e, now=0.0)
    assert isinstance(c, Call)
    assert c.try_timeout(0.0) == pytest.approx(0.5)
    assert e.state.services["a/web"].lb_kind == "round_robin"
    c.next_address(0)
    assert c.result(0.01, status=409) is not None
