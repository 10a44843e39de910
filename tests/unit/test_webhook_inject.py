"""The injection core on real-world Pod shapes: schema-valid, idempotent, reversible."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from proxy.init.options import InterceptOptions
from webhook import annotations as ann
from webhook.config import InjectorConfig
from webhook.inject import (
    INIT,
    PROXY,
    Injection,
    InjectionError,
    Skip,
    apply,
    inject_pod,
    patch,
    plan,
    uninject_pod,
)

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30"
NATIVE = InjectorConfig(native_sidecar=True)
CLASSIC = InjectorConfig(native_sidecar=False)
CONFIGS = pytest.mark.parametrize("config", [NATIVE, CLASSIC], ids=["native", "classic"])


def validate(pod: dict[str, Any]) -> None:
    """Raise unless `pod` validates against the Kubernetes schema (strict: no unknown fields)."""
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def as_pod(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(template)}


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bare"},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    }


def busy() -> dict[str, Any]:
    """Everything at once: init containers, volumes, labels, odd annotation keys,
    named-port probes of every kind, exec probes, a pod security context."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-",
            "namespace": "shop",
            "labels": {"app": "web", "app.kubernetes.io/name": "web"},
            "annotations": {
                "example.com/owner": "team~a",
                "weird~key/with~slash": "x",
                "synchro.dev/exclude-outbound-ports": "5432",
                "synchro.dev/opaque-ports": "3306",
                "synchro.dev/timeout": "1500ms",
            },
        },
        "spec": {
            "serviceAccountName": "web",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
            "initContainers": [
                {"name": "migrate", "image": "migrate:1", "command": ["migrate", "up"]},
            ],
            "containers": [
                {
                    "name": "web",
                    "image": "web:1",
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"name": "grpc", "containerPort": 9090},
                    ],
                    "livenessProbe": {
                        "httpGet": {
                            "path": "/live",
                            "port": "http",
                            "httpHeaders": [{"name": "X-Probe", "value": "1"}],
                        },
                        "initialDelaySeconds": 3,
                        "timeoutSeconds": 2,
                    },
                    "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
                    "startupProbe": {"grpc": {"port": 9090, "service": "health"}},
                    "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                },
                {
                    "name": "worker",
                    "image": "worker:1",
                    "livenessProbe": {"exec": {"command": ["true"]}},
                    "readinessProbe": {"httpGet": {"path": "/", "port": "nonexistent"}},
                },
            ],
            "volumes": [{"name": "cache", "emptyDir": {}}],
        },
    }


