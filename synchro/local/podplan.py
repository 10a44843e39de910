"""What running a Pod spec on this machine means (pure: no processes, no files).

`plan_pod(pod, context)` turns a (usually injected) Pod into ordered steps the
way the kubelet would run them: init containers one after another (a native
sidecar, `restartPolicy: Always`, keeps running), then the app containers in
order. Each step carries its argv (`command` + `args` with `$(VAR)` expanded),
environment (literal values and the downward API), uid/gid, lifecycle hooks,
probes and volume mounts (the local directory standing in for each volume, and
its mountPath: the runtime mounts it there in the container's own mount
namespace, see `mountns`). Images are ignored: the local runtime runs commands
only.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy import ports
from synchro.local.mountns import Mount
from webhook.annotations import quantity_value

INIT = "init"
SIDECAR = "sidecar"
APP = "app"


class PodSpecError(ValueError):
    """The Pod cannot run locally as written; the message names the field."""


@dataclass(frozen=True)
class PodContext:
    """What the kubelet and the API server would know about the running Pod."""

    name: str
    namespace: str
    ip: str
    node_name: str = "local"
    host_ip: str = ""
    ips: tuple[str, ...] = ()
    uid: str = ""
    # volume name -> local directory standing in for it
    volumes: Mapping[str, str] = field(default_factory=dict)
    # The node's allocatable resources ("cpu", "memory", ... as quantities): what
    # the downward API gives for a limit the container does not set.
    allocatable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    kind: str  # httpGet | tcpSocket | exec
    port: int  # 0 for exec
    path: str = "/"
    host: str | None = None
    timeout: float = 1.0
    period: float = 1.0
    failure_threshold: int = 3
    initial_delay: float = 0.0
    # exec: the command, run in the Pod with the container's environment and ids.
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    uid: int | None = None
    gid: int | None = None
    mounts: tuple[Mount, ...] = ()
    cwd: str | None = None


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # init | sidecar | app
    argv: tuple[str, ...]
    env: Mapping[str, str]
    uid: int | None
    gid: int | None
    cwd: str | None = None
    post_start: tuple[str, ...] | None = None
    pre_stop: tuple[str, ...] | None = None
    startup_probe: Probe | None = None
    readiness_probe: Probe | None = None
    liveness_probe: Probe | None = None
    mounts: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class PodPlan:
    name: str
    namespace: str
    steps: tuple[Step, ...]
    termination_grace_seconds: float = 30.0

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are replaced, unknown
    references stay as written, `$$` is a literal `$`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR.sub(sub, text)


_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def _field_ref(path: str, pod: Mapping[str, Any], ctx: PodContext, where: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": ctx.name,
        "metadata.namespace": ctx.namespace,
        "metadata.uid": ctx.uid,
        "spec.nodeName": ctx.node_name,
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": ctx.ip,
        "status.podIPs": ",".join(ctx.ips or (ctx.ip,)),
        "status.hostIP": ctx.host_ip,
        "status.hostIPs": ctx.host_ip,
    }
    if path in simple:
        return str(simple[path])
    m = _LABEL_REF.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise PodSpecError(f"{where}: fieldRef {path!r} is not supported locally")


def _resource_ref(
    ref: Any, container: Mapping[str, Any], pod: Mapping[str, Any], ctx: PodContext, where: str
) -> str:
    """The downward API's `resourceFieldRef`: a container's request or limit in
    units of `divisor`, rounded up; an unset limit is the node's allocatable, an
    unset request the limit (Kubernetes defaulting) or 0."""
    here = f"{where}.valueFrom.resourceFieldRef"
    if not isinstance(ref, Mapping):
        raise PodSpecError(f"{here}: expected an object")
    kind, _, resource = str(ref.get("resource", "")).partition(".")
    if kind not in ("limits", "requests") or not resource:
        raise PodSpecError(
            f"{here}.resource: {ref.get('resource')!r} is not limits.<name> or requests.<name>"
        )
    name = ref.get("containerName") or container.get("name")
    target = next(
        (
            c
            for key in ("containers", "initContainers")
            for c in (pod.get("spec") or {}).get(key) or []
            if isinstance(c, Mapping) and c.get("name") == name
        ),
        None,
    )
    if target is None:
        raise PodSpecError(f"{here}.containerName: no container {name!r} in the Pod")
    resources = target.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if kind == "limits":
        text = limits.get(resource, ctx.allocatable.get(resource))
    else:
        text = requests.get(resource, limits.get(resource, "0"))
    if text is None:
        raise PodSpecError(f"{here}: {resource} has no limit and no node allocatable locally")
    divisor = ref.get("divisor", "1")
    try:
        amount, unit = quantity_value(str(text)), quantity_value(str(divisor))
    except ValueError as exc:
        raise PodSpecError(f"{here}: {exc} is not a quantity") from None
    if unit <= 0:
        raise PodSpecError(f"{here}.divisor: must be positive")
    return str(math.ceil(amount / unit))


def _env(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    ctx: PodContext,
    where: str,
) -> dict[str, str]:
    env: dict[str, str] = {}
    for i, item in enumerate(container.get("env") or []):
        here = f"{where}.env[{i}]"
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str) or not name:
            raise PodSpecError(f"{here}.name: expected a non-empty string")
        if "valueFrom" in item:
            source = item["valueFrom"] or {}
            if "fieldRef" in source:
                value = _field_ref(str(source["fieldRef"].get("fieldPath")), pod, ctx, here)
            elif "resourceFieldRef" in source:
                value = _resource_ref(source["resourceFieldRef"], container, pod, ctx, here)
            else:
                kinds = ", ".join(sorted(source)) or "nothing"
                raise PodSpecError(f"{here}.valueFrom: {kinds} is not supported locally")
        else:
            value = expand(str(item.get("value", "")), env)
        env[name] = value
    return env


def _mounts(container: Mapping[str, Any], ctx: PodContext, where: str) -> tuple[Mount, ...]:
    """The container's volumeMounts: each local directory (or a file in it, with
    subPath) and the path the container sees it at."""
    out: dict[str, Mount] = {}
    for i, mount in enumerate(container.get("volumeMounts") or []):
        volume = mount.get("name")
        path = mount.get("mountPath")
        if volume not in ctx.volumes:
            # An unknown volume has no local stand-in: nothing is mounted for it.
            continue
        if not isinstance(path, str) or not path.startswith("/"):
            raise PodSpecError(f"{where}.volumeMounts[{i}].mountPath: expected an absolute path")
        if ".." in path.split("/") or posixpath.normpath(path) == "/":
            raise PodSpecError(f"{where}.volumeMounts[{i}].mountPath: {path!r} cannot be mounted")
        local = ctx.volumes[volume]
        sub = mount.get("subPath")
        if sub is not None and (
            not isinstance(sub, str) or sub.startswith("/") or ".." in sub.split("/")
        ):
            raise PodSpecError(f"{where}.volumeMounts[{i}].subPath: expected a relative path")
        source = f"{local}/{sub}" if sub else local
        path = posixpath.normpath(path)
        out[path] = Mount(path, source, read_only=bool(mount.get("readOnly")))
    return tuple(out.values())


def _argv(container: Mapping[str, Any], env: Mapping[str, str], where: str) -> tuple[str, ...]:
    command = container.get("command") or []
    args = container.get("args") or []
    if not command:
        raise PodSpecError(
            f"{where}.command: the local runtime runs commands, not images; "
            "give the container a command"
        )
    for key, value in (("command", command), ("args", args)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PodSpecError(f"{where}.{key}: expected a list of strings")
    return tuple(expand(part, env) for part in (*command, *args))


def _hook(
    container: Mapping[str, Any], which: str, env: Mapping[str, str]
) -> tuple[str, ...] | None:
    hook = (container.get("lifecycle") or {}).get(which) or {}
    command = (hook.get("exec") or {}).get("command")
    if not command:
        return None
    return tuple(expand(str(part), env) for part in command)


def _probe(
    container: Mapping[str, Any],
    key: str,
    env: Mapping[str, str],
    ids: tuple[int | None, int | None],
    mounts: tuple[Mount, ...],
    cwd: str | None,
) -> Probe | None:
    probe = container.get(key)
    if not isinstance(probe, Mapping):
        return None
    timeout = float(probe.get("timeoutSeconds", 1))
    period = float(probe.get("periodSeconds", 10))
    threshold = int(probe.get("failureThreshold", 3))
    delay = float(probe.get("initialDelaySeconds", 0))
    action = probe.get("exec")
    if isinstance(action, Mapping):
        command = action.get("command")
        if not isinstance(command, list) or not command:
            return None
        # Like the kubelet: no shell; $(VAR) from the container's literal `value`s
        # only (ExpandContainerCommandOnlyStatic); run with the container's mounts.
        static = {
            str(item.get("name")): env[str(item.get("name"))]
            for item in container.get("env") or []
            if isinstance(item, Mapping) and "valueFrom" not in item and item.get("name") in env
        }
        argv = tuple(expand(str(part), static) for part in command)
        return Probe(
            "exec",
            0,
            timeout=timeout,
            period=period,
            failure_threshold=threshold,
            initial_delay=delay,
            command=argv,
            env=env,
            uid=ids[0],
            gid=ids[1],
            mounts=mounts,
            cwd=cwd,
        )
    for kind in ("httpGet", "tcpSocket"):
        action = probe.get(kind)
        if isinstance(action, Mapping):
            port = _port(action.get("port"), container)
            if port is None:
                return None
            return Probe(
                kind=kind,
                port=port,
                path=str(action.get("path", "/")),
                host=action.get("host"),
                timeout=timeout,
                period=period,
                failure_threshold=threshold,
                initial_delay=delay,
            )
    return None  # grpc probes are not run locally (an injected Pod's go through its proxy)


def _port(port: Any, container: Mapping[str, Any]) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for declared in container.get("ports") or []:
            if declared.get("name") == port:
                return _port(declared.get("containerPort"), container)
    return None


def _ids(
    container: Mapping[str, Any], pod_security: Mapping[str, Any], *, proxy: bool
) -> tuple[int | None, int | None]:
    sc = container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_security.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_security.get("runAsGroup"))
    if proxy:
        # The init rules exempt exactly this uid/gid: the proxy must run as them.
        uid = ports.PROXY_UID if uid is None else uid
        gid = ports.PROXY_GID if gid is None else gid
    return uid, gid


def _step(
    container: Mapping[str, Any],
    kind: str,
    pod: Mapping[str, Any],
    ctx: PodContext,
    where: str,
    overrides: Mapping[str, str],
) -> Step:
    name = container.get("name")
    if not isinstance(name, str) or not name:
        raise PodSpecError(f"{where}.name: expected a non-empty string")
    mounts = _mounts(container, ctx, where)
    env = {**_env(container, pod, ctx, where), **overrides}
    spec = pod.get("spec") or {}
    uid, gid = _ids(
        container, spec.get("securityContext") or {}, proxy=name == ports.PROXY_CONTAINER_NAME
    )
    working_dir = container.get("workingDir")
    cwd = working_dir if isinstance(working_dir, str) and working_dir else None

    def probe(key: str) -> Probe | None:
        return _probe(container, key, env, (uid, gid), mounts, cwd)

    return Step(
        name=name,
        kind=kind,
        argv=_argv(container, env, where),
        env=env,
        uid=uid,
        gid=gid,
        cwd=cwd,
        post_start=_hook(container, "postStart", env),
        pre_stop=_hook(container, "preStop", env),
        startup_probe=probe("startupProbe"),
        readiness_probe=probe("readinessProbe"),
        liveness_probe=probe("livenessProbe"),
        mounts=mounts,
    )


def plan_pod(
    pod: Mapping[str, Any],
    ctx: PodContext,
    env_overrides: Mapping[str, Mapping[str, str]] | None = None,
) -> PodPlan:
    """The steps that run `pod`, in the kubelet's order.

    `env_overrides` maps a container name to variables that replace or add to
    its environment (e.g. the local controller's address for the proxy).
    """
    if not isinstance(pod, Mapping):
        raise PodSpecError("pod: expected a Pod object")
    spec = pod.get("spec")
    if not isinstance(spec, Mapping) or not spec.get("containers"):
        raise PodSpecError("spec.containers: expected a non-empty list")
    overrides = env_overrides or {}
    steps: list[Step] = []
    sections: Sequence[tuple[str, str]] = (("initContainers", INIT), ("containers", APP))
    for key, kind in sections:
        for i, container in enumerate(spec.get(key) or []):
            if not isinstance(container, Mapping):
                raise PodSpecError(f"spec.{key}[{i}]: expected an object")
            this_kind = (
                SIDECAR if kind == INIT and container.get("restartPolicy") == "Always" else kind
            )
            steps.append(
                _step(
                    container,
                    this_kind,
                    pod,
                    ctx,
                    f"spec.{key}[{i}]",
                    overrides.get(str(container.get("name")), {}),
                )
            )
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise PodSpecError("spec: container names must be unique")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    return PodPlan(
        name=ctx.name,
        namespace=ctx.namespace,
        steps=tuple(steps),
        termination_grace_seconds=float(grace) if isinstance(grace, int | float) else 30.0,
    )
