"""`synchro explain`'s core on configs the real compiler builds from a small shop:
a canary route, a denied call, a retried call, and the edge cases around them.
Each answer is checked against what the proxy's own cores decide on the same
config (RouteTable.match and the route's weights, RetryPolicy and
retriable_outcome, authz.decide), so explain cannot drift from them unnoticed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest
import yaml

from controlplane import compiler
from controlplane.validation import ResourceSet, SourceDoc, build
from proxy import config as pc
from proxy.security import authz, runtime
from proxy.traffic.retry import RetryPolicy, retriable_outcome
from proxy.traffic.routing import RequestView, RouteTable
from synchro import output
from synchro.commands import explain as ex

SHOP = """
apiVersion: v1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  selector: {app: frontend}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  selector: {app: catalog}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: catalog-v1, namespace: shop}
spec:
  selector: {app: catalog, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: catalog-v2, namespace: shop}
spec:
  selector: {app: catalog, version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: catalog, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "true"}]}]
      backendRefs: [{name: catalog-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs:
        - {name: catalog-v1, port: 80, weight: 90}
        - {name: catalog-v2, port: 80, weight: 10}
      timeouts: {request: 2s}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: synchro.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ratings, namespace: shop}
spec:
  targetRef: {group: "", kind: Service, name: ratings}
  loadBalancer: {type: least_request}
  retry: {attempts: 3, perTryTimeout: 500ms, retryOn: [5xx, reset]}
  timeouts: {request: 3s, connect: 1s}
  outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 10s}
  circuitBreaker: {maxRequests: 50}
---
apiVersion: v1
kind: Service
metadata: {name: payments, namespace: shop}
spec:
  selector: {app: payments}
  ports: [{name: grpc, port: 50051}]
---
apiVersion: synchro.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: payments-strict, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  mtls: {mode: STRICT}
---
apiVersion: synchro.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments-from-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
      to: [{operation: {methods: [POST]}}]