def shop_templates() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((ROOT / "examples" / "shop").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Deployment":
                out.append((doc["metadata"]["name"], as_pod(doc["spec"]["template"])))
    return out


PODS = [("minimal", minimal()), ("busy", busy()), *shop_templates()]


def by_name(containers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in containers}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def injected_proxy(pod: dict[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    return by_name(spec.get("initContainers", []) + spec["containers"])[PROXY]


# --- the three properties on real manifests ------------------------------------------


@CONFIGS
@pytest.mark.parametrize(("name", "pod"), PODS, ids=[n for n, _ in PODS])
def test_valid_idempotent_reversible(
    name: str, pod: dict[str, Any], config: InjectorConfig
) -> None:
    original = copy.deepcopy(pod)
    validate(pod)
    injected = inject_pod(pod, "shop", config)
    assert pod == original, "inject_pod must not modify its input"
    assert injected != pod
    validate(injected)
    assert inject_pod(injected, "shop", config) == injected
    assert uninject_pod(injected) == original


@CONFIGS
def test_patch_is_what_inject_pod_applies(config: InjectorConfig) -> None:
    pod = busy()
    decision = plan(pod, "shop", config)
    assert isinstance(decision, Injection)
    ops = patch(pod, decision)
    assert {op["op"] for op in ops} <= {"add", "replace"}
    # Round-trip through JSON, as the API server receives it.
    ops = json.loads(json.dumps(ops))
    assert jsonpatch.apply_patch(pod, ops) == inject_pod(pod, "shop", config)


@CONFIGS
def test_user_fields_keep_their_order(config: InjectorConfig) -> None:
    pod = busy()
    injected = inject_pod(pod, "shop", config)
    for key in ("containers", "initContainers", "volumes"):
        mine = [c["name"] for c in injected["spec"][key] if not c["name"].startswith("synchro-")]
        assert mine == [c["name"] for c in pod["spec"][key]]
    assert list(injected["spec"]) == list(pod["spec"])
    assert list(injected["metadata"]["annotations"])[: len(pod["metadata"]["annotations"])] == list(
        pod["metadata"]["annotations"]
    )


# --- what is injected ------------------------------------------------------------------


def test_native_sidecar_placement() -> None:
    injected = inject_pod(busy(), "shop", NATIVE)
    inits = injected["spec"]["initContainers"]
    assert [c["name"] for c in inits] == [INIT, PROXY, "migrate"]
    proxy = inits[1]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"] == {
        "path": "/healthz/ready",
        "port": 15020,
        "scheme": "HTTP",
    }
    assert PROXY not in by_name(injected["spec"]["containers"])
    assert "postStart" not in proxy["lifecycle"]


def test_classic_sidecar_is_first_and_holds_the_app() -> None:
    injected = inject_pod(busy(), "shop", CLASSIC)
    assert injected["spec"]["containers"][0]["name"] == PROXY
    assert [c["name"] for c in injected["spec"]["initContainers"]] == [INIT, "migrate"]
    proxy = injected["spec"]["containers"][0]
    assert "restartPolicy" not in proxy
    assert proxy["lifecycle"]["postStart"]["exec"]["command"][:2] == [PROXY, "wait-ready"]


def test_hold_can_be_turned_off_and_native_chosen_per_pod() -> None:
    pod = busy()
    pod["metadata"]["annotations"]["synchro.dev/hold-app-until-proxy-ready"] = "false"
    proxy = inject_pod(pod, "shop", CLASSIC)["spec"]["containers"][0]
    assert "postStart" not in proxy["lifecycle"]
    pod["metadata"]["annotations"]["synchro.dev/native-sidecar"] = "true"
    injected = inject_pod(pod, "shop", CLASSIC)
    assert injected["spec"]["initContainers"][1]["name"] == PROXY


@CONFIGS
def test_proxy_container_security_and_identity(config: InjectorConfig) -> None:
    proxy = injected_proxy(inject_pod(minimal(), "shop", config))
    sc = proxy["securityContext"]
    assert sc["runAsUser"] == 1337 and sc["runAsGroup"] == 1337
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    env = env_of(proxy)
    for name, path in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("NODE_NAME", "spec.nodeName"),
    ]:
        assert env[name]["fieldRef"]["fieldPath"] == path
    assert proxy["ports"] == [{"name": "synchro-status", "containerPort": 15020, "protocol": "TCP"}]
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    assert proxy["readinessProbe"]["httpGet"]["port"] == 15020
    assert proxy["lifecycle"]["preStop"]["exec"]["command"] == [PROXY, "drain"]
    mounts = by_name(proxy["volumeMounts"])
    assert mounts["synchro-token"]["mountPath"] == "/var/run/secrets/synchro/tokens"
    assert proxy["resources"] == {
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }


def test_token_volume() -> None:
    volumes = by_name(inject_pod(minimal(), "shop", NATIVE)["spec"]["volumes"])
    source = volumes["synchro-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == "synchro-ca"
    assert source["expirationSeconds"] == 12 * 3600


def test_init_container() -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {
        "synchro.dev/exclude-inbound-ports": "9000",
        "synchro.dev/exclude-outbound-ports": "5432,6379",
        "synchro.dev/exclude-outbound-ip-ranges": "169.254.169.254/32",
        "synchro.dev/include-inbound-ports": "*",
    }
    init = by_name(inject_pod(pod, "shop", NATIVE)["spec"]["initContainers"])[INIT]
    assert init["command"] == ["synchro-init"]
    options = InterceptOptions.from_args(init["args"])
    assert options.inbound_all
    assert options.exclude_inbound_ports == (15020, 9000)
    assert options.exclude_outbound_ports == (5432, 6379)
    assert options.exclude_outbound_cidrs == ("169.254.169.254/32",)
    assert options.include_outbound_cidrs == ("*",)
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True


def test_include_lists() -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {
        "synchro.dev/include-inbound-ports": "8080,8443",
        "synchro.dev/include-outbound-ip-ranges": "10.0.0.0/8",
    }
    init = by_name(inject_pod(pod, "shop", NATIVE)["spec"]["initContainers"])[INIT]
    options = InterceptOptions.from_args(init["args"])
    assert not options.inbound_all
    assert options.include_inbound_ports == (8080, 8443)
    assert options.exclude_inbound_ports == (15020,)
    assert options.include_outbound_cidrs == ("10.0.0.0/8",)


def test_tuning_annotations_reach_the_proxy_env() -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {
        "synchro.dev/proxy-log-level": "debug",
        "synchro.dev/proxy-concurrency": "2",
        "synchro.dev/opaque-ports": "3306,5432",
        "synchro.dev/access-log": "text",
        "synchro.dev/trace-sampling": "12.5",
        "synchro.dev/drain-seconds": "20",
        "synchro.dev/timeout": "500ms",
        "synchro.dev/retries": "3",
        "synchro.dev/retry-on": "5xx,reset",
        "synchro.dev/load-balancer": "round_robin",
        "synchro.dev/proxy-image": "reg.example/synchro:9",
        "synchro.dev/proxy-cpu-request": "200m",
        "synchro.dev/proxy-memory-limit": "1Gi",
    }
    injected = inject_pod(pod, "shop", NATIVE)
    proxy = injected_proxy(injected)
    env = env_of(proxy)
    assert env["SYNCHRO_LOG_LEVEL"] == "debug"
    assert env["SYNCHRO_CONCURRENCY"] == "2"
    assert env["SYNCHRO_OPAQUE_PORTS"] == "3306,5432"
    assert env["SYNCHRO_ACCESS_LOG"] == "text"
    assert env["SYNCHRO_TRACE_SAMPLING"] == "12.5"
    assert env["SYNCHRO_DRAIN_SECONDS"] == "20"
    assert env["SYNCHRO_TIMEOUT"] == "0.5"
    assert env["SYNCHRO_RETRIES"] == "3"
    assert env["SYNCHRO_RETRY_ON"] == "5xx,reset"
    assert env["SYNCHRO_LOAD_BALANCER"] == "round_robin"
    assert env["SYNCHRO_TRUST_DOMAIN"] == "cluster.local"
    assert env["SYNCHRO_CONTROLLER"] == "synchro-controller.synchro-system.svc:15012"
    assert proxy["image"] == "reg.example/synchro:9"
    assert by_name(injected["spec"]["initContainers"])[INIT]["image"] == "reg.example/synchro:9"
    assert proxy["resources"]["requests"]["cpu"] == "200m"
    assert proxy["resources"]["limits"]["memory"] == "1Gi"


def test_defaults_from_config_and_optional_env() -> None:
    config = InjectorConfig(log_level="warning", cpu_limit=None, controller_address="")
    proxy = injected_proxy(inject_pod(minimal(), "shop", config))
    env = env_of(proxy)
    assert env["SYNCHRO_LOG_LEVEL"] == "warning"
    for absent in (
        "SYNCHRO_TIMEOUT",
        "SYNCHRO_RETRIES",
        "SYNCHRO_OPAQUE_PORTS",
        "SYNCHRO_CONTROLLER",
    ):
        assert absent not in env
    assert "cpu" not in proxy["resources"]["limits"]


# --- probes ------------------------------------------------------------------------------


def test_probe_rewriting() -> None:
    injected = inject_pod(busy(), "shop", NATIVE)
    web = by_name(injected["spec"]["containers"])["web"]
    live = web["livenessProbe"]
    assert live["httpGet"] == {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"}
    assert live["initialDelaySeconds"] == 3 and live["timeoutSeconds"] == 2
    assert web["readinessProbe"]["httpGet"]["path"] == "/app-health/web/readyz"
    assert "tcpSocket" not in web["readinessProbe"]
    assert web["readinessProbe"]["periodSeconds"] == 5
    assert web["startupProbe"]["httpGet"]["path"] == "/app-health/web/startupz"
    assert "grpc" not in web["startupProbe"]
    worker = by_name(injected["spec"]["containers"])["worker"]
    original_worker = by_name(busy()["spec"]["containers"])["worker"]
    # exec probes stay with the kubelet; so does a probe whose named port does not exist
    assert worker["livenessProbe"] == original_worker["livenessProbe"]
    assert worker["readinessProbe"] == original_worker["readinessProbe"]

    probes = json.loads(env_of(injected_proxy(injected))["SYNCHRO_APP_PROBES"])
    assert probes == {
        "web": {
            "livez": {
                "httpGet": {
                    "path": "/live",
                    "port": 8080,
                    "scheme": "HTTP",
                    "httpHeaders": [{"name": "X-Probe", "value": "1"}],
                },
                "timeoutSeconds": 2,
            },
            "readyz": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
            "startupz": {"grpc": {"port": 9090, "service": "health"}, "timeoutSeconds": 1},
        }
    }


def test_probe_rewriting_can_be_turned_off() -> None:
    pod = busy()
    pod["metadata"]["annotations"]["synchro.dev/rewrite-probes"] = "false"
    injected = inject_pod(pod, "shop", NATIVE)
    assert by_name(injected["spec"]["containers"]) == by_name(pod["spec"]["containers"])
    assert env_of(injected_proxy(injected))["SYNCHRO_APP_PROBES"] == "{}"


# --- annotations and status ---------------------------------------------------------------


def test_prometheus_and_status_annotations() -> None:
    injected = inject_pod(minimal(), "shop", NATIVE)
    annotations = injected["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15020"
    assert annotations["prometheus.io/path"] == "/metrics"
    status = json.loads(annotations[ann.STATUS])
    assert status["initContainers"] == [INIT, PROXY]
    assert status["containers"] == []
    assert set(status["volumes"]) == {v["name"] for v in injected["spec"]["volumes"]}
    assert status["version"] == InjectorConfig().version


def test_pod_prometheus_annotations_win() -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {"prometheus.io/scrape": "false"}
    injected = inject_pod(pod, "shop", NATIVE)
    assert injected["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    assert "prometheus.io/port" not in injected["metadata"]["annotations"]


def test_annotation_keys_are_escaped_in_the_patch() -> None:
    pod = busy()
    decision = plan(pod, "shop", NATIVE)
    assert isinstance(decision, Injection)
    paths = [op["path"] for op in patch(pod, decision)]
    assert "/metadata/annotations/synchro.dev~1status" in paths
    assert "/metadata/annotations/prometheus.io~1scrape" in paths


@CONFIGS
def test_missing_lists_and_maps_are_created(config: InjectorConfig) -> None:
    pod = minimal()
    decision = plan(pod, "shop", config)
    assert isinstance(decision, Injection)
    paths = {op["path"] for op in patch(pod, decision)}
    assert {"/spec/initContainers", "/spec/volumes", "/metadata/annotations"} <= paths
    template = {"spec": {"containers": [{"name": "a", "image": "b"}]}}  # no metadata at all
    injected = inject_pod(template, "shop", config)
    assert ann.STATUS in injected["metadata"]["annotations"]
    assert uninject_pod(injected) == template


# --- skips ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "namespace", ["kube-system", "kube-public", "kube-node-lease", "synchro-system"]
)
def test_system_namespaces_are_skipped(namespace: str) -> None:
    assert isinstance(plan(minimal(), namespace, NATIVE), Skip)


def test_skips() -> None:
    host = minimal()
    host["spec"]["hostNetwork"] = True
    assert "hostNetwork" in skip_reason(host)

    for where in ("labels", "annotations"):
        off = minimal()
        off["metadata"][where] = {"synchro.dev/inject": "disabled"}
        assert "disabled" in skip_reason(off)

    injected = inject_pod(minimal(), "shop", NATIVE)
    assert "already injected" in skip_reason(injected)

    by_hand = minimal()
    by_hand["spec"]["containers"].append({"name": PROXY, "image": "x"})
    assert "already injected" in skip_reason(by_hand)


def test_pod_opt_in_with_label_enabled_injects() -> None:
    pod = minimal()
    pod["metadata"]["labels"] = {"synchro.dev/inject": "enabled"}
    assert isinstance(plan(pod, "default", NATIVE), Injection)


def test_disabled_pod_is_not_validated_further() -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {
        "synchro.dev/inject": "disabled",
        "synchro.dev/proxy-cpu-request": "lots",
    }
    assert isinstance(plan(pod, "shop", NATIVE), Skip)


def skip_reason(pod: dict[str, Any]) -> str:
    decision = plan(pod, "shop", NATIVE)
    assert isinstance(decision, Skip)
    return decision.reason


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "form"),
    [
        ("synchro.dev/proxy-cpu-request", "lots", "quantity"),
        ("synchro.dev/exclude-outbound-ports", "80,abc", "ports 1-65535"),
        ("synchro.dev/exclude-inbound-ports", "70000", "ports 1-65535"),
        ("synchro.dev/exclude-outbound-ip-ranges", "10.0.0.0/40", "CIDR"),
        ("synchro.dev/include-outbound-ip-ranges", "300.1.1.1/8", "CIDR"),
        ("synchro.dev/inject", "sometimes", "enabled or disabled"),
        ("synchro.dev/timeout", "fast", "duration"),
    ],
)
def test_malformed_values_are_errors_naming_everything(key: str, value: str, form: str) -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {key: value}
    with pytest.raises(InjectionError) as info:
        plan(pod, "shop", NATIVE)
    assert info.value.annotation == key
    assert info.value.value == value
    assert form in info.value.accepted
    assert key in str(info.value) and value in str(info.value)


def test_request_above_limit_is_an_error() -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {"synchro.dev/proxy-cpu-request": "2"}
    with pytest.raises(InjectionError, match="proxy-cpu-request"):
        plan(pod, "shop", NATIVE)
    pod["metadata"]["annotations"]["synchro.dev/proxy-cpu-limit"] = "4"
    assert isinstance(plan(pod, "shop", NATIVE), Injection)


def test_bad_label_value_is_an_error() -> None:
    pod = minimal()
    pod["metadata"]["labels"] = {"synchro.dev/inject": "yes"}
    with pytest.raises(InjectionError, match=r"label synchro\.dev/inject"):
        plan(pod, "shop", NATIVE)


@pytest.mark.parametrize("value", [["15s"], {"seconds": 15}, 15])
def test_an_annotation_that_is_not_a_string_is_an_error(value: object) -> None:
    """A YAML manifest (synchro inject -f, synchro up) can hold any type there."""
    pod = minimal()
    pod["metadata"]["annotations"] = {"synchro.dev/timeout": value}
    with pytest.raises(InjectionError, match=r"synchro\.dev/timeout.*expected a string"):
        plan(pod, "shop", NATIVE)


def test_unknown_annotations_are_warnings() -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {"synchro.dev/colour": "blue"}
    decision = plan(pod, "shop", NATIVE)
    assert isinstance(decision, Injection)
    assert decision.warnings == ("unknown annotation synchro.dev/colour is ignored",)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda p: p["spec"]["initContainers"].append({"name": INIT, "image": "x"}),
            "spec.initContainers",
        ),
        (
            lambda p: p["spec"]["volumes"].append({"name": "synchro-token", "emptyDir": {}}),
            "spec.volumes",
        ),
        (lambda p: p["spec"].update(containers=[]), "spec.containers"),
        (lambda p: p["spec"].update(containers="web"), "spec.containers"),
        (lambda p: p["metadata"].update(annotations={"a": 1}), "metadata.annotations"),
        (lambda p: p["metadata"].update(labels=["x"]), "metadata.labels"),
    ],
)
def test_malformed_pods_are_errors_naming_the_field(mutate: Any, field: str) -> None:
    pod = busy()
    mutate(pod)
    with pytest.raises(InjectionError) as info:
        plan(pod, "shop", NATIVE)
    assert info.value.annotation.startswith(field)


