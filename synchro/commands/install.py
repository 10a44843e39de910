"""`synchro install`: the control plane's manifests, for `kubectl apply -f -`.

Renders deploy/ (namespace synchro-system, CRDs, RBAC, ConfigMap
synchro-config, the controller Deployment, Service and PodDisruptionBudget,
and the MutatingWebhookConfiguration) with the `--set` values applied. Nothing
is sent to a cluster: pipe the output to kubectl, as with `linkerd install`.

Every setting is checked before anything is printed, with the same readers the
controller and the injector use, so what installs also starts.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.utils import parse_quantity

from synchro import manifests, output
from synchro.commands import CommandError

Obj = dict[str, Any]

NAMESPACE = "synchro-system"
CONTROLLER = "synchro-controller"
CONFIGMAP = "synchro-config"
WEBHOOK_CONFIG = "synchro-injector"

EPILOG_HEAD = """\
examples:
  synchro install | kubectl apply -f -
  synchro install --set image=registry.example/synchro:0.1.0 --set replicas=3 \\
      --set defaultMtlsMode=STRICT | kubectl apply -f -
  synchro install -o json > synchro.json
  synchro check --pre && synchro install | kubectl apply -f - && synchro check

settings (--set KEY=VALUE, repeatable):
"""


class SettingError(ValueError):
    """A `--set` that cannot apply; the message names the key and what it accepts."""


# --- value checks: text in, normalized text out, ValueError("expected ...") ------


def _choice(*allowed: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return check


def _int_in(lo: int, hi: int) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not re.fullmatch(r"\d+", text) or not lo <= int(text) <= hi:
            raise ValueError(f"expected an integer within {lo}..{hi}")
        return str(int(text))

    return check


def _bool(text: str) -> str:
    low = text.lower()
    if low in ("true", "false"):
        return low
    raise ValueError("expected true or false")


def _percent(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 100:
        raise ValueError("expected a percentage within 0..100, e.g. 1 or 0.5")
    return text


def _quantity(kind: str) -> Callable[[str], str]:
    example = "100m or 0.5" if kind == "cpu" else "256Mi"

    def check(text: str) -> str:
        try:
            value = parse_quantity(text)
        except ValueError:
            value = -1
        if value <= 0:
            raise ValueError(f"expected a positive Kubernetes quantity, e.g. {example}")
        return text

    return check


def _optional_quantity(kind: str) -> Callable[[str], str]:
    required = _quantity(kind)

    def check(text: str) -> str:
        return "" if text == "" else required(text)

    return check


_IMAGE = re.compile(r"^[a-z0-9]+([._/:@-][A-Za-z0-9_.-]+)*$")


def _image(text: str) -> str:
    if not _IMAGE.fullmatch(text) or len(text) > 512:
        raise ValueError("expected an image reference, e.g. registry.example/synchro:0.1.0")
    return text


_DNS_NAME = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


def _trust_domain(text: str) -> str:
    if not _DNS_NAME.fullmatch(text) or len(text) > 253:
        raise ValueError("expected a DNS-like name, e.g. cluster.local or example.org")
    return text


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. synchro-controller.synchro-system.svc:15012")
    return text


def _url_or_empty(text: str) -> str:
    if text and not re.fullmatch(r"https?://[^\s/:]+(:\d{1,5})?(/\S*)?", text):
        raise ValueError(
            'expected "" (off) or an http(s) URL, e.g. http://otel-collector.observability.svc:4318/v1/traces'
        )
    return text


# --- where a value goes ----------------------------------------------------------


def _find(objs: list[Obj], kind: str, name: str) -> Obj:
    for o in objs:
        if o.get("kind") == kind and o.get("metadata", {}).get("name") == name:
            return o
    raise SettingError(f"deploy/ has no {kind} {name}")  # a broken deploy/, not the user


def _controller_container(objs: list[Obj]) -> Obj:
    deployment = _find(objs, "Deployment", CONTROLLER)
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == CONTROLLER:
            container: Obj = c
            return container
    raise SettingError(f"deploy/ has no container {CONTROLLER}")


def _set_config(key: str) -> Callable[[list[Obj], str], None]:
    def apply(objs: list[Obj], value: str) -> None:
        _find(objs, "ConfigMap", CONFIGMAP).setdefault("data", {})[key] = value

    return apply


def _set_image(objs: list[Obj], value: str) -> None:
    _controller_container(objs)["image"] = value
    _set_config("proxyImage")(objs, value)


def _set_pull_policy(objs: list[Obj], value: str) -> None:
    _controller_container(objs)["imagePullPolicy"] = value
    _set_config("proxyImagePullPolicy")(objs, value)


def _set_replicas(objs: list[Obj], value: str) -> None:
    n = int(value)
    _find(objs, "Deployment", CONTROLLER)["spec"]["replicas"] = n
    # One replica less than the Deployment may be drained at once; a single
    # replica must not block node drains forever.
    _find(objs, "PodDisruptionBudget", CONTROLLER)["spec"]["minAvailable"] = min(1, n - 1)


def _set_log_level(objs: list[Obj], value: str) -> None:
    c = _controller_container(objs)
    args = [a for a in c.get("args", []) if not a.startswith("--log-level")]
    c["args"] = [*args, f"--log-level={value}"]


def _set_controller_resource(section: str, name: str) -> Callable[[list[Obj], str], None]:
    def apply(objs: list[Obj], value: str) -> None:
        res = _controller_container(objs).setdefault("resources", {}).setdefault(section, {})
        if value == "":
            res.pop(name, None)
        else:
            res[name] = value

    return apply


def _set_failure_policy(objs: list[Obj], value: str) -> None:
    for hook in _find(objs, "MutatingWebhookConfiguration", WEBHOOK_CONFIG)["webhooks"]:
        hook["failurePolicy"] = value


@dataclass(frozen=True)
class Setting:
    key: str
    help: str
    check: Callable[[str], str]
    apply: Callable[[list[Obj], str], None]


def _config_setting(key: str, help: str, check: Callable[[str], str]) -> Setting:
    return Setting(key, help, check, _set_config(key))


SETTINGS: tuple[Setting, ...] = (
    Setting("image", "controller and proxy image", _image, _set_image),
    Setting(
        "imagePullPolicy",
        "pull policy of both images",
        _choice("Always", "IfNotPresent", "Never"),
        _set_pull_policy,
    ),
    Setting("replicas", "controller replicas", _int_in(1, 100), _set_replicas),
    Setting(
        "logLevel",
        "controller log level",
        _choice("debug", "info", "warning", "error"),
        _set_log_level,
    ),
    Setting(
        "controllerCPURequest",
        "controller CPU request",
        _quantity("cpu"),
        _set_controller_resource("requests", "cpu"),
    ),
    Setting(
        "controllerCPULimit",
        'controller CPU limit ("" for none)',
        _optional_quantity("cpu"),
        _set_controller_resource("limits", "cpu"),
    ),
    Setting(
        "controllerMemoryRequest",
        "controller memory request",
        _quantity("memory"),
        _set_controller_resource("requests", "memory"),
    ),
    Setting(
        "controllerMemoryLimit",
        'controller memory limit ("" for none)',
        _optional_quantity("memory"),
        _set_controller_resource("limits", "memory"),
    ),
    Setting(
        "failurePolicy",
        "webhook failure policy: Fail blocks Pod creation while the controller is down",
        _choice("Fail", "Ignore"),
        _set_failure_policy,
    ),
    _config_setting("trustDomain", "SPIFFE trust domain", _trust_domain),
    _config_setting(
        "defaultMtlsMode",
        "mTLS where no PeerAuthentication applies",
        _choice("STRICT", "PERMISSIVE", "DISABLE"),
    ),
    _config_setting(
        "outboundPolicy",
        "destinations the mesh does not know",
        _choice("ALLOW_ANY", "REGISTRY_ONLY"),
    ),
    _config_setting("controllerAddress", "where proxies reach the controller", _host_port),
    _config_setting("tracingEndpoint", 'OTLP/HTTP traces URL ("" is off)', _url_or_empty),
    _config_setting("traceSampling", "percent of new traces sampled", _percent),
    _config_setting("accessLog", "proxy access log", _choice("off", "json", "text")),
    _config_setting("proxyImage", "proxy image (image sets both)", _image),
    _config_setting(
        "proxyImagePullPolicy",
        "proxy image pull policy",
        _choice("Always", "IfNotPresent", "Never"),
    ),
    _config_setting("proxyCPURequest", "proxy CPU request", _quantity("cpu")),
    _config_setting("proxyCPULimit", 'proxy CPU limit ("" for none)', _optional_quantity("cpu")),
    _config_setting("proxyMemoryRequest", "proxy memory request", _quantity("memory")),
    _config_setting(
        "proxyMemoryLimit", 'proxy memory limit ("" for none)', _optional_quantity("memory")
    ),
    _config_setting(
        "proxyLogLevel", "proxy log level", _choice("debug", "info", "warning", "error")
    ),
    _config_setting("proxyConcurrency", "proxy worker processes", _int_in(1, 64)),
    _config_setting("nativeSidecar", "proxy as a native sidecar (Kubernetes >= 1.29)", _bool),
    _config_setting(
        "holdAppUntilProxyReady", "start app containers once the proxy is ready", _bool
    ),
    _config_setting("rewriteProbes", "send kubelet probes through the proxy", _bool),
    _config_setting("drainSeconds", "proxy drain time on shutdown", _int_in(0, 3600)),
)
BY_KEY: Mapping[str, Setting] = {s.key: s for s in SETTINGS}


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings -> {key: normalized value}; the last of a repeated key wins."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingError(f"--set {item!r}: expected KEY=VALUE, e.g. --set replicas=3")
        setting = BY_KEY.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, BY_KEY, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(BY_KEY)}"
            raise SettingError(f"--set {key}: unknown setting; {hint}")
        try:
            out[key] = setting.check(value.strip())
        except ValueError as e:
            raise SettingError(f"--set {key}={value}: {e}") from None
    return out


def _limit_error(what: str, request: Any, limit: Any) -> str | None:
    if request in (None, "") or limit in (None, ""):
        return None
    if parse_quantity(str(limit)) < parse_quantity(str(request)):
        return f"{what}: the limit {limit} is below the request {request}"
    return None


def _check_limits(objs: list[Obj]) -> None:
    """Kubernetes refuses a container whose limit is below its request."""
    res = _controller_container(objs).get("resources", {})
    data = _find(objs, "ConfigMap", CONFIGMAP).get("data", {})
    pairs = [
        ("controller CPU", res.get("requests", {}).get("cpu"), res.get("limits", {}).get("cpu")),
        (
            "controller memory",
            res.get("requests", {}).get("memory"),
            res.get("limits", {}).get("memory"),
        ),
        ("proxy CPU", data.get("proxyCPURequest"), data.get("proxyCPULimit")),
        ("proxy memory", data.get("proxyMemoryRequest"), data.get("proxyMemoryLimit")),
    ]
    for what, request, limit in pairs:
        error = _limit_error(what, request, limit)
        if error:
            raise SettingError(error)


def _check_readers(objs: list[Obj]) -> None:
    """The ConfigMap as the injector and the control plane will read it."""
    from controlplane import resources
    from webhook.config import ConfigError, InjectorConfig, load

    cm = _find(objs, "ConfigMap", CONFIGMAP)
    data = cm.get("data", {})
    try:
        InjectorConfig.from_configmap_data(data)
        # The Deployment mounts the ConfigMap as files: read it that way too.
        with tempfile.TemporaryDirectory() as d:
            for k, v in data.items():
                (Path(d) / k).write_text(v)
            load(Path(d))
    except ConfigError as e:
        raise SettingError(f"synchro-config: {e}") from None
    try:
        resources.parse(cm)
    except resources.ResourceError as e:
        raise SettingError(f"synchro-config: {e}") from None


def render(settings: Mapping[str, str] | None = None) -> list[Obj]:
    """deploy/'s objects with `settings` (already checked by parse_sets) applied."""
    try:
        objs = copy.deepcopy(manifests.render())
    except manifests.ManifestsError as e:
        raise CommandError(str(e)) from None
    chosen = settings or {}
    # In table order, so that `image` (both images) comes before `proxyImage`.
    for s in SETTINGS:
        if s.key in chosen:
            s.apply(objs, chosen[s.key])
    _check_limits(objs)
    _check_readers(objs)
    return objs