"""


def pod(
    name: str, ip: str, labels: dict[str, str], sa: str, *, meshed: bool = True
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": labels,
            "annotations": {"synchro.dev/status": "{}"} if meshed else {},
        },
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app"}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


PODS = [
    pod("frontend-0", "10.1.0.10", {"app": "frontend"}, "frontend"),
    pod("catalog-v1-0", "10.1.0.20", {"app": "catalog", "version": "v1"}, "catalog"),
    pod("catalog-v2-0", "10.1.0.21", {"app": "catalog", "version": "v2"}, "catalog"),
    pod("ratings-0", "10.1.0.30", {"app": "ratings"}, "ratings"),
    pod("ratings-1", "10.1.0.31", {"app": "ratings"}, "ratings"),
    pod("payments-0", "10.1.0.40", {"app": "payments"}, "payments"),
]


def resources(text: str = SHOP, pods: list[dict[str, Any]] = PODS) -> ResourceSet:
    docs = [SourceDoc(d) for d in yaml.safe_load_all(text) if d] + [SourceDoc(p) for p in pods]
    built, problems = build(docs)
    assert [p.line() for p in problems] == []
    return built


def config_of(rs: ResourceSet, name: str) -> pc.ProxyConfig:
    return compiler.compile(rs, compiler.proxy_info(rs, "shop", name))


@pytest.fixture(scope="module")
def shop() -> dict[str, pc.ProxyConfig]:
    rs = resources()
    # Through JSON, as the CLI gets them from the controller.
    return {
        f"shop/{p['metadata']['name']}": pc.ProxyConfig.from_dict(
            json.loads(json.dumps(config_of(rs, p["metadata"]["name"]).to_dict()))
        )
        for p in PODS
    }


def run(
    shop: dict[str, pc.ProxyConfig], src: str, dst: str, port: int | None = None, **kw: Any
) -> ex.Explanation:
    src_pod = f"shop/{src}"
    request = ex.Request(destination=dst, port=port, source_pod=src_pod, **kw)
    dst_configs = {
        k: v for k, v in shop.items() if k in ex.destination_pods(shop[src_pod], request)
    }
    return ex.explain(shop[src_pod], dst_configs, request)


def service(config: pc.ProxyConfig, key: str) -> pc.Service:
    (svc,) = [s for s in config.services if s.key == key]
    return svc


# --- a canary route ------------------------------------------------------------------------


def test_canary_route_weights_agree_with_the_router(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "frontend-0", "catalog", path="/api/items")
    assert e.service == "shop/catalog" and e.port == 80
    assert e.route == "shop/catalog rule 1"
    # The header rule was passed over, and explain says which condition failed.
    first, second = e.routes
    assert (first.matched, second.matched) == (False, True)
    assert "header x-canary=true" in first.why
    assert [(b.service, b.weight, b.percent) for b in e.backends] == [
        ("shop/catalog-v1", 90, 90.0),
        ("shop/catalog-v2", 10, 10.0),
    ]
    # The proxy's router on the same config: the same route, and its weighted
    # choice over many requests lands on the shares explain reports.
    svc = service(shop["shop/frontend-0"], "shop/catalog")
    compiled = RouteTable(svc.routes).match(RequestView("GET", "/api/items", "", {}), 80)
    assert compiled is not None and compiled.route.rule == 1
    rng = random.Random(7)
    counts = Counter(compiled.choose_backend(rng).service for _ in range(20000))  # type: ignore[union-attr]
    for b in e.backends:
        assert abs(100 * counts[b.service] / 20000 - b.percent) < 1.5
    assert e.timeouts is not None and e.timeouts.request == 2.0
    assert e.timeouts.request_source == "route shop/catalog rule 1"
    assert e.outcome == "forwarded"
    assert "90% of requests" in e.verdict


def test_header_match_wins_over_the_canary_split(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "frontend-0", "catalog.shop", 80, path="/api", headers={"x-canary": "true"})
    assert e.route == "shop/catalog rule 0"
    assert [b.service for b in e.backends] == ["shop/catalog-v2"]
    assert e.routes[0].why == "first match in precedence order"


def test_no_route_matches(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "frontend-0", "catalog.shop.svc.cluster.local", path="/other")
    assert e.route is None and e.outcome == "no-route" and e.status == 404
    assert all(not c.matched for c in e.routes)
    assert "path PathPrefix /api" in e.routes[1].why
    svc = service(shop["shop/frontend-0"], "shop/catalog")
    assert RouteTable(svc.routes).match(RequestView("GET", "/other", "", {}), 80) is None


# --- a retried call --------------------------------------------------------------------------


def test_retried_call_agrees_with_the_retry_core(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "frontend-0", "ratings", path="/ratings/1")
    r = e.retry
    assert r is not None
    assert r.attempts == 4  # 3 retries
    assert r.per_try_timeout == 0.5
    assert r.source == "TrafficPolicy shop/ratings"
    assert {"5xx", "reset"} <= set(r.retry_on)
    # The same policy, rebuilt by the core, retries a 503 and a reset but not a 404.
    policy = RetryPolicy(
        attempts=r.attempts,
        per_try_timeout=r.per_try_timeout,
        retry_on=frozenset(r.retry_on),
        status_codes=frozenset(r.status_codes),
    )
    assert retriable_outcome(policy, status=503)
    assert not retriable_outcome(policy, status=404)
    (b,) = e.backends
    assert b.load_balancer["type"] == "least_request"
    assert b.outlier_detection is not None and b.outlier_detection["consecutive_5xx_errors"] == 3
    assert b.circuit_breaker == {"max_requests": 50}
    assert b.endpoints_ready == 2
    assert e.timeouts is not None
    assert (e.timeouts.request, e.timeouts.connect) == (3.0, 1.0)
    assert "up to 4 attempts" in e.verdict


def test_default_retry_is_the_safe_one(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "ratings-0", "frontend")
    assert e.retry is not None
    assert e.retry.attempts == 2
    assert set(e.retry.retry_on) == {"connect-failure", "refused-stream"}
    assert e.route is None and e.backends[0].service == "shop/frontend"


def test_explain_agrees_with_the_engine_when_there_is_one(
    shop: dict[str, pc.ProxyConfig],
) -> None:
    engine_mod = pytest.importorskip("proxy.engine")
    engine = engine_mod.Engine()
    if not hasattr(engine, "_retry_policy"):
        pytest.skip("proxy.engine has no _retry_policy to compare with")
    config = shop["shop/frontend-0"]
    for key, route_rule in (("shop/ratings", None), ("shop/frontend", None), ("shop/catalog", 1)):
        svc = service(config, key)
        route = next((r for r in svc.routes if r.rule == route_rule), None)
        policy, _base, request_timeout, per_try = engine._retry_policy(svc, route)
        mine = ex.retry_of(svc, route)
        assert mine.attempts == policy.attempts, key
        assert set(mine.retry_on) == set(policy.retry_on), key
        assert set(mine.status_codes) == set(policy.status_codes), key
        assert mine.per_try_timeout == per_try, key
        assert ex.timeouts_of(svc, route, mine).request == request_timeout, key


# --- a denied call ---------------------------------------------------------------------------


def test_denied_call_agrees_with_authz(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "ratings-0", "payments", 50051, path="/shop.Payments/Charge", method="POST")
    (b,) = e.backends
    assert b.pod == "shop/payments-0"
    assert b.mtls is not None and b.mtls.mode == "STRICT" and b.mtls.mutual_tls
    assert b.mtls.source == "shop/payments-strict"
    assert b.authorization is not None
    assert b.authorization.decision == "DENY"
    assert b.authorization.policies == ("shop/payments-from-frontend",)
    assert e.outcome == "denied" and e.status == 403
    # The core itself, on the destination's config and the caller's identity.
    dst = shop["shop/payments-0"]
    policies = runtime.compile_policies(dst.inbound.authorization)
    peer = authz.Peer("cluster.local/ns/shop/sa/ratings", "shop", "10.1.0.30")
    request = authz.Request(port=50051, method="POST", path="/shop.Payments/Charge")
    assert isinstance(authz.decide(policies, peer, request), authz.Deny)


def test_allowed_call(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "frontend-0", "payments", 50051, path="/shop.Payments/Charge", method="POST")
    (b,) = e.backends
    assert b.authorization is not None and b.authorization.decision == "ALLOW"
    assert b.authorization.policy == "shop/payments-from-frontend"
    assert e.outcome == "forwarded"
    # The rule asks for POST: a GET from frontend is denied too.
    get = run(shop, "frontend-0", "payments", 50051, path="/x")
    assert get.outcome == "denied"


def test_a_broken_policy_fails_closed_as_in_the_proxy() -> None:
    # Compiled by the proxy's own runtime: one that does not compile denies all.
    bad = pc.Condition(key="request.auth.claims[x]", values=("y",))
    broken = pc.AuthorizationPolicy(name="shop/broken", rules=(pc.AuthorizationRule(when=(bad,)),))
    dst = pc.ProxyConfig(version="v", inbound=pc.Inbound(authorization=(broken,)))
    (policy,) = ex.compiled_policies(dst)
    assert policy.action is authz.Action.DENY


def test_mtls_follows_the_callers_mesh_default(shop: dict[str, pc.ProxyConfig]) -> None:
    # proxy.upstream sends plaintext when the caller's mesh default is DISABLE.
    src = shop["shop/ratings-0"]
    plain = pc.ProxyConfig.from_dict(
        {**src.to_dict(), "mesh": {**pc.to_dict(src.mesh), "default_mtls_mode": "DISABLE"}}
    )
    request = ex.Request("payments", 50051, "/x", "POST", {}, "shop/ratings-0")
    e = ex.explain(plain, shop["shop/payments-0"], request)
    (b,) = e.backends
    assert b.mtls is not None and not b.mtls.mutual_tls and b.mtls.refused
    assert e.outcome == "reset"


def test_plaintext_from_a_pod_without_sidecar_to_strict_is_refused() -> None:
    legacy = pod("legacy-0", "10.1.0.50", {"app": "frontend"}, "frontend", meshed=False)
    rs = resources(pods=[*PODS, legacy])
    src, dst = config_of(rs, "legacy-0"), config_of(rs, "payments-0")
    e = ex.explain(src, dst, ex.Request("payments", 50051, "/x", "POST", {}, "shop/legacy-0"))
    (b,) = e.backends
    assert b.mtls is not None and b.mtls.mode == "STRICT"
    assert not b.mtls.mutual_tls and b.mtls.refused
    assert e.outcome == "reset"
    assert any("no sidecar" in n for n in e.notes)


def test_destination_without_sidecar_enforces_nothing() -> None:
    plain = pod("payments-0", "10.1.0.40", {"app": "payments"}, "payments", meshed=False)
    rs = resources(pods=[*PODS[:-1], plain])
    e = ex.explain(
        config_of(rs, "frontend-0"),
        {},
        ex.Request("payments", 50051, "/x", "POST", {}, "shop/frontend-0"),
    )
    (b,) = e.backends
    assert b.mtls is not None and b.mtls.mode == "none" and not b.mtls.mutual_tls
    assert b.authorization is not None and b.authorization.decision == "NOT_ENFORCED"
    assert e.outcome == "forwarded"


def test_unknown_destination_config_is_reported_not_guessed(
    shop: dict[str, pc.ProxyConfig],
) -> None:
    e = ex.explain(
        shop["shop/frontend-0"], {}, ex.Request("payments", 50051, source_pod="shop/frontend-0")
    )
    (b,) = e.backends
    assert b.authorization is not None and b.authorization.decision == "UNKNOWN"


# --- destinations ----------------------------------------------------------------------------


def test_cluster_ip_and_pod_ip(shop: dict[str, pc.ProxyConfig]) -> None:
    src = shop["shop/frontend-0"]
    ip = service(src, "shop/ratings").cluster_ips[0]
    by_ip = run(shop, "frontend-0", ip, 80)
    assert by_ip.service == "shop/ratings" and by_ip.resolution == "service"
    direct = run(shop, "frontend-0", "10.1.0.30", 8080)
    assert direct.resolution == "endpoint" and direct.backends[0].pod == "shop/ratings-0"


def test_unknown_host_allow_any_and_registry_only(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "frontend-0", "example.com", 443)
    assert e.resolution == "passthrough" and e.outcome == "forwarded"
    strict_src = pc.ProxyConfig.from_dict(
        {
            **shop["shop/frontend-0"].to_dict(),
            "mesh": {
                **pc.to_dict(shop["shop/frontend-0"].mesh),
                "outbound_policy": "REGISTRY_ONLY",
            },
        }
    )
    refused = ex.explain(strict_src, {}, ex.Request("example.com", 443))
    assert refused.outcome == "refused" and refused.status == 502


def test_bad_port_names_the_ports(shop: dict[str, pc.ProxyConfig]) -> None:
    with pytest.raises(ex.ExplainError, match=r"has no port 81 \(ports: 80\)"):
        run(shop, "frontend-0", "catalog", 81)


# --- rendering -------------------------------------------------------------------------------


def test_outputs(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "frontend-0", "catalog", path="/api/items")
    data = e.to_dict()
    assert json.loads(output.to_json(data)) == data
    assert yaml.safe_load(output.to_yaml(data)) == data
    text = ex.render_text(data)
    assert "shop/catalog-v1:80  weight 90 (90%)" in text
    assert "Verdict:" in text and "header x-canary=true" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("web", ("web", None)),
        ("web.shop:8080", ("web.shop", 8080)),
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[fd00::1]:80", ("fd00::1", 80)),
        ("fd00::1", ("fd00::1", None)),
    ],
)
def test_parse_destination(text: str, expected: tuple[str, int | None]) -> None:
    assert ex.parse_destination(text) == expected


@pytest.mark.parametrize("text", ["web:http", "web:0", ":80"])
def test_parse_destination_errors(text: str) -> None:
    from synchro.commands import CommandError

    with pytest.raises(CommandError):
        ex.parse_destination(text)


# --- a port that declares no protocol: the proxy sniffs it ----------------------------------

UNNAMED = """
apiVersion: v1
kind: Service
metadata: {name: desk, namespace: shop}
spec:
  selector: {app: desk}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: desk-v2, namespace: shop}
