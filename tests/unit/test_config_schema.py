"""proxy.config: validated when built, JSON round trip, errors name the field."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config as pc
from proxy.registry import Passthrough, Refuse, Registry, ToEndpoint, ToService


def sample() -> pc.ProxyConfig:
    ep = pc.Endpoint(
        ip="10.1.0.1",
        port=8080,
        labels=pc.frozen_map({"app": "a"}),
        identity="spiffe://cluster.local/ns/d/sa/a",
        zone="z1",
        meshed=True,
        pod="d/a-1",
    )
    route = pc.Route(
        kind="http",
        name="d/r",
        rule=0,
        match=pc.RouteMatch(
            path=pc.PathMatch("PathPrefix", "/api"),
            method="GET",
            headers=(pc.ValueMatch("x-canary", "1"),),
        ),
        backends=(pc.WeightedBackend("d/a", 80, 90), pc.WeightedBackend("d/b", 80, 10)),
        filters=(
            pc.Filter(
                type="RequestHeaderModifier",
                request_header_modifier=pc.HeaderModifier(
                    set=pc.frozen_map({"x": "y"}), remove=("z",)
                ),
            ),
        ),
        timeouts=pc.RouteTimeouts(request=2.0),
        retry=pc.RouteRetry(attempts=2, codes=(503,)),
    )
    policy = pc.TrafficPolicy(
        name="d/tp",
        load_balancer=pc.LoadBalancer("ring_hash", pc.ConsistentHash(header="x-user")),
        retry=pc.RetryPolicy(
            attempts=3, per_try_timeout=0.5, retry_on=("5xx",), budget=pc.RetryBudget()
        ),
        outlier_detection=pc.OutlierDetection(success_rate=pc.SuccessRateEjection()),
        fault_injection=pc.FaultInjection(abort=pc.FaultAbort(grpc_status=14, percentage=5)),
        rate_limit=pc.RateLimit(requests_per_second=100),
    )
    svc = pc.Service(
        name="a",
        namespace="d",
        cluster_ips=("10.96.0.10",),
        ports=(pc.ServicePort(80, "http", "http", 8080, (ep,)),),
        routes=(route,),
        policy=policy,
    )
    headless = pc.Service(
        name="h",
        namespace="d",
        headless=True,
        ports=(pc.ServicePort(5432, "tcp", endpoints=(pc.Endpoint(ip="10.1.0.9", port=5432),)),),
    )
    authz = pc.AuthorizationPolicy(
        name="d/deny",
        action="DENY",
        rules=(
            pc.AuthorizationRule(
                from_=(pc.Source(not_namespaces=("d",), ip_blocks=("10.0.0.0/8",)),),
                to=(pc.Operation(methods=("POST",)),),
                when=(pc.Condition("request.headers[x]", ("1",)),),
            ),
        ),
    )
    return pc.ProxyConfig(
        version="v1",
        mesh=pc.MeshSettings(outbound_policy="REGISTRY_ONLY"),
        services=(svc, headless),
        inbound=pc.Inbound(
            peer_authentication=pc.PeerAuthentication("STRICT", (pc.PortMtls(8080, "DISABLE"),)),
            authorization=(authz,),
            services=("d/a",),
        ),
        trust_bundle=("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",),
        workload=pc.Workload(
            namespace="d", service_account="a", labels=pc.frozen_map({"app": "a"})
        ),
    )


def test_round_trip_through_json() -> None:
    c = sample()
    data = json.loads(json.dumps(c.to_dict()))
    assert pc.ProxyConfig.from_dict(data) == c
    assert data["inbound"]["authorization"][0]["rules"][0]["from"][0]["not_namespaces"] == ["d"]


def test_built_objects_are_frozen() -> None:
    c = sample()
    with pytest.raises(AttributeError):
        c.version = "v2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.services[0].ports[0].endpoints[0].labels["app"] = "b"  # type: ignore[index]


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    data = sample().to_dict()
    cur: Any = data
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ["services", 0, "ports", 0, "endpoints", 0, "port"],
            0,
            "services[0].ports[0].endpoints[0].port: 0 is not a port",
        ),
        (
            ["services", 0, "ports", 0, "endpoints", 0, "ip"],
            "10.1.0",
            "services[0].ports[0].endpoints[0].ip: '10.1.0' is not an IP address",
        ),
        (
            ["services", 0, "ports", 0, "protocol"],
            "udp",
            "services[0].ports[0].protocol: 'udp' is not one of",
        ),
        (
            ["services", 0, "routes", 0, "match", "path", "value"],
            "api",
            "services[0].routes[0].match.path.value: path 'api' must start with '/'",
        ),
        (
            ["services", 0, "routes", 0, "backends", 0, "weight"],
            -1,
            "services[0].routes[0].backends[0].weight",
        ),
        (
            ["services", 0, "routes", 0, "match", "headers", 0, "type"],
            "Prefix",
            "services[0].routes[0].match.headers[0].type",
        ),
        (
            ["mesh", "outbound_policy"],
            "DENY_ALL",
            "mesh.outbound_policy: 'DENY_ALL' is not one of ALLOW_ANY, REGISTRY_ONLY",
        ),
        (["inbound", "peer_authentication", "mode"], "strict", "inbound.peer_authentication.mode"),
        (
            ["inbound", "authorization", 0, "rules", 0, "from", 0, "ip_blocks", 0],
            "10.0.0.0/33",
            "ip_blocks[0]: '10.0.0.0/33' is not an IP or CIDR",
        ),
        (
            ["services", 0, "policy", "fault_injection", "abort", "http_status"],
            503,
            "set exactly one of http_status and grpc_status",
        ),
        (
            ["services", 0, "ports", 0, "port"],
            "80",
            "services[0].ports[0].port: expected an integer, got str",
        ),
        (["services", 0, "headless"], "yes", "services[0].headless: expected a boolean"),
        (["services", 0, "cluster_ips"], "10.96.0.10", "services[0].cluster_ips: expected a list"),
        (["trust_bundle", 0], "not a pem", "trust_bundle[0]: not a PEM certificate"),
        (["version"], "", "version: must not be empty"),
        (["schema"], 99, "schema: unsupported 99"),
    ],
)
def test_invalid_fields_are_named(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(pc.ConfigError) as e:
        pc.ProxyConfig.from_dict(mutate(path, value))
    assert message in str(e.value)


def test_unknown_and_missing_fields() -> None:
    data = sample().to_dict()
    data["services"][0]["colour"] = "blue"
    with pytest.raises(pc.ConfigError, match=r"services\[0\]: unknown field\(s\) colour"):
        pc.ProxyConfig.from_dict(data)
    data = sample().to_dict()
    del data["services"][1]["name"]
    with pytest.raises(pc.ConfigError, match=r"services\[1\].name: required"):
        pc.ProxyConfig.from_dict(data)
    with pytest.raises(pc.ConfigError, match="config: expected an object"):
        pc.ProxyConfig.from_dict([1, 2])
    data = sample().to_dict()
    data["services"].append(data["services"][0])
    with pytest.raises(pc.ConfigError, match="d/a appears twice"):
        pc.ProxyConfig.from_dict(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["version", "mesh", "services", "inbound", "trust_bundle", "workload", "schema"]
        ),
        min_size=1,
        max_size=3,
    ),
    json_values,
)
def test_garbage_gives_config_error_only(keys: list[str], value: Any) -> None:
    """Whatever the controller (or an attacker) sends, decoding fails cleanly."""
    data = sample().to_dict()
    for k in keys:
        data[k] = value
    with contextlib.suppress(pc.ConfigError):
        pc.ProxyConfig.from_dict(data)


# --- the registry ------------------------------------------------------------------


def test_registry_resolves_cluster_ips_pods_and_unknown() -> None:
    reg = Registry(sample())
    hit = reg.resolve("10.96.0.10", 80)
    assert isinstance(hit, ToService) and hit.service.key == "d/a"
    assert isinstance(reg.resolve("::ffff:10.96.0.10", 80), ToService)  # dual-stack socket view
    pod = reg.resolve("10.1.0.9", 5432)  # a headless service's Pod
    assert isinstance(pod, ToEndpoint) and pod.service.key == "d/h"
    # Unknown under REGISTRY_ONLY: refused, with a reason for the log line.
    refused = reg.resolve("192.0.2.1", 80)
    assert isinstance(refused, Refuse) and "REGISTRY_ONLY" in refused.reason
    assert isinstance(reg.resolve("10.96.0.10", 81), Refuse)  # known IP, unknown port
    allow_any = Registry(pc.ProxyConfig(version="x", services=sample().services))
    assert isinstance(allow_any.resolve("192.0.2.1", 80), Passthrough)
    assert reg.service_by_host("a.d.svc.cluster.local") is not None
    assert reg.service_by_host("A.d.") is reg.service("d/a")


def test_registry_round_robin_over_ready_endpoints_only() -> None:
    eps = tuple(pc.Endpoint(ip=f"10.1.0.{i}", port=80, ready=i != 2) for i in range(1, 5))
    cfg = pc.ProxyConfig(
        version="x",
        services=(pc.Service("s", "d", ("10.96.0.1",), (pc.ServicePort(80, endpoints=eps),)),),
    )
    reg = Registry(cfg)
    picks = [reg.pick("d/s", 80).ip for _ in range(6)]  # type: ignore[union-attr]
    assert picks == ["10.1.0.1", "10.1.0.3", "10.1.0.4"] * 2
    assert reg.pick("d/s", 81) is None and reg.pick("d/none", 80) is None
