"""The compiler core beyond route order: endpoints, protocols, policies, scoping, versions."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from controlplane import compiler
from controlplane.validation import ResourceSet, SourceDoc, build
from proxy.config import ProxyConfig


def docs(text: str, *extra: dict[str, Any]) -> ResourceSet:
    resources, problems = build(
        [*(SourceDoc(d) for d in yaml.safe_load_all(text) if d), *(SourceDoc(d) for d in extra)]
    )
    assert [p.line() for p in problems] == []
    return resources


def pod(
    name: str,
    ip: str,
    labels: dict[str, str],
    *,
    ns: str = "shop",
    ready: bool = True,
    sa: str = "default",
    ports: dict[str, int] | None = None,
    meshed: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels,
            "annotations": {"synchro.dev/status": "{}"} if meshed else {},
        },
        "spec": {
            "serviceAccountName": sa,
            "containers": [
                {
                    "name": "app",
                    "ports": [{"name": k, "containerPort": v} for k, v in (ports or {}).items()],
                }
            ],
        },
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: web}
    - {name: grpc-api, port: 9090, targetPort: 9091}
    - {name: metrics, port: 9100, appProtocol: kubernetes.io/h2c}
    - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: tcp-pg, port: 5432}]
"""


def test_endpoints_from_pods_like_the_endpointslice_controller() -> None:
    rs = docs(
        SERVICES,
        pod(
            "web-1",
            "10.1.0.1",
            {"app": "web", "v": "1"},
            sa="web",
            ports={"web": 8080},
            meshed=True,
        ),
        pod("web-2", "10.1.0.2", {"app": "web"}, ready=False, ports={"web": 8081}),
        pod("web-3", "", {"app": "web"}, ports={"web": 8080}),  # no IP yet: not an endpoint
        pod("other", "10.1.0.9", {"app": "other"}),
        pod("web-x", "10.2.0.1", {"app": "web"}, ns="elsewhere"),  # another namespace
        pod("db-0", "10.1.0.20", {"app": "db"}),
    )
    cfg = compiler.compile(rs, compiler.ProxyInfo("shop"))
    web = next(s for s in cfg.services if s.name == "web")
    assert [(p.port, p.protocol) for p in web.ports] == [
        (80, "http"),
        (9090, "grpc"),
        (9100, "http2"),
    ]  # UDP left out
    http = web.ports[0]
    assert [(e.ip, e.port, e.ready) for e in http.endpoints] == [
        ("10.1.0.1", 8080, True),
        ("10.1.0.2", 8081, False),
    ]
    e1 = http.endpoints[0]
    assert (
        e1.identity == "spiffe://cluster.local/ns/shop/sa/web"
        and e1.meshed
        and e1.pod == "shop/web-1"
    )
    assert [e.port for e in web.ports[1].endpoints] == [9091, 9091]
    assert web.cluster_ips and web.cluster_ips[0].startswith("10.")  # allocated: no API server here
    db = next(s for s in cfg.services if s.name == "db")
    assert db.headless and db.cluster_ips == () and db.ports[0].protocol == "tcp"


def test_endpoint_slices_win_over_pods() -> None:
    sl = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abc",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["10.5.0.1"],
                "conditions": {"ready": True},
                "zone": "z1",
                "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"},
            },
            {"addresses": ["10.5.0.2"], "conditions": {"ready": False}},
        ],
        "ports": [{"name": "http", "port": 8443}],
    }
    rs = docs(SERVICES, pod("web-1", "10.5.0.1", {"app": "web"}, sa="web", ports={"web": 8080}), sl)
    web = next(
        s for s in compiler.compile(rs, compiler.ProxyInfo("shop")).services if s.name == "web"
    )
    assert [(e.ip, e.port, e.ready, e.zone) for e in web.ports[0].endpoints] == [
        ("10.5.0.1", 8443, True, "z1"),
        ("10.5.0.2", 8443, False, ""),
    ]
    assert web.ports[0].endpoints[0].identity.endswith("/sa/web")
    assert web.ports[1].endpoints == ()  # the slice has no "grpc-api" port


