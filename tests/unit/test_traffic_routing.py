"""Route matching, weighted choice and filter cores."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.config import (
    GrpcMethodMatch,
    HeaderModifier,
    PathMatch,
    PathModifier,
    RequestRedirect,
    Route,
    RouteMatch,
    ValueMatch,
    WeightedBackend,
    frozen_map,
)
from proxy.traffic.routing import (
    RequestView,
    RouteTable,
    apply_header_modifier,
    redirect_location,
    rewrite_path,
)


def route(name: str, match: RouteMatch, *backends: tuple[str, int]) -> Route:
    return Route(
        kind="http",
        name=f"ns/{name}",
        rule=0,
        match=match,
        backends=tuple(WeightedBackend(f"ns/{b}", 80, w) for b, w in backends),
    )


def req(target: str, method: str = "GET", **headers: str) -> RequestView:
    return RequestView.from_target(
        method, target, {k.replace("_", "-"): v for k, v in headers.items()}
    )


TABLE = RouteTable(
    [
        route("exact", RouteMatch(path=PathMatch("Exact", "/login")), ("auth", 1)),
        route("prefix-long", RouteMatch(path=PathMatch("PathPrefix", "/api/v2")), ("api-v2", 1)),
        route(
            "hdr",
            RouteMatch(
                path=PathMatch("PathPrefix", "/api"),
                headers=(ValueMatch("X-Canary", "yes"),),
            ),
            ("api-canary", 1),
        ),
        route(
            "query",
            RouteMatch(
                path=PathMatch("PathPrefix", "/api"), query_params=(ValueMatch("beta", "1"),)
            ),
            ("api-beta", 1),
        ),
        route("prefix", RouteMatch(path=PathMatch("PathPrefix", "/api")), ("api", 1)),
        route(
            "regex",
            RouteMatch(path=PathMatch("RegularExpression", r"/img/[0-9]+\.png")),
            ("img", 1),
        ),
        route("post", RouteMatch(method="POST"), ("writer", 1)),
        route("default", RouteMatch(), ("web", 1)),
    ]
)


@pytest.mark.parametrize(
    ("request_view", "expected"),
    [
        (req("/login"), "exact"),
        (req("/login/x"), "default"),
        (req("/api/v2/items"), "prefix-long"),
        (req("/api/v22"), "prefix"),  # element-wise prefix: /api/v2 does not match /api/v22
        (req("/api/x", x_canary="yes"), "hdr"),
        (req("/api/x", x_canary="no"), "prefix"),
        (req("/api/x?beta=1&beta=2"), "query"),
        (req("/api/x?beta=2&beta=1"), "prefix"),  # the first value counts
        (req("/apix"), "default"),
        (req("/img/12.png"), "regex"),
        (req("/img/12.png.bak"), "default"),  # regex matches the whole path
        (req("/anything", "POST"), "post"),
    ],
)
def test_first_match_in_precedence_order(request_view: RequestView, expected: str) -> None:
    hit = TABLE.match(request_view)
    assert hit is not None and hit.route.name == f"ns/{expected}"


def test_no_match_without_catch_all() -> None:
    table = RouteTable([route("only", RouteMatch(path=PathMatch("Exact", "/a")), ("x", 1))])
    assert table.match(req("/b")) is None


def test_grpc_method_match() -> None:
    table = RouteTable(
        [
            route("m", RouteMatch(grpc=GrpcMethodMatch("shop.Payments", "Charge")), ("pay-v2", 1)),
            route("s", RouteMatch(grpc=GrpcMethodMatch("shop.Payments")), ("pay", 1)),
            route(
                "rx",
                RouteMatch(grpc=GrpcMethodMatch("shop\\..*", "Get.*", "RegularExpression")),
                ("shop", 1),
            ),
        ]
    )
    assert table.match(req("/shop.Payments/Charge", "POST")).route.name == "ns/m"
    assert table.match(req("/shop.Payments/Refund", "POST")).route.name == "ns/s"
    assert table.match(req("/shop.Catalog/GetItem", "POST")).route.name == "ns/rx"
    assert table.match(req("/other.Svc/GetItem", "POST")) is None


def test_weighted_split_90_10() -> None:
    table = RouteTable([route("canary", RouteMatch(), ("v1", 90), ("v2", 10))])
    hit = table.match(req("/"))
    rng = random.Random(42)
    counts = Counter(hit.choose_backend(rng).service for _ in range(20000))
    assert abs(counts["ns/v2"] / 20000 - 0.10) < 0.01


def test_zero_weights_choose_nothing() -> None:
    table = RouteTable(
        [route("off", RouteMatch(), ("v1", 0), ("v2", 0)), route("none", RouteMatch())]
    )
    assert table.routes[0].choose_backend(random.Random(0)) is None
    assert table.routes[1].choose_backend(random.Random(0)) is None
    blue_green = RouteTable([route("bg", RouteMatch(), ("blue", 0), ("green", 100))])
    rng = random.Random(1)
    assert {blue_green.routes[0].choose_backend(rng).service for _ in range(500)} == {"ns/green"}


def test_header_modifier_set_add_remove_case_insensitive() -> None:
    mod = HeaderModifier(
        set=frozen_map({"X-Env": "prod"}), add=frozen_map({"X-Via": "synchro"}), remove=("Cookie",)
    )
    headers = [("x-env", "dev"), ("cookie", "a=b"), ("X-Via", "lb"), ("accept", "*/*")]
    assert apply_header_modifier(headers, mod) == [
        ("X-Via", "lb"),
        ("accept", "*/*"),
        ("X-Env", "prod"),
        ("X-Via", "synchro"),
    ]


def test_rewrite_and_redirect() -> None:
    assert (
        rewrite_path("/old/a/b", PathModifier("ReplacePrefixMatch", "/new"), "/old") == "/new/a/b"
    )
    assert rewrite_path("/old", PathModifier("ReplacePrefixMatch", "/new"), "/old") == "/new"
    assert rewrite_path("/old/a", PathModifier("ReplacePrefixMatch", "/"), "/old") == "/a"
    assert rewrite_path("/x", PathModifier("ReplaceFullPath", "/y"), None) == "/y"
    loc = redirect_location(
        RequestRedirect(scheme="https", status_code=301),
        scheme="http",
        host="shop.example:8080",
        path="/a",
        query="q=1",
        matched_prefix=None,
    )
    assert loc == "https://shop.example/a?q=1"
    loc = redirect_location(
        RequestRedirect(hostname="new.example", path=PathModifier("ReplacePrefixMatch", "/v2")),
        scheme="http",
        host="old.example:8080",
        path="/v1/items",
        query="",
        matched_prefix="/v1",
    )
    assert loc == "http://new.example:8080/v2/items"
