"""The mesh's tracing settings reach the proxy through injection: `tracingEndpoint`
of `synchro-config` becomes SYNCHRO_OTLP_ENDPOINT, the Pod's
`synchro.dev/trace-sampling` (or `traceSampling`) SYNCHRO_TRACE_SAMPLING, and the
proxy's own reader (`TelemetrySettings.from_env`, what proxy/main.py uses) turns
that environment into a proxy that exports there."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.telemetry.telemetry import TelemetrySettings
from webhook.config import ConfigError, InjectorConfig
from webhook.inject import PROXY, inject_pod

COLLECTOR = "http://otel-collector.observability.svc:4318/v1/traces"


def pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-7f9c8d6b5-x2x9z", "annotations": annotations or {}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "app"}]},
    }


def proxy_env(injected: dict[str, Any]) -> dict[str, str]:
    """The sidecar's environment as the kubelet would give it (downward API resolved)."""
    spec = injected["spec"]
    (proxy,) = [c for c in spec["initContainers"] + spec["containers"] if c["name"] == PROXY]
    downward = {
        "metadata.name": injected["metadata"]["name"],
        "metadata.namespace": "shop",
        "spec.serviceAccountName": spec["serviceAccountName"],
    }
    env: dict[str, str] = {}
    for item in proxy["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = downward.get(item["valueFrom"]["fieldRef"]["fieldPath"], "")
    return env


def test_tracing_endpoint_and_pod_sampling_reach_the_proxy() -> None:
    config = InjectorConfig.from_configmap_data(
        {"tracingEndpoint": COLLECTOR, "traceSampling": "1", "controllerAddress": ""}
    )
    env = proxy_env(inject_pod(pod({"synchro.dev/trace-sampling": "25"}), "shop", config))
    assert env["SYNCHRO_OTLP_ENDPOINT"] == COLLECTOR
    assert env["SYNCHRO_TRACE_SAMPLING"] == "25"
    settings = TelemetrySettings.from_env(env)
    assert settings.otlp_endpoint == COLLECTOR and settings.endpoint_error == ""
    assert settings.trace_sampling == 25.0
    assert settings.workload == "web" and settings.namespace == "shop"
    assert settings.principal == "spiffe://cluster.local/ns/shop/sa/web"


def test_mesh_sampling_applies_without_the_annotation() -> None:
    config = InjectorConfig(tracing_endpoint=COLLECTOR, trace_sampling=2.5, controller_address="")
    settings = TelemetrySettings.from_env(proxy_env(inject_pod(pod(), "shop", config)))
    assert (settings.otlp_endpoint, settings.trace_sampling) == (COLLECTOR, 2.5)


def test_no_endpoint_no_variable_and_no_tracing() -> None:
    env = proxy_env(inject_pod(pod(), "shop", InjectorConfig(controller_address="")))
    assert "SYNCHRO_OTLP_ENDPOINT" not in env
    assert TelemetrySettings.from_env(env).otlp_endpoint == ""


def test_round_trip_keeps_the_endpoint() -> None:
    config = InjectorConfig(tracing_endpoint=COLLECTOR)
    data = config.to_configmap_data()
    assert data["tracingEndpoint"] == COLLECTOR
    assert InjectorConfig.from_configmap_data(data) == config
    assert InjectorConfig.from_configmap_data({"tracingEndpoint": ""}).tracing_endpoint == ""


@pytest.mark.parametrize(
    "value", ["collector:4318", "ftp://collector/v1/traces", "http://", "http://c:99999/x"]
)
def test_a_bad_endpoint_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"tracingEndpoint.*http"):
        InjectorConfig.from_configmap_data({"tracingEndpoint": value})
