"""The injection core: a Pod in, a decision and a JSON Patch out. Pure.

`plan(pod, namespace, config)` decides (an `Injection`, a `Skip`, or raises
`InjectionError` naming the field, the value and the accepted form);
`patch(pod, injection)` turns the decision into RFC 6902 operations that only
add or replace, never drop or reorder the user's fields. `inject_pod` and
`uninject_pod` apply it (the CLI), `synchro.dev/status` makes both exact.

What the proxy container is given (the contract with `synchro-proxy`):

Command `synchro-proxy` with no arguments runs the sidecar, configured by env:

| env | value |
|---|---|
| `POD_NAME`, `POD_NAMESPACE`, `POD_IP`, `SERVICE_ACCOUNT`, `NODE_NAME` | downward API |
| `SYNCHRO_TRUST_DOMAIN` | e.g. `cluster.local`; identity is `spiffe://<td>/ns/<ns>/sa/<sa>` |
| `SYNCHRO_CONTROLLER` | `host:port` of the controller's push/CA API; absent when not configured |
| `SYNCHRO_TOKEN_FILE` | projected ServiceAccount token, audience `synchro-ca`, re-read on change |
| `SYNCHRO_DATA_DIR` | writable in-memory directory (the root filesystem is read-only) |
| `SYNCHRO_APP_PROBES` | JSON `{container: {"livez"/"readyz"/"startupz": probe}}`: each probe is the app's original kubelet probe with exactly one of `httpGet` {path, port (int), scheme, host?, httpHeaders?}, `tcpSocket` {port (int), host?} or `grpc` {port, service?}, plus `timeoutSeconds` (int, default 1); named ports are already resolved. Served at `GET :15020/app-health/<container>/<livez,readyz,startupz>` |
| `SYNCHRO_LOG_LEVEL` | debug, info, warning, error (always set) |
| `SYNCHRO_CONCURRENCY` | integer 1-64 (always set) |
| `SYNCHRO_ACCESS_LOG` | off, json, text (always set) |
| `SYNCHRO_TRACE_SAMPLING` | percent 0-100, e.g. `1` or `2.5` (always set) |
| `SYNCHRO_OTLP_ENDPOINT` | OTLP/HTTP traces URL, `tracingEndpoint` of `synchro-config` (only when set) |
| `SYNCHRO_DRAIN_SECONDS` | integer seconds (always set) |
| `SYNCHRO_OPAQUE_PORTS` | comma-separated ports (only when annotated) |
| `SYNCHRO_TIMEOUT` | seconds as a decimal number, e.g. `0.5` (only when annotated) |
| `SYNCHRO_RETRIES` | integer 0-10 (only when annotated) |
| `SYNCHRO_RETRY_ON` | comma-separated conditions and/or status codes (only when annotated) |
| `SYNCHRO_LOAD_BALANCER` | ewma, round_robin, least_request, random (only when annotated) |

Lifecycle hooks call two more subcommands: `synchro-proxy wait-ready --timeout
SECONDS` (postStart, without native sidecars: exit 0 once
`127.0.0.1:15020/healthz/ready` answers 200) and `synchro-proxy drain`
(preStop: ask the local proxy to drain, and return after SYNCHRO_DRAIN_SECONDS).
The init container runs `synchro-init` with `InterceptOptions.to_args()`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonpatch

from proxy import ports
from proxy.init.options import ALL as ALL_CIDRS
from proxy.init.options import InterceptOptions
from webhook import annotations as ann
from webhook.config import InjectorConfig

Pod = dict[str, Any]
Op = dict[str, Any]

SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "synchro-system"})

PROXY = ports.PROXY_CONTAINER_NAME
INIT = ports.INIT_CONTAINER_NAME
STATUS_PORT_NAME = "synchro-status"
TOKEN_VOLUME = "synchro-token"
DATA_VOLUME = "synchro-data"
XTABLES_VOLUME = "synchro-xtables-lock"
TOKEN_DIR = "/var/run/secrets/synchro/tokens"
TOKEN_FILE = "synchro-token"
DATA_DIR = "/var/run/synchro"
VOLUMES = (TOKEN_VOLUME, DATA_VOLUME, XTABLES_VOLUME)

PROBES = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
PROBE_HANDLERS = ("httpGet", "tcpSocket", "grpc")
PROMETHEUS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(ports.STATUS_PORT),
    "prometheus.io/path": "/metrics",
}
HOLD_TIMEOUT_SECONDS = 120


class InjectionError(ValueError):
    """The Pod cannot be injected as written; the webhook denies it.

    `annotation` is the annotation key or the Pod field at fault (e.g.
    `synchro.dev/proxy-cpu-request`, `spec.volumes[2].name`).
    """

    def __init__(self, annotation: str, value: str, accepted: str) -> None:
        self.annotation = annotation
        self.value = value
        self.accepted = accepted
        super().__init__(f"{annotation}: {value!r} is not valid; expected {accepted}")

    @property
    def message(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Skip:
    """Leave the Pod alone, for `reason`."""

    reason: str


@dataclass(frozen=True)
class ProbeRewrite:
    container_index: int
    container: str
    probe: str  # livenessProbe | readinessProbe | startupProbe
    original: Mapping[str, Any]  # as written, restored by uninject
    resolved: Mapping[str, Any]  # what the proxy runs (SYNCHRO_APP_PROBES)
    rewritten: Mapping[str, Any]  # what the kubelet now calls


@dataclass(frozen=True)
class Injection:
    native: bool
    init_container: Mapping[str, Any]
    proxy_container: Mapping[str, Any]
    volumes: tuple[Mapping[str, Any], ...]
    probes: tuple[ProbeRewrite, ...]
    annotations: tuple[tuple[str, str], ...]  # added, in order; the status one last
    warnings: tuple[str, ...] = field(default=())


# --- reading the Pod -------------------------------------------------------------


def _mapping(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InjectionError(f"{where}{key}", _short(value), "an object")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str) -> Sequence[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise InjectionError(f"{where}{key}", _short(value), "a list of objects")
    return value


def _named(obj: Mapping[str, Any], key: str, where: str) -> Sequence[Mapping[str, Any]]:
    """A list of objects that each have a string `name` (containers, volumes)."""
    items = _list(obj, key, where)
    for i, item in enumerate(items):
        if not isinstance(item.get("name"), str):
            raise InjectionError(f"{where}{key}[{i}].name", _short(item.get("name")), "a string")
    return items


def _strings(obj: Mapping[str, Any], where: str) -> Mapping[str, str]:
    for key, value in obj.items():
        if not isinstance(value, str):
            raise InjectionError(f"{where}[{key}]", _short(value), "a string")
    return obj


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class _PodView:
    metadata: Mapping[str, Any]
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    spec: Mapping[str, Any]
    containers: Sequence[Mapping[str, Any]]
    init_containers: Sequence[Mapping[str, Any]]
    volumes: Sequence[Mapping[str, Any]]


def _view(pod: Mapping[str, Any]) -> _PodView:
    if not isinstance(pod, Mapping):
        raise InjectionError("object", _short(pod), "a Pod object")
    metadata = _mapping(pod, "metadata", "")
    spec = _mapping(pod, "spec", "")
    containers = _named(spec, "containers", "spec.")
    if not containers:
        raise InjectionError("spec.containers", _short(spec.get("containers")), "a non-empty list")
    return _PodView(
        metadata=metadata,
        labels=_strings(_mapping(metadata, "labels", "metadata."), "metadata.labels"),
        annotations=_strings(
            _mapping(metadata, "annotations", "metadata."), "metadata.annotations"
        ),
        spec=spec,
        containers=containers,
        init_containers=_named(spec, "initContainers", "spec."),
        volumes=_named(spec, "volumes", "spec."),
    )


def is_injected(pod: Mapping[str, Any]) -> bool:
    return _is_injected(_view(pod))


def _is_injected(view: _PodView) -> bool:
    names = {c.get("name") for c in (*view.containers, *view.init_containers)}
    return ann.STATUS in view.annotations or PROXY in names


# --- the decision -----------------------------------------------------------------


def _inject_choice(view: _PodView) -> bool | None:
    """The Pod's own choice: annotation first, then label; None when silent."""
    if ann.INJECT in view.annotations:
        return bool(ann.BY_KEY[ann.INJECT].value(view.annotations[ann.INJECT]))
    if ann.INJECT in view.labels:
        try:
            return ann.parse_enabled(view.labels[ann.INJECT])
        except ValueError:
            raise InjectionError(
                f"label {ann.INJECT}", view.labels[ann.INJECT], "enabled or disabled"
            ) from None
    return None


