"""Hypothesis-generated Pod shapes: every injected Pod is schema-valid, injection is
idempotent and exactly reversible, and the user's fields survive untouched."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import kubernetes_validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webhook.config import InjectorConfig
from webhook.inject import PROBES, Injection, inject_pod, patch, plan, uninject_pod

K8S_VERSION = "1.30"

names = st.from_regex(r"[a-z]([a-z0-9-]{0,12}[a-z0-9])?", fullmatch=True).filter(
    lambda n: not n.startswith("synchro")
)
port_names = st.from_regex(r"[a-z]{1,6}(-[a-z0-9]{1,6})?", fullmatch=True)
port_numbers = st.integers(min_value=1, max_value=65535)
timing = st.fixed_dictionaries(
    {},
    optional={
        "initialDelaySeconds": st.integers(0, 60),
        "timeoutSeconds": st.integers(1, 30),
        "periodSeconds": st.integers(1, 60),
        "failureThreshold": st.integers(1, 10),
    },
)


def probe(port_refs: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    handler = st.one_of(
        st.builds(
            lambda port, path: {"httpGet": {"port": port, **({"path": path} if path else {})}},
            port_refs,
            st.sampled_from(["", "/", "/healthz", "/a/b?c=d"]),
        ),
        st.builds(lambda port: {"tcpSocket": {"port": port}}, port_refs),
        st.builds(lambda port: {"grpc": {"port": port}}, port_numbers),
        st.just({"exec": {"command": ["cat", "/tmp/ready"]}}),
    )
    return st.builds(lambda h, t: {**h, **t}, handler, timing)


@st.composite
def container(draw: st.DrawFn, name: str) -> dict[str, Any]:
    declared = draw(
        st.lists(
            st.tuples(port_names, port_numbers),
            max_size=3,
            unique_by=(lambda p: p[0], lambda p: p[1]),
        )
    )
    out: dict[str, Any] = {"name": name, "image": draw(st.sampled_from(["nginx", "reg.io/app:1"]))}
    if declared:
        out["ports"] = [{"name": n, "containerPort": p} for n, p in declared]
    refs = st.one_of(
        port_numbers,
        st.sampled_from([n for n, _ in declared] or ["missing"]),
        st.just("nope"),
    )
    for field in PROBES:
        if draw(st.booleans()):
            out[field] = draw(probe(refs))
    if draw(st.booleans()):
        out["env"] = [{"name": "A", "value": "1"}]
    return out


annotation_values = {
    "synchro.dev/proxy-cpu-request": st.sampled_from(["50m", "100m", "0.2"]),
    "synchro.dev/proxy-memory-limit": st.sampled_from(["256Mi", "1Gi"]),
    "synchro.dev/proxy-log-level": st.sampled_from(["debug", "info"]),
    "synchro.dev/native-sidecar": st.sampled_from(["true", "false"]),
    "synchro.dev/hold-app-until-proxy-ready": st.sampled_from(["true", "false"]),
    "synchro.dev/rewrite-probes": st.sampled_from(["true", "false"]),
    "synchro.dev/exclude-inbound-ports": st.sampled_from(["", "9000", "80,443"]),
    "synchro.dev/include-inbound-ports": st.sampled_from(["*", "8080", ""]),
    "synchro.dev/exclude-outbound-ip-ranges": st.sampled_from(["10.0.0.0/8", "fd00::/8"]),
    "synchro.dev/opaque-ports": st.sampled_from(["3306", "5432,6379"]),
    "synchro.dev/timeout": st.sampled_from(["2s", "250ms"]),
    "synchro.dev/retry-on": st.sampled_from(["5xx", "reset,503"]),
    "synchro.dev/inject": st.just("enabled"),
    "synchro.dev/unknown-knob": st.just("x"),
    "prometheus.io/scrape": st.just("false"),
    "example.com/a~b": st.text(max_size=5),
}


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    container_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    spec: dict[str, Any] = {"containers": [draw(container(n)) for n in container_names]}
    if draw(st.booleans()):
        init_names = draw(
            st.lists(names.filter(lambda n: n not in container_names), max_size=2, unique=True)
        )
        spec["initContainers"] = [{"name": n, "image": "busybox"} for n in init_names]
    if draw(st.booleans()):
        spec["volumes"] = [
            {"name": n, "emptyDir": {}} for n in draw(st.lists(names, max_size=2, unique=True))
        ]
    if draw(st.booleans()):
        spec["serviceAccountName"] = draw(names)
    pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "spec": spec}
    if draw(st.booleans()):
        metadata: dict[str, Any] = {"name": draw(names)}
        if draw(st.booleans()):
            metadata["labels"] = draw(
                st.dictionaries(st.sampled_from(["app", "app.kubernetes.io/name"]), names)
            )
        if draw(st.booleans()):
            keys = draw(
                st.lists(st.sampled_from(sorted(annotation_values)), max_size=5, unique=True)
            )
            metadata["annotations"] = {k: draw(annotation_values[k]) for k in keys}
        pod["metadata"] = metadata
    return pod


CONFIGS = st.sampled_from([InjectorConfig(), InjectorConfig(native_sidecar=False, cpu_limit=None)])
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(pod=pods(), config=CONFIGS)
def test_injected_pods_validate_and_round_trip(pod: dict[str, Any], config: InjectorConfig) -> None:
    original = copy.deepcopy(pod)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    injected = inject_pod(pod, "apps", config)
    assert pod == original
    kubernetes_validate.validate(injected, K8S_VERSION, strict=True)
    assert inject_pod(injected, "apps", config) == injected
    assert uninject_pod(injected) == original


@SETTINGS
@given(pod=pods(), config=CONFIGS)
def test_patch_keeps_user_fields(pod: dict[str, Any], config: InjectorConfig) -> None:
    decision = plan(pod, "apps", config)
    assert isinstance(decision, Injection)
    ops = json.loads(json.dumps(patch(pod, decision)))
    injected = jsonpatch.apply_patch(pod, ops)
    assert injected == inject_pod(pod, "apps", config)
    after = {c["name"]: c for c in injected["spec"]["containers"]}
    for before in pod["spec"]["containers"]:
        untouched = {k: v for k, v in before.items() if k not in PROBES}
        assert {k: v for k, v in after[before["name"]].items() if k not in PROBES} == untouched
        for field in PROBES:
            assert (field in before) == (field in after[before["name"]])
    for key in ("initContainers", "volumes"):
        kept = [x for x in injected["spec"][key] if not x["name"].startswith("synchro-")]
        assert kept == pod["spec"].get(key, [])
    annotations = injected["metadata"]["annotations"]
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        assert annotations[key] == value
