"""Authorization core: a matrix of cases, and hypothesis against a plainly
written reference evaluator that reads the raw Istio-shaped specs directly."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.security.authz import (
    Allow,
    AuthzPolicyError,
    Deny,
    Peer,
    Request,
    compile_policy,
    decide,
)

FRONTEND = Peer("cluster.local/ns/shop/sa/frontend", "shop", "10.1.0.5")
ADMIN = Peer("cluster.local/ns/ops/sa/admin", "ops", "10.2.0.9")
PLAIN = Peer(None, None, "192.168.7.7")

ONLY_FRONTEND = compile_policy(
    "shop/payments",
    {
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}],
    },
)
DENY_ADMIN_PATH = compile_policy(
    "shop/no-admin",
    {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]},
)
GET_ONLY_FROM_OPS = compile_policy(
    "shop/ops-read",
    {
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"source": {"namespaces": ["ops"]}}],
                "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/status", "*.json"]}}],
            }
        ],
    },
)


@pytest.mark.parametrize(
    ("policies", "peer", "req", "allowed"),
    [
        ([], PLAIN, Request(80, method="DELETE", path="/"), True),  # no ALLOW policy: allow
        ([ONLY_FRONTEND], FRONTEND, Request(80, method="POST", path="/pay"), True),
        ([ONLY_FRONTEND], ADMIN, Request(80, method="POST", path="/pay"), False),
        ([ONLY_FRONTEND], PLAIN, Request(80, method="GET", path="/"), False),
        (
            [ONLY_FRONTEND, DENY_ADMIN_PATH],
            FRONTEND,
            Request(80, method="GET", path="/admin/x"),
            False,
        ),
        (
            [ONLY_FRONTEND, GET_ONLY_FROM_OPS],
            ADMIN,
            Request(80, method="GET", path="/status"),
            True,
        ),
        (
            [ONLY_FRONTEND, GET_ONLY_FROM_OPS],
            ADMIN,
            Request(80, method="GET", path="/a/b.json"),
            True,
        ),
        (
            [ONLY_FRONTEND, GET_ONLY_FROM_OPS],
            ADMIN,
            Request(80, method="POST", path="/status"),
            False,
        ),
        ([GET_ONLY_FROM_OPS], FRONTEND, Request(80, method="GET", path="/status"), False),
        # L7 fields on TCP: ALLOW never matches, DENY ignores them (fail closed both ways)
        ([GET_ONLY_FROM_OPS], ADMIN, Request(80, protocol="tcp"), False),
        ([DENY_ADMIN_PATH], FRONTEND, Request(80, protocol="tcp"), False),
        ([ONLY_FRONTEND], FRONTEND, Request(5432, protocol="tcp"), True),
    ],
)
def test_matrix(policies, peer, req, allowed) -> None:
    decision = decide(policies, peer, req)
    assert isinstance(decision, Allow if allowed else Deny), decision


def test_deny_beats_allow_and_names_policy() -> None:
    allow_all = compile_policy("ns/all", {"action": "ALLOW", "rules": [{}]})
    deny = compile_policy(
        "ns/deny",
        {"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["shop"]}}]}]},
    )
    d = decide([allow_all, deny], ADMIN, Request(80, method="GET", path="/"))
    assert d == Deny("denied by policy ns/deny", "ns/deny", ())
    assert isinstance(
        decide([allow_all, deny], FRONTEND, Request(80, method="GET", path="/")), Allow
    )


def test_allow_nothing_and_audit() -> None:
    allow_nothing = compile_policy("ns/nothing", {})
    assert isinstance(decide([allow_nothing], FRONTEND, Request(80)), Deny)
    audit = compile_policy("ns/audit", {"action": "AUDIT", "rules": [{}]})
    d = decide([audit], FRONTEND, Request(80))
    assert isinstance(d, Allow) and d.audited_by == ("ns/audit",)


def test_conditions_headers_ip_and_ports() -> None:
    p = compile_policy(
        "ns/cond",
        {
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"ipBlocks": ["10.1.0.0/16"]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                    "when": [{"key": "request.headers[x-tenant]", "values": ["blue"]}],
                }
            ],
        },
    )
    ok = Request(8080, method="GET", path="/", headers={"x-tenant": "blue"})
    assert isinstance(decide([p], FRONTEND, ok), Allow)
    assert isinstance(decide([p], FRONTEND, Request(8080, headers={"x-tenant": "red"})), Deny)
    assert isinstance(decide([p], FRONTEND, Request(9090, headers={"x-tenant": "blue"})), Deny)
    assert isinstance(decide([p], ADMIN, ok), Deny)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"action": "PERMIT"}, "spec.action"),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            r"spec.rules\[0\].to\[0\].operation.ports",
        ),
        ({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]}, "ipBlocks"),
        ({"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}, "key"),
        ({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}, "unknown field"),
        ({"rules": "all"}, "spec.rules"),
    ],
)
def test_invalid_policies_name_the_field(spec, message) -> None:
    with pytest.raises(AuthzPolicyError, match=message):
        compile_policy("ns/bad", spec)


# ---- reference evaluator: written the plain way, straight from the spec text ----


def ref_str_match(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def ref_field(obj: dict, pos: str, neg: str, value: str | None) -> bool:
    if pos in obj and not any(ref_str_match(p, value) for p in obj[pos]):
        return False
    return not (neg in obj and any(ref_str_match(p, value) for p in obj[neg]))


def ref_rule(rule: dict, peer: Peer, req: Request, action: str) -> bool:
    l7 = any(
        k in op.get("operation", {})
        for op in rule.get("to", [])
        for k in ("methods", "notMethods", "paths", "notPaths")
    )
    if req.protocol == "tcp" and l7 and action != "DENY":
        return False
    froms = rule.get("from", [])
    if froms:
        ok = False
        for f in froms:
            s = f.get("source", {})
            ip_ok = True
            if "ipBlocks" in s:
                ip_ok = any(
                    ipaddress.ip_address(peer.ip) in ipaddress.ip_network(b) for b in s["ipBlocks"]
                )
            if (
                ref_field(s, "principals", "notPrincipals", peer.principal)
                and ref_field(s, "namespaces", "notNamespaces", peer.namespace)
                and ip_ok
            ):
                ok = True
        if not ok:
            return False
    tos = rule.get("to", [])
    if tos:
        ok = False
        for t in tos:
            o = t.get("operation", {})
            good = "ports" not in o or str(req.port) in o["ports"]
            if req.protocol != "tcp":
                good = (
                    good
                    and ref_field(o, "methods", "notMethods", req.method)
                    and ref_field(o, "paths", "notPaths", req.path)
                )
            if good:
                ok = True
        if not ok:
            return False
    return True


def ref_decide(specs: list[dict], peer: Peer, req: Request) -> bool:
    for spec in specs:
        if spec.get("action") == "DENY" and any(
            ref_rule(r, peer, req, "DENY") for r in spec.get("rules", [])
        ):
            return False
    allows = [s for s in specs if s.get("action", "ALLOW") == "ALLOW"]
    if not allows:
        return True
    return any(any(ref_rule(r, peer, req, "ALLOW") for r in s.get("rules", [])) for s in allows)


principals = st.sampled_from(
    ["cluster.local/ns/a/sa/x", "cluster.local/ns/b/sa/y", "cluster.local/*", "*/sa/y", "*"]
)
namespaces = st.sampled_from(["a", "b", "c", "*"])
sources = st.fixed_dictionaries(
    {},
    optional={
        "principals": st.lists(principals, min_size=1, max_size=2),
        "notPrincipals": st.lists(principals, min_size=1, max_size=2),
        "namespaces": st.lists(namespaces, min_size=1, max_size=2),
        "notNamespaces": st.lists(namespaces, min_size=1, max_size=2),
        "ipBlocks": st.lists(
            st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16"]), min_size=1, max_size=2
        ),
    },
)
operations = st.fixed_dictionaries(
    {},
    optional={
        "ports": st.lists(st.sampled_from(["80", "8080"]), min_size=1, max_size=2),
        "methods": st.lists(st.sampled_from(["GET", "POST", "*"]), min_size=1, max_size=2),
        "notMethods": st.lists(st.sampled_from(["DELETE", "POST"]), min_size=1, max_size=1),
        "paths": st.lists(st.sampled_from(["/a", "/a/*", "*.json", "*"]), min_size=1, max_size=2),
        "notPaths": st.lists(st.sampled_from(["/a/secret", "/b*"]), min_size=1, max_size=1),
    },
)
rules = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.fixed_dictionaries({"source": sources}), min_size=1, max_size=2),
        "to": st.lists(st.fixed_dictionaries({"operation": operations}), min_size=1, max_size=2),
    },
)
specs = st.fixed_dictionaries(
    {"action": st.sampled_from(["ALLOW", "DENY", "AUDIT"]), "rules": st.lists(rules, max_size=3)}
)
peers = st.builds(
    Peer,
    st.sampled_from(
        [None, "cluster.local/ns/a/sa/x", "cluster.local/ns/b/sa/y", "other.domain/ns/a/sa/x"]
    ),
    st.sampled_from([None, "a", "b", "c"]),
    st.sampled_from(["10.1.2.3", "10.9.9.9", "192.168.1.1", "172.16.0.1"]),
)
requests = st.builds(
    Request,
    st.sampled_from([80, 8080, 9090]),
    st.sampled_from(["http", "tcp"]),
    st.sampled_from(["GET", "POST", "DELETE"]),
    st.sampled_from(["/", "/a", "/a/b", "/a/secret", "/x.json", "/b/c"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(specs, max_size=4), peers, requests)
def test_core_agrees_with_reference(raw: list[dict], peer: Peer, req: Request) -> None:
    policies = [compile_policy(f"ns/p{i}", s) for i, s in enumerate(raw)]
    assert isinstance(decide(policies, peer, req), Allow) == ref_decide(raw, peer, req)