spec:
  selector: {app: desk, version: v2}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: desk, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: desk, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: desk-v2, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: cache, namespace: shop}
spec:
  selector: {app: desk}
  ports: [{name: http, port: 6379, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cache, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cache}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: desk-v2, port: 80}]
---
apiVersion: synchro.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: desk-get-only, namespace: shop}
spec:
  selector: {matchLabels: {app: desk}}
  action: ALLOW
  rules:
    - to: [{operation: {methods: [GET]}}]
"""


@pytest.fixture(scope="module")
def desk() -> dict[str, pc.ProxyConfig]:
    pods = [
        *PODS,
        pod("desk-0", "10.1.0.60", {"app": "desk", "version": "v1"}, "desk"),
        pod("desk-v2-0", "10.1.0.61", {"app": "desk", "version": "v2"}, "desk"),
    ]
    rs = resources(SHOP + "---\n" + UNNAMED, pods)
    return {
        f"shop/{p['metadata']['name']}": pc.ProxyConfig.from_dict(
            json.loads(json.dumps(config_of(rs, p["metadata"]["name"]).to_dict()))
        )
        for p in pods
    }


def engine_decision(config: pc.ProxyConfig, key: str, port: int, path: str) -> Any:
    """What the source proxy's engine does with an HTTP request to the service."""
    from proxy.conn import Address, Direction
    from proxy.engine import Engine
    from proxy.registry import Registry

    engine = Engine()
    engine.apply(Registry(config))
    ip = service(config, key).cluster_ips[0]
    return engine.request(Direction.OUTBOUND, Address(ip, port), b"GET", path.encode(), [], now=0)


