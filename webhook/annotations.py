"""Every `synchro.dev/` annotation, in one table.

The table is the single source of truth: the injector parses and validates Pod
annotations with it, and the README's annotation reference is rendered from it
(`python -m webhook.annotations`). Data and pure functions only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from proxy import ports

PREFIX = "synchro.dev/"
STATUS = PREFIX + "status"
INJECT = PREFIX + "inject"

ALL = "*"

MAX_PORT = 65535


class AnnotationError(ValueError):
    """A value that does not parse; carries the accepted form for the message."""

    def __init__(self, annotation: str, value: str, accepted: str) -> None:
        self.annotation = annotation
        self.value = value
        self.accepted = accepted
        super().__init__(f"{annotation}: {value!r} is not valid; expected {accepted}")


# --- parsers: str -> canonical value, ValueError on bad input -------------------


def parse_enabled(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("enabled", "disabled"):
        raise ValueError(text)
    return value == "enabled"


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise ValueError(text)
    return value == "true"


# Kubernetes resource.Quantity: a decimal number and an optional binary-SI,
# decimal-SI or exponent suffix (k8s.io/apimachinery/pkg/api/resource).
_QUANTITY = re.compile(
    r"^\+?(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def quantity_value(text: str) -> Decimal:
    """`"100m"` -> Decimal("0.100"); raises ValueError when not a quantity."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(text)
    number = Decimal(match["num"])
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number.scaleb(_DECIMAL[suffix])
    return number.scaleb(int(suffix[1:]))


def parse_quantity(text: str) -> str:
    quantity_value(text)
    return text.strip()