@pytest.mark.parametrize(
    ("app_protocol", "name", "expected"),
    [
        ("", "http", "http"),
        ("", "http-web", "http"),
        ("", "http2", "http2"),
        ("", "h2c-x", "http2"),
        ("", "grpc", "grpc"),
        ("", "grpc-web", "http"),
        ("", "tls-db", "tls"),
        ("", "https", "tls"),
        ("", "mysql", "tcp"),
        ("", "httpx", "tcp"),
        ("kubernetes.io/h2c", "tcp", "http2"),
        ("HTTP", "", "http"),
        ("kubernetes.io/ws", "", "http"),
    ],
)
def test_port_protocol(app_protocol: str, name: str, expected: str) -> None:
    assert compiler.port_protocol(app_protocol, name) == expected


POLICIES = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.5.5, selector: {app: api}, ports: [{name: http, port: 80}]}
---
apiVersion: synchro.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: ns-defaults, namespace: shop}
spec:
  timeouts: {request: 5s, connect: 250ms}
  retry: {attempts: 1}
---
apiVersion: synchro.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  targetRef: {group: "", kind: Service, name: api}
  retry: {attempts: 3, perTryTimeout: 500ms, retryOn: [5xx, reset, "503"]}
  rateLimit: {requestsPerUnit: 120, unit: minute, burst: 10}
  faultInjection: {abort: {grpcStatus: UNAVAILABLE, percentage: 5}}
---
apiVersion: synchro.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: mesh, namespace: synchro-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: synchro.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  mtls: {mode: UNSET}
  portLevelMtls: {"8080": {mode: DISABLE}}