def as_list(objs: Sequence[Obj]) -> Obj:
    """One JSON object for `kubectl apply -f -`."""
    return {"apiVersion": "v1", "kind": "List", "items": list(objs)}


def print_objects(objs: Sequence[Obj], fmt: str) -> None:
    if fmt == output.JSON:
        sys.stdout.write(output.to_json(as_list(objs)))
    else:
        sys.stdout.write(output.to_yaml_stream(objs))


def defaults() -> dict[str, str]:
    """The value each setting has without `--set`, read from deploy/."""
    try:
        objs = manifests.render()
    except manifests.ManifestsError:
        return {}
    out: dict[str, str] = {}
    data: dict[str, str] = next(
        (o.get("data", {}) for o in objs if o.get("kind") == "ConfigMap"), {}
    )
    for s in SETTINGS:
        if s.key in data:
            out[s.key] = data[s.key]
    try:
        c = _controller_container(objs)
        out["image"] = c["image"]
        out["imagePullPolicy"] = c.get("imagePullPolicy", "")
        out["replicas"] = str(_find(objs, "Deployment", CONTROLLER)["spec"]["replicas"])
        res = c.get("resources", {})
        for key, section, name in (
            ("controllerCPURequest", "requests", "cpu"),
            ("controllerCPULimit", "limits", "cpu"),
            ("controllerMemoryRequest", "requests", "memory"),
            ("controllerMemoryLimit", "limits", "memory"),
        ):
            out[key] = str(res.get(section, {}).get(name, ""))
        hooks = _find(objs, "MutatingWebhookConfiguration", WEBHOOK_CONFIG)["webhooks"]
        out["failurePolicy"] = hooks[0].get("failurePolicy", "Fail")
    except (SettingError, KeyError, IndexError):
        pass
    out.setdefault("logLevel", "info")
    return out


def settings_help() -> str:
    known = defaults()
    width = max(len(s.key) for s in SETTINGS)
    lines = []
    for s in SETTINGS:
        default = known.get(s.key)
        shown = f" (default: {default!r})" if default is not None else ""
        lines.append(f"  {s.key.ljust(width)}  {s.help}{shown}")
    return "\n".join(lines) + "\n"


def cmd_install(args: argparse.Namespace) -> int:
    try:
        settings = parse_sets(args.set or ())
        objs = render(settings)
    except SettingError as e:
        raise CommandError(str(e)) from None
    print_objects(objs, args.output)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "install",
        help="print the control plane's manifests for `kubectl apply -f -`",
        description=__doc__,
        epilog=EPILOG_HEAD + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change a setting (repeatable); the settings are listed below",
    )
    output.add_output_flag(p, choices=(output.YAML, output.JSON))
    p.set_defaults(func=cmd_install)