def test_uninject_rejects_a_forged_status() -> None:
    injected = inject_pod(minimal(), "shop", NATIVE)
    injected["metadata"]["annotations"][ann.STATUS] = "{not json"
    with pytest.raises(InjectionError, match=r"synchro\.dev/status"):
        uninject_pod(injected)


def test_uninject_without_status_removes_known_names() -> None:
    injected = inject_pod(minimal(), "shop", CLASSIC)
    del injected["metadata"]["annotations"][ann.STATUS]
    cleaned = uninject_pod(injected)
    names = [c["name"] for c in cleaned["spec"]["containers"] + cleaned["spec"]["initContainers"]]
    assert names == ["app"]
    assert cleaned["spec"]["volumes"] == []


def test_uninject_of_a_plain_pod_is_a_copy() -> None:
    pod = busy()
    assert uninject_pod(pod) == pod


def test_apply_leaves_input_alone() -> None:
    pod = minimal()
    before = copy.deepcopy(pod)
    apply(pod, [{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}])
    assert pod == before


def _env(pod: dict[str, Any]) -> dict[str, str]:
    (proxy,) = [
        c for c in pod["spec"]["containers"] + pod["spec"]["initContainers"] if c["name"] == PROXY
    ]
    return {e["name"]: e.get("value", "") for e in proxy["env"]}