def plan(pod: Mapping[str, Any], namespace: str, config: InjectorConfig) -> Injection | Skip:
    """Decide what to inject into `pod` (a Pod, or a workload's Pod template).

    The caller has already established that the namespace or Pod is selected
    (the webhook configuration's selectors do that in a cluster).
    """
    view = _view(pod)
    if namespace in SYSTEM_NAMESPACES:
        return Skip(f"namespace {namespace} is never injected")
    own = tuple((k, v) for k, v in view.annotations.items() if k.startswith(ann.PREFIX))
    try:
        if _inject_choice(view) is False:
            return Skip(f"{ann.INJECT} is disabled")
        _parse_annotations(own)
    except ann.AnnotationError as exc:
        raise InjectionError(exc.annotation, exc.value, exc.accepted) from None
    if view.spec.get("hostNetwork") is True:
        return Skip("the Pod uses hostNetwork")
    if _is_injected(view):
        return Skip("already injected")
    _check_names(view)

    static = _static(config, own)
    probes = _probe_rewrites(view) if static.settings["rewrite-probes"] else ()
    added = list(PROMETHEUS.items()) if not _has_prometheus(view) else []
    status = _status(view, pod, config, static.native, probes, [k for k, _ in added])
    return Injection(
        native=static.native,
        init_container=static.init_container,
        proxy_container=_with_probes(static.proxy_container, probes),
        volumes=static.volumes,
        probes=probes,
        annotations=(*added, (ann.STATUS, status)),
        warnings=static.warnings,
    )


