"""The pure plan of running a Pod spec locally (synchro.local.podplan)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from proxy import ports
from proxy.init.options import InterceptOptions
from synchro.local import mountns
from synchro.local.mountns import Mount
from synchro.local.podplan import (
    APP,
    INIT,
    SIDECAR,
    PodContext,
    PodSpecError,
    Probe,
    expand,
    plan_pod,
)
from webhook.config import InjectorConfig
from webhook.inject import inject_pod

CTX = PodContext(
    name="web-1",
    namespace="demo",
    ip="10.213.0.7",
    node_name="synt-node",
    volumes={"synchro-data": "/tmp/x/data", "synchro-token": "/tmp/x/token"},
)


def manifest(**container: Any) -> dict[str, Any]:
    app = {"name": "web", "image": "example/web", "command": ["python3", "-m", "http.server"]}
    app.update(container)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web-sa", "containers": [app]},
    }


@pytest.mark.parametrize("native", [True, False])
def test_an_injected_pod_runs_init_then_proxy_then_app(native: bool) -> None:
    config = InjectorConfig(native_sidecar=native, controller_address="")
    injected = inject_pod(manifest(), "demo", config)
    plan = plan_pod(injected, CTX)
    kinds = [(s.name, s.kind) for s in plan.steps]
    proxy_kind = SIDECAR if native else APP
    assert kinds == [("synchro-init", INIT), ("synchro-proxy", proxy_kind), ("web", APP)]

    init = plan.step("synchro-init")
    assert init.argv[0] == "synchro-init"
    written = next(c for c in injected["spec"]["initContainers"] if c["name"] == "synchro-init")
    assert list(init.argv) == written["command"] + written["args"]  # exactly as written
    InterceptOptions.from_args(init.argv[1:])
    assert init.uid == 0

    proxy = plan.step("synchro-proxy")
    assert proxy.argv == ("synchro-proxy",)
    assert (proxy.uid, proxy.gid) == (ports.PROXY_UID, ports.PROXY_GID)
    assert proxy.env["POD_IP"] == "10.213.0.7"
    assert proxy.env["POD_NAME"] == "web-1" and proxy.env["POD_NAMESPACE"] == "demo"
    assert proxy.env["SERVICE_ACCOUNT"] == "web-sa"
    # Paths stay as written: the volumes are mounted there for the proxy alone.
    assert proxy.env["SYNCHRO_DATA_DIR"] == "/var/run/synchro"
    assert proxy.env["SYNCHRO_TOKEN_FILE"].startswith("/var/run/secrets/synchro/tokens/")
    assert set(proxy.mounts) == {
        Mount("/var/run/secrets/synchro/tokens", "/tmp/x/token", read_only=True),
        Mount("/var/run/synchro", "/tmp/x/data"),
    }
    assert proxy.pre_stop == ("synchro-proxy", "drain")
    if native:
        assert proxy.startup_probe == Probe(
            "httpGet", 15020, "/healthz/ready", timeout=1.0, period=1.0, failure_threshold=120
        )
    else:
        assert proxy.post_start is not None and proxy.post_start[1] == "wait-ready"

    web = plan.step("web")
    assert web.uid is None and web.gid is None  # an ordinary process


def test_the_proxy_container_gets_1337_even_without_a_security_context() -> None:
    pod = manifest()
    pod["spec"]["containers"].insert(
        0, {"name": ports.PROXY_CONTAINER_NAME, "command": ["synchro-proxy"]}
    )
    proxy = plan_pod(pod, CTX).step(ports.PROXY_CONTAINER_NAME)
    assert (proxy.uid, proxy.gid) == (1337, 1337)


def test_env_and_args_expand_like_kubernetes() -> None:
    pod = manifest(
        command=["sh", "-c"],
        args=["echo $(GREETING) $(MISSING) $$(GREETING)"],
        env=[
            {"name": "NAME", "value": "world"},
            {"name": "GREETING", "value": "hello $(NAME)"},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ],
        securityContext={"runAsUser": 1000, "runAsGroup": 1001},
        readinessProbe={"httpGet": {"path": "/ready", "port": "http"}},
        ports=[{"name": "http", "containerPort": 8000}],
    )
    web = plan_pod(pod, CTX).step("web")
    assert web.argv == ("sh", "-c", "echo hello world $(MISSING) $(GREETING)")
    assert web.env["APP"] == "web"
    assert (web.uid, web.gid) == (1000, 1001)
    assert web.readiness_probe is not None
    assert (web.readiness_probe.port, web.readiness_probe.path) == (8000, "/ready")
    assert expand("$$", {}) == "$"


@pytest.mark.parametrize(
    ("container", "field"),
    [
        ({"command": None}, "spec.containers[0].command"),
        ({"command": "python3 app.py"}, "spec.containers[0].command"),
        (
            {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            "spec.containers[0].env[0].valueFrom",
        ),
        (
            {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}]},
            "spec.containers[0].env[0]",
        ),
    ],
)
def test_what_cannot_run_locally_is_named(container: dict[str, Any], field: str) -> None:
    with pytest.raises(PodSpecError, match=re.escape(field)):
        plan_pod(manifest(**container), CTX)


def test_a_pod_without_containers_is_refused() -> None:
    with pytest.raises(PodSpecError, match=r"spec\.containers"):
        plan_pod({"metadata": {"name": "x"}, "spec": {}}, CTX)


def test_volumes_are_mounted_at_their_paths_which_stay_as_written() -> None:
    ctx = PodContext(
        name="web-1",
        namespace="demo",
        ip="10.213.0.7",
        volumes={"code": "/var/local/code", "run": "/var/local/run", "cfg": "/var/local/cfg"},
    )
    pod = manifest(
        command=["python3", "/opt/app/main.py", "--config=/etc/app/cfg.yaml"],
        env=[{"name": "CODE", "value": "/opt/app"}, {"name": "SELF", "value": "$(CODE)/x"}],
        lifecycle={"preStop": {"exec": {"command": ["/opt/app/stop.sh"]}}},
        workingDir="/opt/app",
        livenessProbe={"httpGet": {"port": 8080}, "initialDelaySeconds": 5},
        volumeMounts=[
            {"name": "code", "mountPath": "/opt/app/"},
            {"name": "run", "mountPath": "/opt"},
            {"name": "cfg", "mountPath": "/etc/app/cfg.yaml", "subPath": "app.yaml"},
            {"name": "cfg", "mountPath": "/etc/ro", "readOnly": True},
            {"name": "gone", "mountPath": "/nowhere"},  # no local stand-in: not mounted
        ],
    )
    web = plan_pod(pod, ctx).step("web")
    assert web.argv == ("python3", "/opt/app/main.py", "--config=/etc/app/cfg.yaml")
    assert web.env["SELF"] == "/opt/app/x" and web.pre_stop == ("/opt/app/stop.sh",)
    assert web.cwd == "/opt/app"
    assert web.mounts == (
        Mount("/opt/app", "/var/local/code"),
        Mount("/opt", "/var/local/run"),
        Mount("/etc/app/cfg.yaml", "/var/local/cfg/app.yaml"),
        Mount("/etc/ro", "/var/local/cfg", read_only=True),
    )
    # The kubelet's order: parents first.
    assert [m.path for m in mountns.order(web.mounts)][:2] == ["/opt", "/etc/ro"]
    assert web.liveness_probe is not None and web.liveness_probe.initial_delay == 5.0


@pytest.mark.parametrize(
    ("mount", "field"),
    [
        ({"name": "code", "mountPath": "relative"}, "mountPath"),
        ({"name": "code", "mountPath": "/"}, "mountPath"),
        ({"name": "code", "mountPath": "/a/../../b"}, "mountPath"),
        ({"name": "code", "mountPath": "/a", "subPath": "../up"}, "subPath"),
        ({"name": "code", "mountPath": "/a", "subPath": "/abs"}, "subPath"),
    ],
)
def test_bad_mounts_are_named(mount: dict[str, Any], field: str) -> None:
    ctx = PodContext(name="w", namespace="d", ip="10.0.0.1", volumes={"code": "/v"})
    with pytest.raises(PodSpecError, match=rf"volumeMounts\[0\]\.{field}"):
        plan_pod(manifest(volumeMounts=[mount]), ctx)


def test_resource_field_refs_give_requests_and_limits_in_divisor_units() -> None:
    ctx = PodContext(
        name="web-1", namespace="demo", ip="10.0.0.1", allocatable={"cpu": "8", "memory": "16Gi"}
    )

    def ref(resource: str, **extra: str) -> dict[str, Any]:
        return {"valueFrom": {"resourceFieldRef": {"resource": resource, **extra}}}

    pod = manifest(
        env=[
            {"name": "CPU_LIMIT", **ref("limits.cpu")},
            {"name": "CPU_REQUEST", **ref("requests.cpu")},
            {"name": "CPU_MILLI", **ref("requests.cpu", divisor="1m")},
            {"name": "MEM_MI", **ref("requests.memory", divisor="1Mi")},
            {"name": "MEM_LIMIT", **ref("limits.memory")},
            {"name": "SIDE_CPU", **ref("limits.cpu", containerName="side")},
            {"name": "SIDE_MEM_REQ", **ref("requests.memory", containerName="side", divisor="1Gi")},
        ],
        resources={"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "2"}},
    )
    pod["spec"]["containers"].append(
        {"name": "side", "command": ["true"], "resources": {"limits": {"memory": "1.5Gi"}}}
    )
    env = plan_pod(pod, ctx).step("web").env
    assert env["CPU_LIMIT"] == "2" and env["CPU_REQUEST"] == "1"  # 250m rounds up to 1
    assert env["CPU_MILLI"] == "250" and env["MEM_MI"] == "64"
    assert env["MEM_LIMIT"] == str(16 * 2**30)  # no limit: the node's allocatable
    assert env["SIDE_CPU"] == "8"
    assert env["SIDE_MEM_REQ"] == "2"  # no request: the limit, 1.5Gi, rounded up
    bad = manifest(env=[{"name": "X", **ref("limits.cpu", containerName="nope")}])
    with pytest.raises(PodSpecError, match="no container 'nope'"):
        plan_pod(bad, ctx)


def test_exec_probes_carry_their_command_environment_and_ids() -> None:
    ctx = PodContext(name="web-1", namespace="demo", ip="10.0.0.1", volumes={"run": "/var/x/run"})
    pod = manifest(
        env=[
            {"name": "MODE", "value": "strict"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        securityContext={"runAsUser": 1000},
        volumeMounts=[{"name": "run", "mountPath": "/run/app"}],
        readinessProbe={
            "exec": {"command": ["test", "-f", "/run/app/ready", "$(MODE)", "$(POD)"]},
            "periodSeconds": 2,
            "timeoutSeconds": 3,
        },
        startupProbe={"grpc": {"port": 9000}},
    )
    web = plan_pod(pod, ctx).step("web")
    probe = web.readiness_probe
    assert probe is not None and probe.kind == "exec"
    # The kubelet expands literal env values only; it runs with the container's volumes.
    assert probe.command == ("test", "-f", "/run/app/ready", "strict", "$(POD)")
    assert probe.mounts == (Mount("/run/app", "/var/x/run"),) == web.mounts
    assert probe.env["MODE"] == "strict" and probe.uid == 1000
    assert (probe.period, probe.timeout) == (2.0, 3.0)
    assert web.startup_probe is None  # grpc: the proxy runs it for an injected Pod