def test_pods_sharing_annotations_get_their_own_probes_and_copies() -> None:
    # The containers built for one config and one set of annotations are reused
    # between Pods: each Pod must still get its own probes, and its own objects.
    probed = busy()
    plain = minimal()
    plain["metadata"]["annotations"] = dict(probed["metadata"]["annotations"])
    first = inject_pod(probed, "shop", NATIVE)
    second = inject_pod(plain, "shop", NATIVE)
    assert json.loads(_env(first)["SYNCHRO_APP_PROBES"])
    assert _env(second)["SYNCHRO_APP_PROBES"] == "{}"
    again = copy.deepcopy(second)
    for container in second["spec"]["initContainers"]:
        container["securityContext"]["runAsUser"] = 4242
        for key in ("env", "args"):
            if key in container:
                container[key].append("--oops")
    second["spec"]["volumes"][-1]["emptyDir"]["medium"] = "Disk"
    assert inject_pod(plain, "shop", NATIVE) == again


def test_a_bad_value_is_an_error_every_time() -> None:
    pod = minimal()
    pod["metadata"]["annotations"] = {"synchro.dev/proxy-cpu-request": "2"}
    for _ in range(2):
        with pytest.raises(InjectionError, match="proxy-cpu-request"):
            plan(pod, "shop", NATIVE)
    pod["metadata"]["annotations"] = {"synchro.dev/exclude-outbound-ports": "80,abc"}
    for _ in range(2):
        with pytest.raises(InjectionError, match="exclude-outbound-ports"):
            plan(pod, "shop", NATIVE)