@dataclass(frozen=True)
class _Static:
    """The part of an Injection that depends only on the config and the Pod's
    `synchro.dev/` annotations: the same for every replica of a workload."""

    settings: Mapping[str, Any]
    native: bool
    init_container: Mapping[str, Any]
    proxy_container: Mapping[str, Any]  # SYNCHRO_APP_PROBES is "{}"
    volumes: tuple[Mapping[str, Any], ...]
    warnings: tuple[str, ...]


# Building the containers was most of plan()'s time, yet a cluster creates Pods
# from a handful of templates. The cached values are shared between Injections
# and never mutated: patch() copies what it changes, apply() copies everything.
# Errors are raised again on every call (lru_cache keeps only returns).
@functools.lru_cache(maxsize=256)
def _parse_annotations(own: tuple[tuple[str, str], ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
    return ann.parse_all(dict(own))


@functools.lru_cache(maxsize=256)
def _static(config: InjectorConfig, own: tuple[tuple[str, str], ...]) -> _Static:
    values, unknown = _parse_annotations(own)
    settings = _settings(values, config)
    _check_resources(values, settings)
    native = bool(settings["native-sidecar"])
    return _Static(
        settings=settings,
        native=native,
        init_container=_init_container(settings, config),
        proxy_container=_proxy_container(settings, config, (), native=native),
        volumes=_volumes(config),
        warnings=tuple(f"unknown annotation {key} is ignored" for key in unknown),
    )


def _with_probes(proxy: Mapping[str, Any], probes: Sequence[ProbeRewrite]) -> dict[str, Any]:
    """The proxy container with this Pod's SYNCHRO_APP_PROBES; `proxy` is left alone."""
    if not probes:
        return dict(proxy)
    value = _app_probes_env(probes)
    env = [
        {"name": e["name"], "value": value} if e["name"] == "SYNCHRO_APP_PROBES" else e
        for e in proxy["env"]
    ]
    return {**proxy, "env": env}


def _check_names(view: _PodView) -> None:
    reserved = "a name that is not reserved by Synchro"
    for i, c in enumerate(view.init_containers):
        if c.get("name") == INIT:
            raise InjectionError(f"spec.initContainers[{i}].name", INIT, reserved)
    for i, c in enumerate(view.containers):
        if c.get("name") == INIT:
            raise InjectionError(f"spec.containers[{i}].name", INIT, reserved)
    for i, v in enumerate(view.volumes):
        if v.get("name") in VOLUMES:
            raise InjectionError(f"spec.volumes[{i}].name", str(v.get("name")), reserved)


def _settings(values: Mapping[str, Any], config: InjectorConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in ann.ANNOTATIONS:
        if spec.name in values:
            out[spec.name] = values[spec.name]
        elif spec.config is not None:
            out[spec.name] = getattr(config, spec.config)
    return out


def _check_resources(values: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    for resource in ("cpu", "memory"):
        request = settings.get(f"proxy-{resource}-request")
        limit = settings.get(f"proxy-{resource}-limit")
        if request is None or limit is None:
            continue
        if ann.quantity_value(request) > ann.quantity_value(limit):
            # Name the annotation the user wrote; if both are defaults, the config.
            name = f"proxy-{resource}-request"
            if name not in values and f"proxy-{resource}-limit" in values:
                name = f"proxy-{resource}-limit"
            value = request if name.endswith("request") else limit
            raise InjectionError(
                ann.PREFIX + name,
                value,
                f"a {resource} request no larger than the limit ({request} > {limit})",
            )


def _has_prometheus(view: _PodView) -> bool:
    return any(key in view.annotations for key in PROMETHEUS)


# --- probes -----------------------------------------------------------------------


def _probe_rewrites(view: _PodView) -> tuple[ProbeRewrite, ...]:
    out: list[ProbeRewrite] = []
    for index, container in enumerate(view.containers):
        name = container.get("name")
        if not isinstance(name, str):
            continue
        for field_name, path in PROBES.items():
            probe = container.get(field_name)
            if not isinstance(probe, Mapping):
                continue
            handlers = [h for h in PROBE_HANDLERS if h in probe]
            # Exec probes, and anything we cannot resolve, stay with the kubelet.
            if len(handlers) != 1 or "exec" in probe:
                continue
            resolved = _resolve_probe(probe, handlers[0], container)
            if resolved is None:
                continue
            rewritten = {k: v for k, v in probe.items() if k not in PROBE_HANDLERS}
            rewritten["httpGet"] = {
                "path": f"/app-health/{name}/{path}",
                "port": ports.STATUS_PORT,
                "scheme": "HTTP",
            }
            out.append(
                ProbeRewrite(index, name, field_name, _clone(dict(probe)), resolved, rewritten)
            )
    return tuple(out)


def _resolve_probe(
    probe: Mapping[str, Any], handler: str, container: Mapping[str, Any]
) -> dict[str, Any] | None:
    action = probe[handler]
    if not isinstance(action, Mapping):
        return None
    port = _resolve_port(action.get("port"), container)
    if port is None:
        return None
    resolved: dict[str, Any] = {handler: {**_clone(dict(action)), "port": port}}
    if handler == "httpGet":
        resolved[handler].setdefault("path", "/")
        resolved[handler].setdefault("scheme", "HTTP")
    timeout = probe.get("timeoutSeconds", 1)
    resolved["timeoutSeconds"] = timeout if isinstance(timeout, int) else 1
    return resolved


def _resolve_port(port: Any, container: Mapping[str, Any]) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port if 1 <= port <= ann.MAX_PORT else None
    if isinstance(port, str):
        if port.isdigit():
            return _resolve_port(int(port), container)
        declared = container.get("ports")
        for p in declared if isinstance(declared, list) else []:
            if isinstance(p, Mapping) and p.get("name") == port:
                return _resolve_port(p.get("containerPort"), container)
    return None


def _app_probes_env(probes: Sequence[ProbeRewrite]) -> str:
    out: dict[str, dict[str, Any]] = {}
    for rw in probes:
        out.setdefault(rw.container, {})[PROBES[rw.probe]] = rw.resolved
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


# --- what is injected -------------------------------------------------------------


def _downward(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _ready_probe(**timing: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/healthz/ready", "port": ports.STATUS_PORT, "scheme": "HTTP"},
        **timing,
    }


def _resources(settings: Mapping[str, Any]) -> dict[str, Any]:
    requests = {
        "cpu": settings["proxy-cpu-request"],
        "memory": settings["proxy-memory-request"],
    }
    limits = {
        k: v
        for k, v in (
            ("cpu", settings.get("proxy-cpu-limit")),
            ("memory", settings.get("proxy-memory-limit")),
        )
        if v is not None
    }
    return {"requests": requests, **({"limits": limits} if limits else {})}


def _proxy_env(
    settings: Mapping[str, Any], config: InjectorConfig, probes: Sequence[ProbeRewrite]
) -> list[dict[str, Any]]:
    env = [
        _downward("POD_NAME", "metadata.name"),
        _downward("POD_NAMESPACE", "metadata.namespace"),
        _downward("POD_IP", "status.podIP"),
        _downward("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        _downward("NODE_NAME", "spec.nodeName"),
        {"name": "SYNCHRO_TRUST_DOMAIN", "value": config.trust_domain},
    ]
    if config.controller_address:
        env.append({"name": "SYNCHRO_CONTROLLER", "value": config.controller_address})
    if config.tracing_endpoint:
        # The mesh's collector; the Pod's sampling comes with the annotations below.
        env.append({"name": "SYNCHRO_OTLP_ENDPOINT", "value": config.tracing_endpoint})
    env += [
        {"name": "SYNCHRO_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_FILE}"},
        {"name": "SYNCHRO_DATA_DIR", "value": DATA_DIR},
        {"name": "SYNCHRO_APP_PROBES", "value": _app_probes_env(probes)},
    ]
    for spec in ann.ANNOTATIONS:
        if spec.env is not None and spec.name in settings:
            env.append({"name": spec.env, "value": ann.render(settings[spec.name])})
    return env


def _proxy_container(
    settings: Mapping[str, Any],
    config: InjectorConfig,
    probes: Sequence[ProbeRewrite],
    *,
    native: bool,
) -> dict[str, Any]:
    lifecycle: dict[str, Any] = {"preStop": {"exec": {"command": [PROXY, "drain"]}}}
    if not native and settings["hold-app-until-proxy-ready"]:
        # The kubelet starts containers in order and waits for each postStart
        # hook, so a hook on the first container holds back the app.
        lifecycle["postStart"] = {
            "exec": {"command": [PROXY, "wait-ready", "--timeout", str(HOLD_TIMEOUT_SECONDS)]}
        }
    container: dict[str, Any] = {
        "name": PROXY,
        "image": settings["proxy-image"],
        "imagePullPolicy": config.image_pull_policy,
        "command": [PROXY],
        "ports": [
            {"name": STATUS_PORT_NAME, "containerPort": ports.STATUS_PORT, "protocol": "TCP"}
        ],
        "env": _proxy_env(settings, config, probes),
        "resources": _resources(settings),
        "readinessProbe": _ready_probe(periodSeconds=2, timeoutSeconds=1, failureThreshold=3),
        "lifecycle": lifecycle,
        "securityContext": {
            "runAsUser": ports.PROXY_UID,
            "runAsGroup": ports.PROXY_GID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": DATA_VOLUME, "mountPath": DATA_DIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if native:
        container["restartPolicy"] = "Always"
        container["startupProbe"] = _ready_probe(
            periodSeconds=1, timeoutSeconds=1, failureThreshold=HOLD_TIMEOUT_SECONDS
        )
    return container


def intercept_options(settings: Mapping[str, Any]) -> InterceptOptions:
    include_in = settings.get("include-inbound-ports", ann.ALL)
    include_out = settings.get("include-outbound-ip-ranges", ann.ALL)
    return InterceptOptions(
        inbound_all=include_in == ann.ALL,
        include_inbound_ports=() if include_in == ann.ALL else tuple(include_in),
        # The kubelet's probes reach the proxy's status port directly.
        exclude_inbound_ports=tuple(
            dict.fromkeys((ports.STATUS_PORT, *settings.get("exclude-inbound-ports", ())))
        ),
        exclude_outbound_ports=tuple(settings.get("exclude-outbound-ports", ())),
        include_outbound_cidrs=(ALL_CIDRS,) if include_out == ann.ALL else tuple(include_out),
        exclude_outbound_cidrs=tuple(settings.get("exclude-outbound-ip-ranges", ())),
    )


def _init_container(settings: Mapping[str, Any], config: InjectorConfig) -> dict[str, Any]:
    return {
        "name": INIT,
        "image": settings["proxy-image"],
        "imagePullPolicy": config.image_pull_policy,
        "command": [INIT],
        "args": intercept_options(settings).to_args(),
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "500m", "memory": "128Mi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        # iptables takes its lock under /run, which the read-only root cannot hold.
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _volumes(config: InjectorConfig) -> tuple[dict[str, Any], ...]:
    token = {
        "serviceAccountToken": {
            "audience": config.token_audience,
            "expirationSeconds": config.token_expiration_seconds,
            "path": TOKEN_FILE,
        }
    }
    return (
        {"name": TOKEN_VOLUME, "projected": {"sources": [token]}},
        {"name": DATA_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": XTABLES_VOLUME, "emptyDir": {}},
    )


def _status(
    view: _PodView,
    pod: Mapping[str, Any],
    config: InjectorConfig,
    native: bool,
    probes: Sequence[ProbeRewrite],
    added_annotations: Sequence[str],
) -> str:
    created = []
    if pod.get("metadata") is None:
        created.append("metadata")
    elif view.metadata.get("annotations") is None:
        created.append("metadata.annotations")
    if view.spec.get("initContainers") is None:
        created.append("spec.initContainers")
    if view.spec.get("volumes") is None:
        created.append("spec.volumes")
    originals: dict[str, dict[str, Any]] = {}
    for rw in probes:
        originals.setdefault(rw.container, {})[rw.probe] = rw.original
    status = {
        "version": config.version,
        "initContainers": [INIT, PROXY] if native else [INIT],
        "containers": [] if native else [PROXY],
        "volumes": list(VOLUMES),
        "annotations": list(added_annotations),
        "probes": originals,
        "created": created,
    }
    return json.dumps(status, sort_keys=True, separators=(",", ":"))


# --- the patch ----------------------------------------------------------------------


def escape(key: str) -> str:
    """RFC 6901: `~` -> `~0`, `/` -> `~1`."""
    return key.replace("~", "~0").replace("/", "~1")


def patch(pod: Mapping[str, Any], injection: Injection) -> list[Op]:
    """JSON Patch operations that apply `injection` to `pod`, in order."""
    view = _view(pod)
    # The values share structure with `injection` (fresh from `plan`, never
    # mutated); `apply` copies them. Deep-copying here cost two thirds of a review.
    proxy = dict(injection.proxy_container)
    init = dict(injection.init_container)
    ops: list[Op] = []
    # Replace probes by index before the proxy shifts the app containers.
    for rw in injection.probes:
        path = f"/spec/containers/{rw.container_index}/{rw.probe}"
        ops.append({"op": "replace", "path": path, "value": dict(rw.rewritten)})
    if not injection.native:
        ops.append({"op": "add", "path": "/spec/containers/0", "value": proxy})
    inits = [init, proxy] if injection.native else [init]
    if view.spec.get("initContainers") is None:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": inits})
    else:
        for i, container in enumerate(inits):
            ops.append({"op": "add", "path": f"/spec/initContainers/{i}", "value": container})
    volumes = [dict(v) for v in injection.volumes]
    if view.spec.get("volumes") is None:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    else:
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    added = dict(injection.annotations)
    if pod.get("metadata") is None:
        ops.append({"op": "add", "path": "/metadata", "value": {"annotations": added}})
    elif view.metadata.get("annotations") is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": added})
    else:
        ops += [
            {"op": "add", "path": f"/metadata/annotations/{escape(k)}", "value": v}
            for k, v in added.items()
        ]
    return ops


def apply(pod: Mapping[str, Any], ops: Sequence[Op]) -> Pod:
    """`pod` with `ops` applied; `pod` itself is left alone."""
    result: Pod = jsonpatch.apply_patch(pod, _clone(list(ops)), in_place=False)
    return result


def _clone(value: Any) -> Any:
    """A deep copy of JSON-shaped data, several times faster than copy.deepcopy."""
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def inject_pod(pod: Mapping[str, Any], namespace: str, config: InjectorConfig) -> Pod:
    """The injected Pod (an unchanged copy when the plan is to skip)."""
    decision = plan(pod, namespace, config)
    if isinstance(decision, Skip):
        return _clone(dict(pod))
    return apply(pod, patch(pod, decision))


# --- undoing it ---------------------------------------------------------------------

_LEGACY_STATUS: Mapping[str, Any] = {
    "initContainers": [INIT, PROXY],
    "containers": [PROXY],
    "volumes": list(VOLUMES),
    "annotations": [],
    "probes": {},
    "created": [],
}


def _read_status(raw: str) -> Mapping[str, Any]:
    accepted = "the JSON written by the Synchro injector"
    try:
        status = json.loads(raw)
    except ValueError:
        raise InjectionError(ann.STATUS, _short(raw), accepted) from None
    lists = ("initContainers", "containers", "volumes", "annotations", "created")
    ok = isinstance(status, dict) and all(
        isinstance(status.get(k, []), list) and all(isinstance(x, str) for x in status.get(k, []))
        for k in lists
    )
    if not ok or not isinstance(status.get("probes", {}), dict):
        raise InjectionError(ann.STATUS, _short(raw), accepted)
    return status


def uninject_pod(pod: Mapping[str, Any]) -> Pod:
    """Undo `inject_pod` exactly, from the `synchro.dev/status` annotation."""
    view = _view(pod)
    if not is_injected(pod):
        return _clone(dict(pod))
    raw = view.annotations.get(ann.STATUS)
    status = _LEGACY_STATUS if raw is None else _read_status(raw)
    out: Pod = _clone(dict(pod))
    spec = out["spec"]
    for key in ("containers", "initContainers"):
        if spec.get(key) is not None:
            drop = set(status.get(key, []))
            spec[key] = [c for c in spec[key] if c.get("name") not in drop]
    if spec.get("volumes") is not None:
        drop = set(status.get("volumes", []))
        spec["volumes"] = [v for v in spec["volumes"] if v.get("name") not in drop]
    originals = status.get("probes", {})
    for container in spec["containers"]:
        for probe, original in originals.get(container.get("name"), {}).items():
            if probe in PROBES:
                container[probe] = original
    metadata = out.get("metadata") or {}
    annotations = metadata.get("annotations")
    if annotations is not None:
        for key in (*status.get("annotations", []), ann.STATUS):
            annotations.pop(key, None)
    created = set(status.get("created", []))
    for key in ("initContainers", "volumes"):
        if f"spec.{key}" in created and spec.get(key) == []:
            del spec[key]
    if created & {"metadata", "metadata.annotations"} and annotations == {}:
        del metadata["annotations"]
    if "metadata" in created and metadata == {}:
        del out["metadata"]
    return out
