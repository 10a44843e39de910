"""The injector's global defaults, read from ConfigMap `synchro-config`.

ConfigMap keys, directly in `data` or in one YAML document under `data["mesh.yaml"]`
(all optional; keys this module does not know belong to other
parts of the mesh and are ignored):

| key | field | example |
|---|---|---|
| `trustDomain` | trust_domain | `cluster.local` |
| `controllerAddress` | controller_address | `synchro-controller.synchro-system.svc:15012` (empty: none) |
| `proxyImage` | image | `synchro:dev` |
| `proxyImagePullPolicy` | image_pull_policy | `IfNotPresent` |
| `proxyCPURequest`, `proxyCPULimit` | cpu_request, cpu_limit | `100m`, `1` (empty limit: none) |
| `proxyMemoryRequest`, `proxyMemoryLimit` | memory_request, memory_limit | `64Mi`, `256Mi` |
| `proxyLogLevel` | log_level | `info` |
| `proxyConcurrency` | concurrency | `1` |
| `nativeSidecar` | native_sidecar | `true` |
| `holdAppUntilProxyReady` | hold_app_until_proxy_ready | `true` |
| `rewriteProbes` | rewrite_probes | `true` |
| `accessLog` | access_log | `off` |
| `traceSampling` | trace_sampling | `1` |
| `tracingEndpoint` | tracing_endpoint | `http://otel-collector.observability.svc:4318/v1/traces` (empty: no tracing) |
| `drainSeconds` | drain_seconds | `5` |

Values are validated with the same parsers as the Pod annotations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from webhook import annotations as ann

INJECTOR_VERSION = "0.1.0"
DEFAULT_IMAGE = "synchro:dev"
TOKEN_AUDIENCE = "synchro-ca"
TOKEN_EXPIRATION_SECONDS = 12 * 3600
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


class ConfigError(ValueError):
    """A `synchro-config` value that does not parse."""


@dataclass(frozen=True)
class InjectorConfig:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "100m"
    cpu_limit: str | None = "1"
    memory_request: str = "64Mi"
    memory_limit: str | None = "256Mi"
    log_level: str = "info"
    concurrency: int = 1
    native_sidecar: bool = True
    hold_app_until_proxy_ready: bool = True
    rewrite_probes: bool = True
    access_log: str = "off"
    trace_sampling: float = 1.0
    # OTLP/HTTP traces URL, handed to every proxy as SYNCHRO_OTLP_ENDPOINT; "" is off.
    tracing_endpoint: str = ""
    drain_seconds: int = 5
    trust_domain: str = "cluster.local"
    controller_address: str = "synchro-controller.synchro-system.svc:15012"
    token_audience: str = TOKEN_AUDIENCE
    token_expiration_seconds: int = TOKEN_EXPIRATION_SECONDS
    version: str = INJECTOR_VERSION

    def __post_init__(self) -> None:
        # Validate once here so a bad default surfaces at start-up, not per Pod.
        for spec in ann.ANNOTATIONS:
            if spec.config is None:
                continue
            current = getattr(self, spec.config)
            if current is None:
                continue
            try:
                spec.parse(ann.render(current))
            except ValueError:
                raise ConfigError(
                    f"{spec.config}: {current!r} is not valid; expected {spec.accepted}"
                ) from None
        if self.image_pull_policy not in PULL_POLICIES:
            raise ConfigError(
                f"image_pull_policy: {self.image_pull_policy!r} is not valid; "
                f"expected one of {', '.join(PULL_POLICIES)}"
            )
        if self.tracing_endpoint and not _is_http_url(self.tracing_endpoint):
            raise ConfigError(
                f'tracing_endpoint: {self.tracing_endpoint!r} is not valid; expected "" (off) '
                "or an http(s) URL, e.g. http://otel-collector.observability.svc:4318/v1/traces"
            )
        if not self.trust_domain or "/" in self.trust_domain:
            raise ConfigError(
                f"trust_domain: {self.trust_domain!r} is not valid; expected a DNS-like name"
            )

    @classmethod
    def from_configmap_data(cls, data: Mapping[str, Any]) -> InjectorConfig:
        """Build from a ConfigMap's `data`; unknown keys are ignored.

        The keys may sit directly in `data` or in one YAML document under the
        key `mesh.yaml` (deploy/configmap.yaml does the latter); direct keys win.
        """
        fields: dict[str, Any] = {}
        for key, value in {**_mesh_yaml(data), **data}.items():
            target = _KEYS.get(key)
            if target is None:
                continue
            text = value if isinstance(value, str) else _yaml_scalar(value)
            fields[target] = _parse_field(key, target, text)
        try:
            return cls(**fields)
        except ConfigError as exc:
            # Name the ConfigMap key the user wrote, not the Python field.
            target, _, rest = str(exc).partition(":")
            key = next((k for k, t in _KEYS.items() if t == target), target)
            raise ConfigError(f"{key}:{rest}") from None

    def to_configmap_data(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, target in _KEYS.items():
            value = getattr(self, target)
            out[key] = "" if value is None else ann.render(value)
        return out


_KEYS: Mapping[str, str] = {
    "trustDomain": "trust_domain",
    "controllerAddress": "controller_address",
    "proxyImage": "image",
    "proxyImagePullPolicy": "image_pull_policy",
    "proxyCPURequest": "cpu_request",
    "proxyCPULimit": "cpu_limit",
    "proxyMemoryRequest": "memory_request",
    "proxyMemoryLimit": "memory_limit",
    "proxyLogLevel": "log_level",
    "proxyConcurrency": "concurrency",
    "nativeSidecar": "native_sidecar",
    "holdAppUntilProxyReady": "hold_app_until_proxy_ready",
    "rewriteProbes": "rewrite_probes",
    "accessLog": "access_log",
    "traceSampling": "trace_sampling",
    "tracingEndpoint": "tracing_endpoint",
    "drainSeconds": "drain_seconds",
}

_BY_FIELD = {a.config: a for a in ann.ANNOTATIONS if a.config is not None}
_OPTIONAL = frozenset({"cpu_limit", "memory_limit"})


MESH_YAML = "mesh.yaml"


def _is_http_url(text: str) -> bool:
    # The proxy checks the same (proxy.telemetry.tracing.parse_endpoint) but turns
    # tracing off rather than failing; the injector says so at once.
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in text


def _mesh_yaml(data: Mapping[str, Any]) -> Mapping[str, Any]:
    text = data.get(MESH_YAML)
    if text is None:
        return {}
    if not isinstance(text, str):
        raise ConfigError(f"{MESH_YAML}: expected a YAML document as a string")
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{MESH_YAML}: not YAML: {exc}") from None
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise ConfigError(f"{MESH_YAML}: expected a mapping of settings")
    return parsed


def _yaml_scalar(value: Any) -> str:
    # ConfigMap data is strings, but a hand-written YAML file may say `true` or `5`.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_field(key: str, target: str, text: str) -> Any:
    if target in _OPTIONAL and text.strip() == "":
        return None
    spec = _BY_FIELD.get(target)
    if spec is None:
        return text.strip()
    try:
        return spec.parse(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not valid; expected {spec.accepted}") from None


def load(path: Path) -> InjectorConfig:
    """Read ConfigMap `synchro-config` from `path`: a mounted directory (one file
    per key), a YAML mapping of its data, or the ConfigMap manifest itself."""
    try:
        if path.is_dir():
            # Skip the `..data` symlink farm of a mounted ConfigMap.
            data: Any = {
                p.name: p.read_text()
                for p in sorted(path.iterdir())
                if p.is_file() and not p.name.startswith(".")
            }
        else:
            data = yaml.safe_load(path.read_text()) or {}
            if isinstance(data, dict) and data.get("kind") == "ConfigMap":
                data = data.get("data") or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of ConfigMap data")
    try:
        return InjectorConfig.from_configmap_data(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
