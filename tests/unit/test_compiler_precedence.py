"""Golden cases: Gateway API route precedence as the compiler orders it.

HTTPRoute (gateway.networking.k8s.io/v1, HTTPRouteRule.matches): across all
routes of a parent, the match with an Exact path first, then the PathPrefix with
the most characters, then a method match, then the most header matches, then
the most query param matches; ties go to the oldest route, then
"{namespace}/{name}" alphabetically, then the first rule and match in order.
GRPCRoute: most characters in the service, then in the method, then most headers.
"""

from __future__ import annotations

from typing import Any

import yaml

from controlplane import compiler
from controlplane.validation import SourceDoc, build

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.1.1
  selector: {app: web}
  ports: [{name: http, port: 80}, {name: grpc, port: 9090}]
"""


def route(
    name: str,
    rules: list[dict[str, Any]],
    *,
    created: str = "",
    ns: str = "shop",
    kind: str = "HTTPRoute",
    port: int | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    parent: dict[str, Any] = {"group": "", "kind": "Service", "name": "web", "namespace": "shop"}
    if port:
        parent["port"] = port
    for r in rules:
        r.setdefault("backendRefs", [{"name": "web", "namespace": "shop", "port": 80}])
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "spec": {"parentRefs": [parent], "rules": rules},
    }


def order(*docs: dict[str, Any]) -> list[str]:
    resources, problems = build([SourceDoc(yaml.safe_load(SERVICE)), *(SourceDoc(d) for d in docs)])
    assert [p.line() for p in problems] == []
    cfg = compiler.compile(resources, compiler.ProxyInfo("shop"))
    (svc,) = [s for s in cfg.services if s.name == "web"]
    out = []
    for r in svc.routes:
        m = r.match
        if r.kind == "grpc":
            g = m.grpc
            label = f"{g.service}/{g.method}" if g else "*"
        else:
            label = f"{m.path.type}:{m.path.value}" if m.path else "-"
            if m.method:
                label += f" {m.method}"
            if m.headers:
                label += f" h{len(m.headers)}"
            if m.query_params:
                label += f" q{len(m.query_params)}"
        out.append(f"{r.name.split('/')[1]}#{r.rule} {label}")
    return out


def p(kind: str, value: str, **extra: Any) -> dict[str, Any]:
    return {"path": {"type": kind, "value": value}, **extra}


H = [{"name": "x-a", "value": "1"}]
HH = [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "2"}]
Q = [{"name": "q", "value": "1"}]


def test_exact_beats_any_prefix_and_longest_prefix_wins() -> None:
    got = order(
        route(
            "r1",
            [{"matches": [p("PathPrefix", "/")]}, {"matches": [p("PathPrefix", "/api/v1/users")]}],
        ),
        route("r2", [{"matches": [p("Exact", "/api")]}, {"matches": [p("PathPrefix", "/api")]}]),
    )
    assert got == [
        "r2#0 Exact:/api",
        "r1#1 PathPrefix:/api/v1/users",
        "r2#1 PathPrefix:/api",
        "r1#0 PathPrefix:/",
    ]


def test_method_then_headers_then_query_params_on_equal_paths() -> None:
    got = order(
        route(
            "r",
            [
                {"matches": [p("PathPrefix", "/x", queryParams=Q)]},
                {"matches": [p("PathPrefix", "/x", headers=HH)]},
                {"matches": [p("PathPrefix", "/x", headers=H, queryParams=Q)]},
                {"matches": [p("PathPrefix", "/x", headers=H)]},
                {"matches": [p("PathPrefix", "/x", method="GET")]},
                {"matches": [p("PathPrefix", "/x")]},
            ],
        )
    )
    assert got == [
        "r#4 PathPrefix:/x GET",
        "r#1 PathPrefix:/x h2",
        "r#2 PathPrefix:/x h1 q1",
        "r#3 PathPrefix:/x h1",
        "r#0 PathPrefix:/x q1",
        "r#5 PathPrefix:/x",
    ]


def test_path_length_beats_method_and_headers() -> None:
    got = order(
        route(
            "r",
            [
                {"matches": [p("PathPrefix", "/a", method="POST", headers=HH)]},
                {"matches": [p("PathPrefix", "/ab")]},
            ],
        )
    )
    assert got == ["r#1 PathPrefix:/ab", "r#0 PathPrefix:/a POST h2"]


def test_ties_oldest_route_then_namespace_name_then_rule_order() -> None:
    same = [{"matches": [p("PathPrefix", "/same")]}]
    got = order(
        route("zeta", [dict(x) for x in same], created="2024-01-01T00:00:00Z"),
        route("alpha", [dict(x) for x in same], created="2024-06-01T00:00:00Z"),
        route("beta", [dict(x) for x in same], created="2024-06-01T00:00:00Z"),
        route(
            "gamma",
            [{"matches": [p("PathPrefix", "/same")]}, {"matches": [p("PathPrefix", "/same")]}],
            created="2025-01-01T00:00:00Z",
        ),
    )
    assert got == [
        "zeta#0 PathPrefix:/same",  # oldest
        "alpha#0 PathPrefix:/same",  # same age: shop/alpha < shop/beta
        "beta#0 PathPrefix:/same",
        "gamma#0 PathPrefix:/same",  # within a route: first rule first
        "gamma#1 PathPrefix:/same",
    ]


def test_matches_of_one_rule_are_ranked_independently() -> None:
    got = order(
        route(
            "r",
            [
                {"matches": [p("PathPrefix", "/"), p("Exact", "/health")]},
                {"matches": [p("PathPrefix", "/api")]},
            ],
        )
    )
    assert got == ["r#0 Exact:/health", "r#1 PathPrefix:/api", "r#0 PathPrefix:/"]


def test_no_matches_means_prefix_slash_and_regex_sits_between_exact_and_prefix() -> None:
    got = order(
        route(
            "r",
            [
                {},
                {"matches": [p("RegularExpression", "/v[0-9]+/.*")]},
                {"matches": [p("Exact", "/")]},
                {"matches": [p("PathPrefix", "/very/long/prefix/indeed")]},
            ],
        ),
    )
    assert got == [
        "r#2 Exact:/",
        "r#1 RegularExpression:/v[0-9]+/.*",
        "r#3 PathPrefix:/very/long/prefix/indeed",
        "r#0 -",
    ]


def test_grpc_service_then_method_then_headers_and_grpc_before_http() -> None:
    def g(
        service: str = "", method: str = "", headers: list[dict[str, str]] | None = None
    ) -> dict[str, Any]:
        m: dict[str, Any] = {}
        if service or method:
            m["method"] = {k: v for k, v in (("service", service), ("method", method)) if v}
        if headers:
            m["headers"] = headers
        return m

    got = order(
        route("h", [{"matches": [p("PathPrefix", "/")]}]),
        route(
            "g",
            [
                {"matches": [g("pkg.Svc")]},
                {"matches": [g("pkg.Svc", "Get")]},
                {"matches": [g("pkg.LongerService")]},
                {"matches": [g(method="Get", headers=H)]},
                {"matches": [g("pkg.Svc", "Get", H)]},
            ],
            kind="GRPCRoute",
        ),
    )
    assert got == [
        "g#2 pkg.LongerService/",
        "g#4 pkg.Svc/Get",  # same service and method: more headers first
        "g#1 pkg.Svc/Get",
        "g#0 pkg.Svc/",
        "g#3 /Get",
        "h#0 PathPrefix:/",
    ]


def test_parent_port_scopes_a_route_and_backends_keep_weights() -> None:
    doc = route(
        "canary",
        [
            {
                "backendRefs": [
                    {"name": "web", "port": 80, "weight": 90},
                    {"name": "web", "port": 9090, "weight": 10},
                ]
            }
        ],
        port=80,
    )
    resources, problems = build([SourceDoc(yaml.safe_load(SERVICE)), SourceDoc(doc)])
    assert problems == []
    cfg = compiler.compile(resources, compiler.ProxyInfo("shop"))
    (r,) = cfg.services[0].routes
    assert r.port == 80
    assert [(b.service, b.port, b.weight) for b in r.backends] == [
        ("shop/web", 80, 90),
        ("shop/web", 9090, 10),
    ]