---
apiVersion: synchro.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}], to: [{operation: {methods: [GET], ports: ["80"]}}]}]
---
apiVersion: synchro.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ns-deny, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {notNamespaces: [shop]}}]}]
---
apiVersion: synchro.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: other-ns, namespace: payments}
spec: {action: DENY, rules: [{}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: synchro-config, namespace: synchro-system}
data: {trustDomain: example.org, outboundPolicy: REGISTRY_ONLY}
"""


def test_traffic_policy_merge_and_units() -> None:
    rs = docs(POLICIES)
    cfg = compiler.compile(rs, compiler.ProxyInfo("shop", "web-1", {"app": "web"}, "web"))
    pol = cfg.services[0].policy
    assert pol is not None and pol.name == "shop/ns-defaults,shop/api"
    assert pol.retry is not None and (
        pol.retry.attempts,
        pol.retry.per_try_timeout,
        pol.retry.retry_on,
    ) == (3, 0.5, ("5xx", "reset", "503"))
    assert pol.timeouts is not None and (pol.timeouts.request, pol.timeouts.connect) == (
        5.0,
        0.25,
    )  # from the namespace policy
    assert (
        pol.rate_limit is not None
        and pol.rate_limit.requests_per_second == pytest.approx(2.0)
        and pol.rate_limit.burst == 10
    )
    assert (
        pol.fault_injection is not None
        and pol.fault_injection.abort is not None
        and pol.fault_injection.abort.grpc_status == 14
    )
    assert cfg.mesh.trust_domain == "example.org" and cfg.mesh.outbound_policy == "REGISTRY_ONLY"


def test_scoping_inbound_policies_to_the_workload() -> None:
    rs = docs(POLICIES)
    api = compiler.compile(rs, compiler.ProxyInfo("shop", "api-1", {"app": "api"}, "api"))
    web = compiler.compile(rs, compiler.ProxyInfo("shop", "web-1", {"app": "web"}, "web"))
    pay = compiler.compile(rs, compiler.ProxyInfo("payments", "p-1", {"app": "pay"}, "pay"))
    assert [a.name for a in api.inbound.authorization] == ["shop/api-allow", "shop/ns-deny"]
    assert [a.name for a in web.inbound.authorization] == ["shop/ns-deny"]
    assert [a.name for a in pay.inbound.authorization] == ["payments/other-ns"]
    # Mesh-wide STRICT; the workload policy is UNSET so it inherits, but adds a port exception.
    assert api.inbound.peer_authentication.mode == "STRICT"
    assert api.inbound.peer_authentication.mode_for(8080) == "DISABLE"
    assert web.inbound.peer_authentication.mode_for(8080) == "STRICT"
    assert api.inbound.services == ("shop/api",) and web.inbound.services == ()
    assert api.workload.identity == "spiffe://example.org/ns/shop/sa/api"
    # Everyone sees every service (what the workload may call).
    assert [s.key for s in pay.services] == ["shop/api"]
    assert len({api.version, web.version, pay.version}) == 3


def test_version_is_a_content_hash() -> None:
    a = compiler.compile(docs(POLICIES), compiler.ProxyInfo("shop", "api-1", {"app": "api"}, "api"))
    b = compiler.compile(docs(POLICIES), compiler.ProxyInfo("shop", "api-2", {"app": "api"}, "api"))
    assert a.version == b.version  # same content (another Pod of the workload), same version
    changed = compiler.compile(
        docs(POLICIES.replace("120", "121")),
        compiler.ProxyInfo("shop", "api-1", {"app": "api"}, "api"),
    )
    assert changed.version != a.version


def test_render_is_the_config_as_json() -> None:
    import json

    rs = docs(POLICIES, pod("api-1", "10.1.1.1", {"app": "api"}, sa="api"))
    cfg = compiler.compile(rs, compiler.proxy_info(rs, "shop", "api-1"))
    assert cfg.workload.service_account == "api"  # from the Pod, not the request
    assert ProxyConfig.from_dict(json.loads(compiler.render(rs, cfg))) == cfg


def test_cluster_ip_allocation_is_stable_and_unique() -> None:
    text = "\n---\n".join(
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n}}\nspec: {{ports: [{{port: 80}}]}}"
        for i in range(300)
    )
    first = {s.key: s.cluster_ips for s in compiler.shared(docs(text)).services}
    assert len({ips[0] for ips in first.values()}) == 300
    more = docs(
        text
        + "\n---\napiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: n}\nspec: {ports: [{port: 80}]}"
    )
    again = {s.key: s.cluster_ips for s in compiler.shared(more).services}
    assert all(again[k] == v for k, v in first.items())


def test_caches_across_builds_give_the_same_result() -> None:
    """The controller's parse cache and per-service memo only save work."""
    from controlplane.validation import ParseCache

    base = [d for d in yaml.safe_load_all(POLICIES + "\n---\n" + SERVICES) if d]
    pods = [
        pod(f"web-{i}", f"10.1.0.{i}", {"app": "web"}, ports={"web": 8080}) for i in range(1, 4)
    ]
    cache, memo = ParseCache(), {}
    info = compiler.ProxyInfo("shop", "api-1", {"app": "api"}, "api")
    first, _ = build([SourceDoc(d) for d in [*base, *pods]], cache=cache, memo=memo)
    compiler.compile(first, info)
    # Scale web: one Pod gone, one new; everything else is the same objects.
    changed = [
        *base,
        pods[0],
        pods[2],
        pod("web-9", "10.1.0.9", {"app": "web"}, ports={"web": 8080}),
    ]
    cached, _ = build([SourceDoc(d) for d in changed], cache=cache, memo=memo)
    fresh, _ = build([SourceDoc(d) for d in changed])
    a, b = compiler.compile(cached, info), compiler.compile(fresh, info)
    assert a == b and a.version == b.version
    web = next(s for s in a.services if s.name == "web")
    assert [e.ip for e in web.ports[0].endpoints] == ["10.1.0.1", "10.1.0.3", "10.1.0.9"]
    assert compiler.render(cached, a) == compiler.render(fresh, b)