def test_an_unnamed_port_is_detected_and_its_http_route_applies(
    desk: dict[str, pc.ProxyConfig],
) -> None:
    from proxy import detect
    from proxy.conn import Protocol

    src = desk["shop/frontend-0"]
    assert service(src, "shop/desk").ports[0].protocol == "tcp"  # nothing declared
    e = run(desk, "frontend-0", "desk", path="/v2/tickets")
    assert e.detection == ex.DETECTED and e.protocol == "http"
    assert e.route == "shop/desk rule 0"
    assert [b.service for b in e.backends] == ["shop/desk-v2"]
    text = ex.render_text(e.to_dict())
    assert "detected at runtime: HTTP routes apply if the client speaks HTTP" in text
    assert "Route:" in text and "none" not in text.split("Route:")[1].splitlines()[0]
    # The proxy: an HTTP/1 request line is detected as HTTP/1 on this port (not an
    # opaque one), and its engine applies the route explain names.
    assert 80 not in ex.ports.SERVER_FIRST_PORTS
    assert detect.detect(b"GET /v2/tickets HTTP/1.1\r\n") == detect.Detected(Protocol.HTTP1)
    call = engine_decision(src, "shop/desk", 80, "/v2/tickets")
    assert call.route == "shop/desk" and call.backend.key == "shop/desk-v2"
    # The TCP fallback: no route, the service's own endpoints, connect retries only,
    # and authorization as TCP (a methods rule never matches a TCP connection).
    fb = e.tcp_fallback
    assert fb is not None
    assert [b.service for b in fb.backends] == ["shop/desk"]
    assert fb.retry is not None and fb.retry.retry_on == ("connect-failure",)
    assert fb.backends[0].authorization is not None
    assert fb.backends[0].authorization.decision == "DENY"
    assert e.backends[0].authorization is not None
    assert e.backends[0].authorization.decision == "ALLOW"
    assert "TCP fallback" in text


