"""GAMMA consumer routes: a route in another namespace than its parent Service
applies to callers in the route's namespace only, instead of the producer's."""

from __future__ import annotations

import json

import yaml

from controlplane import compiler
from controlplane.validation import SourceDoc, build

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shared}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api-v2, namespace: shared}
spec:
  selector: {app: api, version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shared}
spec:
  parentRefs: [{group: "", kind: Service, name: api}]
  rules:
    - filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {add: [{name: x-by, value: producer}]}
      backendRefs: [{name: api, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: my-api, namespace: team-a}
spec:
  parentRefs: [{group: "", kind: Service, name: api, namespace: shared}]
  rules:
    - backendRefs: [{name: api-v2, namespace: shared, port: 80}]
"""


def routes_seen_from(namespace: str) -> list[tuple[str, tuple[str, ...]]]:
    resources, problems = build([SourceDoc(d) for d in yaml.safe_load_all(MANIFESTS)])
    assert problems == []
    config = compiler.compile(resources, compiler.ProxyInfo(namespace, "client-0"))
    # What is pushed is what the proxy gets.
    pushed = json.loads(compiler.render(resources, config))
    assert pushed["version"] == config.version
    (api,) = [s for s in pushed["services"] if s["name"] == "api"]
    return [(r["name"], tuple(b["service"] for b in r["backends"])) for r in api["routes"]]


def test_a_consumer_route_applies_to_its_namespace_only_and_replaces_the_producers() -> None:
    assert routes_seen_from("team-a") == [("team-a/my-api", ("shared/api-v2",))]
    assert routes_seen_from("team-b") == [("shared/api", ("shared/api",))]
    assert routes_seen_from("shared") == [("shared/api", ("shared/api",))]


def test_consumer_routes_give_their_namespace_its_own_version() -> None:
    resources, _ = build([SourceDoc(d) for d in yaml.safe_load_all(MANIFESTS)])
    a = compiler.compile(resources, compiler.ProxyInfo("team-a", "x"))
    b = compiler.compile(resources, compiler.ProxyInfo("team-b", "x"))
    c = compiler.compile(resources, compiler.ProxyInfo("team-c", "x"))
    assert a.version != b.version
    assert b.services is c.services  # namespaces without consumer routes share one tuple
