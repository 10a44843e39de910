"""Validation core: invalid resources are reported with file, document and field,
and left out; the rest applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import resources as rs
from controlplane.sources.files import FileSource
from controlplane.validation import SourceDoc, build

SVC = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {"ports": [{"name": "http", "port": 80}]},
}


def one_problem(doc: dict[str, Any], *others: dict[str, Any]) -> tuple[str, str]:
    _, problems = build(
        [
            SourceDoc(SVC, "svc.yaml", 0),
            SourceDoc(doc, "bad.yaml", 2),
            *(SourceDoc(o) for o in others),
        ]
    )
    assert len(problems) == 1, [p.line() for p in problems]
    return problems[0].field, problems[0].message


def y(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x, value: "1"}]}]
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}]
      backendRefs: [{name: web, port: 80, weight: 5}]
      timeouts: {request: 2s}
"""


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("value: /api", "value: api", "spec.rules[0].matches[0].path.value", "must start with '/'"),
        (
            "type: PathPrefix",
            "type: Prefix",
            "spec.rules[0].matches[0].path.type",
            "'Prefix' is not one of",
        ),
        ("weight: 5", "weight: -1", "spec.rules[0].backendRefs[0].weight", "must be >= 0"),
        ("weight: 5", "weight: five", "spec.rules[0].backendRefs[0].weight", "expected an integer"),
        ("request: 2s", "request: soon", "spec.rules[0].timeouts.request", "not a duration"),
        (
            "type: RequestHeaderModifier",
            "type: Teleport",
            "spec.rules[0].filters[0].type",
            "unsupported filter",
        ),
        (
            '{name: x, value: "1"}',
            "{name: x}",
            "spec.rules[0].matches[0].headers[0].value",
            "required",
        ),
        (
            "name: web, port: 80, weight",
            "name: web, weight",
            "spec.rules[0].backendRefs[0].port",
            "required",
        ),
        (
            "kind: Service, name: web, port: 80}",
            "kind: Gateway, name: web}",
            "spec.parentRefs[0].kind",
            "only Service parents",
        ),
        (
            "name: web, port: 80}]\n  rules",
            "name: nope}]\n  rules",
            "spec.parentRefs[0].name",
            "Service shop/nope does not exist",
        ),
        ("name: r,", "name: R_bad,", "metadata.name", "not a valid name"),
    ],
)
def test_route_errors_name_the_field(old: str, new: str, field: str, message: str) -> None:
    assert old in ROUTE
    got_field, got_message = one_problem(y(ROUTE.replace(old, new)))
    assert got_field == field
    assert message in got_message


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "TrafficPolicy",
                "metadata": {"name": "t", "namespace": "shop"},
                "spec": {"retry": {"attempts": 11}},
            },
            "spec.retry.attempts",
            "must be <= 10",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "TrafficPolicy",
                "metadata": {"name": "t", "namespace": "shop"},
                "spec": {"retry": {"retryOn": ["5xx", "sometimes"]}},
            },
            "spec.retry.retryOn[1]",
            "unknown retry condition",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "TrafficPolicy",
                "metadata": {"name": "t", "namespace": "shop"},
                "spec": {"loadBalancer": {"type": "fastest"}},
            },
            "spec.loadBalancer.type",
            "not one of",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "TrafficPolicy",
                "metadata": {"name": "t", "namespace": "shop"},
                "spec": {
                    "faultInjection": {"abort": {"httpStatus": 503, "grpcStatus": "UNAVAILABLE"}}
                },
            },
            "spec.faultInjection.abort.httpStatus",
            "exactly one of",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "TrafficPolicy",
                "metadata": {"name": "t", "namespace": "shop"},
                "spec": {"targetRef": {"kind": "Deployment", "name": "web"}},
            },
            "spec.targetRef.kind",
            "must name a Service",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "p", "namespace": "shop"},
                "spec": {"mtls": {"mode": "strict"}},
            },
            "spec.mtls.mode",
            "not one of",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "a", "namespace": "shop"},
                "spec": {
                    "action": "ALLOW",
                    "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}],
                },
            },
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "not an IP or CIDR",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "a", "namespace": "shop"},
                "spec": {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            },
            "spec.rules[0].to[0].operation.ports[0]",
            "not a port",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1beta9",
                "kind": "TrafficPolicy",
                "metadata": {"name": "t"},
            },
            "apiVersion",
            "unsupported version",
        ),
        (
            {
                "apiVersion": "synchro.dev/v1alpha1",
                "kind": "MagicPolicy",
                "metadata": {"name": "t"},
            },
            "kind",
            "unknown synchro.dev kind",
        ),
        (
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "s", "namespace": "shop"},
                "spec": {"ports": [{"port": 70000}]},
            },
            "spec.ports[0].port",
            "must be <= 65535",
        ),
        ({"apiVersion": "v1", "kind": "Service", "spec": {}}, "metadata", "required"),
        ({"kind": "Service"}, "apiVersion", "required"),
    ],
)
def test_policy_and_core_errors_name_the_field(
    doc: dict[str, Any], field: str, message: str
) -> None:
    got_field, got_message = one_problem(doc)
    assert got_field == field
    assert message in got_message