def parse_ports(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= MAX_PORT:
            raise ValueError(item)
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def parse_ports_or_all(text: str) -> str | tuple[int, ...]:
    return ALL if text.strip() == ALL else parse_ports(text)


def parse_cidrs(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ValueError(item) from exc
    return tuple(dict.fromkeys(out))


def parse_cidrs_or_all(text: str) -> str | tuple[str, ...]:
    return ALL if text.strip() == ALL else parse_cidrs(text)


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = text.strip()
        if not value.isdigit() or not low <= int(value) <= high:
            raise ValueError(text)
        return int(value)

    return parse


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(text)
        return value

    return parse


def parse_percent(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(text) from None
    if not 0.0 <= value <= 100.0:  # also rejects nan
        raise ValueError(text)
    return value


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


def parse_duration(text: str) -> float:
    """`"2s"`, `"500ms"`, `"1m30s"` -> seconds (> 0)."""
    value = text.strip()
    pos, total = 0, Decimal(0)
    if not value:
        raise ValueError(text)
    while pos < len(value):
        match = _DURATION_PART.match(value, pos)
        if match is None:
            raise ValueError(text)
        try:
            total += Decimal(match[1]) * _DURATION_UNITS[match[2]]
        except InvalidOperation:
            raise ValueError(text) from None
        pos = match.end()
    if total <= 0:
        raise ValueError(text)
    return float(total)


RETRY_CONDITIONS = (
    "connect-failure",
    "reset",
    "refused-stream",
    "5xx",
    "gateway-error",
    "retriable-4xx",
    "cancelled",
    "deadline-exceeded",
    "unavailable",
    "resource-exhausted",
    "internal",
)


def parse_retry_on(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in (p.strip().lower() for p in text.split(",")):
        if not item:
            continue
        is_status = len(item) == 3 and item.isdigit() and 100 <= int(item) <= 599
        if item not in RETRY_CONDITIONS and not is_status:
            raise ValueError(item)
        out.append(item)
    if not out:
        raise ValueError(text)
    return tuple(dict.fromkeys(out))


_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:@]{0,511}$")


def parse_image(text: str) -> str:
    value = text.strip()
    if not _IMAGE.match(value):
        raise ValueError(text)
    return value


LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_FORMATS = ("off", "json", "text")
LOAD_BALANCERS = ("ewma", "round_robin", "least_request", "random")


# --- the table ------------------------------------------------------------------


@dataclass(frozen=True)
class Annotation:
    """One `synchro.dev/<name>` annotation.

    `config` names the InjectorConfig field that supplies the default when the
    Pod does not set the annotation; `env` the proxy environment variable that
    carries the effective value (rendered with `render`).
    """

    name: str
    type: str
    default: str
    accepted: str
    doc: str
    parse: Callable[[str], Any]
    env: str | None = None
    config: str | None = None

    @property
    def key(self) -> str:
        return PREFIX + self.name

    def value(self, text: str) -> Any:
        """Parse one Pod annotation value; AnnotationError names key, value and form."""
        try:
            return self.parse(text)
        except ValueError:
            raise AnnotationError(self.key, text, self.accepted) from None


_PORTS_FORM = "comma-separated ports 1-65535, e.g. 8080,9090"
_CIDRS_FORM = "comma-separated CIDRs, e.g. 10.0.0.0/8,fd00::/8"
_QUANTITY_FORM = "a Kubernetes quantity, e.g. {}"

ANNOTATIONS: tuple[Annotation, ...] = (
    Annotation(
        "inject", "enabled|disabled", "namespace label",
        "enabled or disabled",
        "Inject this Pod (also as a Pod label). The Pod's choice wins over the "
        "namespace label `synchro.dev/inject=enabled`.",
        parse_enabled,
    ),
    Annotation(
        "proxy-image", "image", "from `synchro-config`",
        "a container image reference, e.g. registry.example/synchro:0.1.0",
        "Image of the proxy sidecar and the init container.",
        parse_image, config="image",
    ),
    Annotation(
        "proxy-cpu-request", "quantity", "from `synchro-config` (`100m`)",
        _QUANTITY_FORM.format("100m or 0.5"),
        "CPU request of the proxy.", parse_quantity, config="cpu_request",
    ),
    Annotation(
        "proxy-cpu-limit", "quantity", "from `synchro-config` (`1`)",
        _QUANTITY_FORM.format("500m or 2"),
        "CPU limit of the proxy.", parse_quantity, config="cpu_limit",
    ),
    Annotation(
        "proxy-memory-request", "quantity", "from `synchro-config` (`64Mi`)",
        _QUANTITY_FORM.format("64Mi or 1Gi"),
        "Memory request of the proxy.", parse_quantity, config="memory_request",
    ),
    Annotation(
        "proxy-memory-limit", "quantity", "from `synchro-config` (`256Mi`)",
        _QUANTITY_FORM.format("256Mi or 1Gi"),
        "Memory limit of the proxy.", parse_quantity, config="memory_limit",
    ),
    Annotation(
        "proxy-log-level", "enum", "from `synchro-config` (`info`)",
        "one of " + ", ".join(LOG_LEVELS),
        "Log level of the proxy.", _one_of(*LOG_LEVELS),
        env="SYNCHRO_LOG_LEVEL", config="log_level",
    ),
    Annotation(
        "proxy-concurrency", "integer", "from `synchro-config` (`1`)",
        "an integer from 1 to 64",
        "Worker event loops of the proxy.", _int_in(1, 64),
        env="SYNCHRO_CONCURRENCY", config="concurrency",
    ),
    Annotation(
        "native-sidecar", "bool", "from `synchro-config` (`true`)",
        "true or false",
        "Run the proxy as a Kubernetes >= 1.29 native sidecar (an init container "
        "with `restartPolicy: Always`); `false` makes it the first app container.",
        parse_bool, config="native_sidecar",
    ),
    Annotation(
        "hold-app-until-proxy-ready", "bool", "from `synchro-config` (`true`)",
        "true or false",
        "Without native sidecars: a postStart hook on the proxy holds the app "
        "containers until the proxy is ready.",
        parse_bool, config="hold_app_until_proxy_ready",
    ),
    Annotation(
        "rewrite-probes", "bool", "from `synchro-config` (`true`)",
        "true or false",
        "Send the kubelet's httpGet/tcpSocket/grpc probes through the proxy's "
        "status port (`:15020/app-health/<container>/<probe>`).",
        parse_bool, config="rewrite_probes",
    ),
    Annotation(
        "exclude-inbound-ports", "ports", "none",
        _PORTS_FORM,
        f"Inbound ports not redirected to the proxy ({ports.STATUS_PORT} always is excluded).",
        parse_ports,
    ),
    Annotation(
        "include-inbound-ports", "ports or `*`", "`*`",
        _PORTS_FORM + ", or *",
        "Inbound ports redirected to the proxy; `*` means all.",
        parse_ports_or_all,
    ),
    Annotation(
        "exclude-outbound-ports", "ports", "none",
        _PORTS_FORM,
        "Outbound destination ports not redirected to the proxy.",
        parse_ports,
    ),
    Annotation(
        "exclude-outbound-ip-ranges", "CIDRs", "none",
        _CIDRS_FORM,
        "Outbound destinations not redirected to the proxy.",
        parse_cidrs,
    ),
    Annotation(
        "include-outbound-ip-ranges", "CIDRs or `*`", "`*`",
        _CIDRS_FORM + ", or *",
        "Outbound destinations redirected to the proxy; `*` means all.",
        parse_cidrs_or_all,
    ),
    Annotation(
        "opaque-ports", "ports", "none",
        _PORTS_FORM,
        "Ports whose traffic is proxied as opaque TCP, without protocol detection.",
        parse_ports, env="SYNCHRO_OPAQUE_PORTS",
    ),
    Annotation(
        "access-log", "enum", "from `synchro-config` (`off`)",
        "one of " + ", ".join(ACCESS_LOG_FORMATS),
        "Access log of the proxy on stdout.", _one_of(*ACCESS_LOG_FORMATS),
        env="SYNCHRO_ACCESS_LOG", config="access_log",
    ),
    Annotation(
        "trace-sampling", "percent", "from `synchro-config` (`1`)",
        "a number from 0 to 100",
        "Percentage of requests that start a trace.", parse_percent,
        env="SYNCHRO_TRACE_SAMPLING", config="trace_sampling",
    ),
    Annotation(
        "drain-seconds", "integer", "from `synchro-config` (`5`)",
        "an integer from 0 to 3600",
        "On shutdown the proxy keeps serving open connections this long (preStop drain).",
        _int_in(0, 3600), env="SYNCHRO_DRAIN_SECONDS", config="drain_seconds",
    ),
    Annotation(
        "timeout", "duration", "none",
        "a duration, e.g. 2s, 500ms or 1m30s",
        "Default request timeout of this workload's outbound calls.",
        parse_duration, env="SYNCHRO_TIMEOUT",
    ),
    Annotation(
        "retries", "integer", "none",
        "an integer from 0 to 10",
        "Default retry attempts of this workload's outbound calls.",
        _int_in(0, 10), env="SYNCHRO_RETRIES",
    ),
    Annotation(
        "retry-on", "conditions", "none",
        "comma-separated conditions (" + ", ".join(RETRY_CONDITIONS) + ") or 3-digit status codes",
        "When to retry this workload's outbound calls.",
        parse_retry_on, env="SYNCHRO_RETRY_ON",
    ),
    Annotation(
        "load-balancer", "enum", "none",
        "one of " + ", ".join(LOAD_BALANCERS),
        "Default load balancer of this workload's outbound calls.",
        _one_of(*LOAD_BALANCERS), env="SYNCHRO_LOAD_BALANCER",
    ),
)  # fmt: skip

BY_KEY: Mapping[str, Annotation] = {a.key: a for a in ANNOTATIONS}
BY_NAME: Mapping[str, Annotation] = {a.name: a for a in ANNOTATIONS}

# Written by the injector, not set by users; known so they raise no warning.
RESERVED = frozenset({STATUS})


def render(value: Any) -> str:
    """A parsed value as the proxy reads it from its environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, tuple):
        return ",".join(render(v) for v in value)
    return str(value)


def parse_all(annotations: Mapping[str, str]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Parse every known `synchro.dev/` annotation of a Pod.

    Returns ({name: value} for the ones present, unknown `synchro.dev/` keys);
    raises AnnotationError on the first malformed value.
    """
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for key, text in annotations.items():
        if not key.startswith(PREFIX) or key in RESERVED:
            continue
        spec = BY_KEY.get(key)
        if spec is None:
            unknown.append(key)
            continue
        if not isinstance(text, str):
            raise AnnotationError(key, repr(text), spec.accepted)
        values[spec.name] = spec.value(text)
    return values, tuple(unknown)


def markdown_table() -> str:
    """The README's annotation reference."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| annotation | type | default | accepted values | what it does | proxy env |",
        "|---|---|---|---|---|---|",
    ]
    for a in ANNOTATIONS:
        env = f"`{a.env}`" if a.env else ""
        lines.append(
            f"| `{a.key}` | {cell(a.type)} | {cell(a.default)} | {cell(a.accepted)} "
            f"| {cell(a.doc)} | {env} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