def test_an_unnamed_port_without_a_matching_route_answers_404_as_the_engine_does(
    desk: dict[str, pc.ProxyConfig],
) -> None:
    e = run(desk, "frontend-0", "desk", path="/other")
    assert e.outcome == "no-route" and e.status == 404
    reply = engine_decision(desk["shop/frontend-0"], "shop/desk", 80, "/other")
    assert reply.status == 404


def test_an_opaque_port_skips_detection_whatever_its_name(
    desk: dict[str, pc.ProxyConfig],
) -> None:
    # 6379 is server-first in the proxy: the listener never sniffs it.
    assert 6379 in ex.ports.SERVER_FIRST_PORTS
    e = run(desk, "frontend-0", "cache", path="/v2/x")
    assert e.detection == ex.OPAQUE and e.protocol == "tcp"
    assert e.route is None and e.routes == () and e.tcp_fallback is None
    assert [b.service for b in e.backends] == ["shop/cache"]
    assert "opaque TCP: no protocol detection" in ex.render_text(e.to_dict())
    # The source Pod's synchro.dev/opaque-ports make a port opaque the same way.
    src = desk["shop/frontend-0"]
    request = ex.Request("desk", None, "/v2/x", source_pod="shop/frontend-0")
    opaque = ex.explain(src, {}, request, opaque_ports=frozenset({80}))
    assert opaque.detection == ex.OPAQUE and opaque.route is None


def test_a_declared_http_port_keeps_its_answer(shop: dict[str, pc.ProxyConfig]) -> None:
    e = run(shop, "frontend-0", "catalog", path="/api/items")
    assert e.detection == ex.DECLARED and e.tcp_fallback is None