def test_error_line_names_file_document_and_field() -> None:
    bad = y(ROUTE.replace("value: /api", "value: api"))
    good = y(ROUTE.replace("name: r,", "name: good,"))
    resources, problems = build(
        [
            SourceDoc(SVC, "svc.yaml", 0),
            SourceDoc(bad, "routes.yaml", 1),
            SourceDoc(good, "routes.yaml", 2),
        ]
    )
    (p,) = problems
    assert p.line() == (
        "routes.yaml document 2 (HTTPRoute shop/r): spec.rules[0].matches[0].path.value: "
        "path 'api' must start with '/' [Accepted=False Invalid]"
    )
    assert [r.meta.name for r in resources.routes] == ["good"]  # the rest applies


def test_cross_resource_checks() -> None:
    tp = {
        "apiVersion": "synchro.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {
            "name": "old",
            "namespace": "shop",
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {"targetRef": {"group": "", "kind": "Service", "name": "web"}},
    }
    tp2 = {
        **tp,
        "metadata": {
            "name": "new",
            "namespace": "shop",
            "creationTimestamp": "2025-01-01T00:00:00Z",
        },
    }
    dup = dict(SVC)
    missing_backend = y(ROUTE.replace("backendRefs: [{name: web,", "backendRefs: [{name: gone,"))
    resources, problems = build(
        [
            SourceDoc(SVC, "a.yaml", 0),
            SourceDoc(tp2),
            SourceDoc(tp),
            SourceDoc(dup, "b.yaml", 0),
            SourceDoc(missing_backend),
        ]
    )
    reasons = sorted((p.name, p.reason, p.condition) for p in problems)
    assert reasons == [
        ("new", "Conflicted", "Accepted"),
        ("r", "BackendNotFound", "ResolvedRefs"),
        ("web", "Duplicate", "Accepted"),
    ]
    assert [t.meta.name for t in resources.traffic_policies] == ["old"]  # the older one wins
    assert [r.meta.name for r in resources.routes] == ["r"]  # kept: a missing backend answers 500


def test_irrelevant_kinds_are_ignored_and_durations_parse() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"replicas": "many"},
    }
    _, problems = build([SourceDoc(deployment)])
    assert problems == []
    assert (
        rs.parse_duration("1h2m3s") == 3723.0
        and rs.parse_duration("250ms") == 0.25
        and rs.parse_duration(2) == 2.0
    )
    for bad in ("", "10", "1x", "-1s", "s", True):
        with pytest.raises(ValueError):
            rs.parse_duration(bad)


yaml_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "spec",
                    "rules",
                    "matches",
                    "path",
                    "type",
                    "value",
                    "name",
                    "port",
                    "parentRefs",
                    "backendRefs",
                    "metadata",
                    "selector",
                    "mtls",
                    "mode",
                    "retry",
                    "attempts",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(
        [
            ("gateway.networking.k8s.io/v1", "HTTPRoute"),
            ("gateway.networking.k8s.io/v1", "GRPCRoute"),
            ("synchro.dev/v1alpha1", "TrafficPolicy"),
            ("synchro.dev/v1alpha1", "PeerAuthentication"),
            ("synchro.dev/v1alpha1", "AuthorizationPolicy"),
            ("v1", "Service"),
            ("v1", "Pod"),
            ("discovery.k8s.io/v1", "EndpointSlice"),
        ]
    ),
    yaml_like,
)
def test_garbage_documents_never_crash(kind: tuple[str, str], spec: Any) -> None:
    doc = {
        "apiVersion": kind[0],
        "kind": kind[1],
        "metadata": {
            "name": "x",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "spec": spec,
    }
    build([SourceDoc(SVC), SourceDoc(doc)])  # problems, never an exception


def test_file_source_reports_yaml_syntax_errors_and_reloads(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(SVC))
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n"
    )
    (tmp_path / ".hidden.yaml").write_text("garbage: [")
    (tmp_path / "notes.txt").write_text("not yaml")
    src = FileSource(tmp_path)
    assert src.scan()
    (p,) = src.problems()
    assert p.origin.endswith("bad.yaml") and p.index == 1 and "invalid YAML (line 6" in p.line()
    assert [d.doc["kind"] for d in src.documents()] == ["Namespace", "Service"]
    assert not src.scan()  # nothing changed
    (tmp_path / "bad.yaml").unlink()
    assert src.scan() and src.problems() == []


def test_example_custom_resources_and_demo_manifests_are_accepted() -> None:
    """The CRDs' example resources and the demo's manifests parse cleanly: the
    parser agrees with the CRD schemas (deploy/crds) on field shapes."""
    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "deploy" / "examples-crs").glob("*.yaml")) + sorted(
        (root / "examples").rglob("*.yaml")
    )
    if not files:
        pytest.skip("no example manifests in this checkout")
    docs = [
        SourceDoc(d, str(f), i)
        for f in files
        for i, d in enumerate(yaml.safe_load_all(f.read_text()))
        if d
    ]
    resources, problems = build(docs)
    assert [p.line() for p in problems if p.condition == "Accepted"] == []
    assert (
        resources.traffic_policies
        and resources.authorization_policies
        and resources.peer_authentications
    )
