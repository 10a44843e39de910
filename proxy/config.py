"""The proxy's configuration schema: what the control plane compiles and pushes.

Data only (no I/O): the webhook and the control plane import it. Every class is a
frozen dataclass validated when built, so a `ProxyConfig` that exists is a valid
one; `ProxyConfig.from_dict` turns JSON into one or raises `ConfigError` naming
the field (`services[3].ports[0].port: ...`), and `to_dict` gives back the same
JSON. Durations are float seconds; JSON keys are the Python field names.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

OUTBOUND_POLICIES = ("ALLOW_ANY", "REGISTRY_ONLY")
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
PROTOCOLS = ("http", "http2", "grpc", "tcp", "tls")
AUTHZ_ACTIONS = ("ALLOW", "DENY", "AUDIT")
PATH_MATCH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_MATCH_TYPES = ("Exact", "RegularExpression")
LB_TYPES = ("ewma", "round_robin", "least_request", "random", "ring_hash", "maglev")
ROUTE_KINDS = ("http", "grpc")


class ConfigError(ValueError):
    """A config that does not satisfy the schema; the message names the field."""


def _fail(msg: str) -> typing.NoReturn:
    raise ConfigError(msg)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _port(name: str, value: int, *, zero_ok: bool = False) -> None:
    lo = 0 if zero_ok else 1
    _check(lo <= value <= 65535, f"{name}: {value} is not a port ({lo}..65535)")


def _ip(name: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        _fail(f"{name}: {value!r} is not an IP address")


def _nonneg(name: str, value: float | int | None) -> None:
    if value is not None:
        _check(value >= 0, f"{name}: must be >= 0, got {value}")


def _percent(name: str, value: float | None) -> None:
    if value is not None:
        _check(0 <= value <= 100, f"{name}: must be within 0..100, got {value}")


def _regex(name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        _fail(f"{name}: invalid regular expression {value!r}: {e}")


def frozen_map(m: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """A read-only mapping for labels and header maps inside frozen dataclasses."""
    return types.MappingProxyType(dict(m or {}))


def _labels() -> Mapping[str, str]:
    return frozen_map()


# --- mesh-wide settings -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshSettings:
    trust_domain: str = "cluster.local"
    outbound_policy: str = "ALLOW_ANY"
    default_mtls_mode: str = "PERMISSIVE"

    def __post_init__(self) -> None:
        _check(bool(self.trust_domain), "trust_domain: must not be empty")
        _one_of("outbound_policy", self.outbound_policy, OUTBOUND_POLICIES)
        _one_of("default_mtls_mode", self.default_mtls_mode, MTLS_MODES)


# --- services and endpoints --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ready-or-not Pod address behind a service port."""

    ip: str
    port: int
    labels: Mapping[str, str] = field(default_factory=_labels)
    # SPIFFE ID of the Pod's ServiceAccount; "" when unknown.
    identity: str = ""
    zone: str = ""
    ready: bool = True
    # The Pod runs a synchro sidecar: outbound may (per mTLS mode) speak mTLS to it.
    meshed: bool = False
    pod: str = ""  # "<namespace>/<name>" for status and debugging; "" when not a Pod

    def __post_init__(self) -> None:
        _ip("ip", self.ip)
        _port("port", self.port)
        if self.identity:
            _check(self.identity.startswith("spiffe://"), "identity: must be a spiffe:// URI")


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    protocol: str = "tcp"
    name: str = ""
    target_port: int = 0  # 0: same as `port`; a named targetPort is resolved per endpoint
    endpoints: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        _port("port", self.port)
        _port("target_port", self.target_port, zero_ok=True)
        _one_of("protocol", self.protocol, PROTOCOLS)


# --- routes (Gateway API HTTPRoute / GRPCRoute, compiled) ---------------------


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: str
    value: str

    def __post_init__(self) -> None:
        _one_of("type", self.type, PATH_MATCH_TYPES)
        if self.type == "RegularExpression":
            _regex("value", self.value)
        else:
            _check(self.value.startswith("/"), f"value: path {self.value!r} must start with '/'")


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter match (name compared case-insensitively for headers)."""

    name: str
    value: str
    type: str = "Exact"

    def __post_init__(self) -> None:
        _check(bool(self.name), "name: must not be empty")
        _one_of("type", self.type, VALUE_MATCH_TYPES)
        if self.type == "RegularExpression":
            _regex("value", self.value)


@dataclass(frozen=True, slots=True)
class GrpcMethodMatch:
    """GRPCRoute method match; empty service/method match anything."""

    service: str = ""
    method: str = ""
    type: str = "Exact"

    def __post_init__(self) -> None:
        _one_of("type", self.type, VALUE_MATCH_TYPES)
        if self.type == "RegularExpression":
            _regex("service", self.service or ".*")
            _regex("method", self.method or ".*")


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch | None = None
    method: str | None = None
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    grpc: GrpcMethodMatch | None = None


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: Mapping[str, str] = field(default_factory=_labels)
    add: Mapping[str, str] = field(default_factory=_labels)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathModifier:
    type: str  # ReplaceFullPath | ReplacePrefixMatch
    value: str

    def __post_init__(self) -> None:
        _one_of("type", self.type, ("ReplaceFullPath", "ReplacePrefixMatch"))


@dataclass(frozen=True, slots=True)
class URLRewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class RequestRedirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302

    def __post_init__(self) -> None:
        _check(self.status_code in (301, 302, 303, 307, 308), "status_code: not a redirect code")
        if self.port is not None:
            _port("port", self.port)


@dataclass(frozen=True, slots=True)
class RequestMirror:
    service: str  # "<namespace>/<name>"
    port: int
    percent: float = 100.0

    def __post_init__(self) -> None:
        _port("port", self.port)
        _percent("percent", self.percent)


@dataclass(frozen=True, slots=True)
class Filter:
    """One Gateway API filter; exactly the field named by `type` is set."""

    type: str
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    url_rewrite: URLRewrite | None = None
    request_redirect: RequestRedirect | None = None
    request_mirror: RequestMirror | None = None

    def __post_init__(self) -> None:
        attr = _FILTER_FIELDS.get(self.type)
        _check(attr is not None, f"type: unknown filter {self.type!r}")
        _check(getattr(self, str(attr)) is not None, f"{attr}: required for a {self.type} filter")


_FILTER_FIELDS = {
    "RequestHeaderModifier": "request_header_modifier",
    "ResponseHeaderModifier": "response_header_modifier",
    "URLRewrite": "url_rewrite",
    "RequestRedirect": "request_redirect",
    "RequestMirror": "request_mirror",
}


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    service: str  # "<namespace>/<name>"
    port: int
    weight: int = 1
    filters: tuple[Filter, ...] = ()

    def __post_init__(self) -> None:
        _check("/" in self.service, f"service: {self.service!r} is not '<namespace>/<name>'")
        _port("port", self.port)
        _check(0 <= self.weight <= 1_000_000, f"weight: {self.weight} is out of 0..1000000")


@dataclass(frozen=True, slots=True)
class RouteTimeouts:
    request: float | None = None
    backend_request: float | None = None

    def __post_init__(self) -> None:
        _nonneg("request", self.request)
        _nonneg("backend_request", self.backend_request)


@dataclass(frozen=True, slots=True)
class RouteRetry:
    """HTTPRoute `retry` (Gateway API v1.2): codes, attempts, backoff."""

    attempts: int | None = None
    codes: tuple[int, ...] = ()
    backoff: float | None = None

    def __post_init__(self) -> None:
        _nonneg("attempts", self.attempts)
        _nonneg("backoff", self.backoff)


@dataclass(frozen=True, slots=True)
class Route:
    """One match of one route rule. A service's routes are in precedence order:
    the first whose `match` fits the request wins."""

    kind: str  # http | grpc
    name: str  # "<namespace>/<name>" of the HTTPRoute or GRPCRoute
    rule: int  # index of the rule inside the route
    match: RouteMatch = field(default_factory=RouteMatch)
    backends: tuple[WeightedBackend, ...] = ()
    filters: tuple[Filter, ...] = ()
    timeouts: RouteTimeouts | None = None
    retry: RouteRetry | None = None
    # Service port the parentRef named; None: every port of the service.
    port: int | None = None

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, ROUTE_KINDS)
        if self.port is not None:
            _port("port", self.port)


# --- traffic policy (synchro.dev TrafficPolicy, per service) ------------------


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    header: str | None = None
    cookie: str | None = None
    cookie_ttl: float | None = None
    source_ip: bool = False


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    type: str = "ewma"
    consistent_hash: ConsistentHash | None = None

    def __post_init__(self) -> None:
        _one_of("type", self.type, LB_TYPES)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    percent: float = 20.0
    min_retries_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        _percent("percent", self.percent)
        _nonneg("min_retries_per_second", self.min_retries_per_second)
        _check(self.window > 0, "window: must be > 0")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 0
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = ()
    budget: RetryBudget | None = None

    def __post_init__(self) -> None:
        _nonneg("attempts", self.attempts)
        _nonneg("per_try_timeout", self.per_try_timeout)


@dataclass(frozen=True, slots=True)
class Timeouts:
    request: float | None = None
    connect: float | None = None
    idle: float | None = None

    def __post_init__(self) -> None:
        _nonneg("request", self.request)
        _nonneg("connect", self.connect)
        _nonneg("idle", self.idle)


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None

    def __post_init__(self) -> None:
        for f in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            _nonneg(f, getattr(self, f))


@dataclass(frozen=True, slots=True)
class SuccessRateEjection:
    minimum_hosts: int = 5
    request_volume: int = 100
    stdev_factor: float = 1.9


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = 5
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float | None = None
    max_ejection_percent: float = 10.0
    success_rate: SuccessRateEjection | None = None

    def __post_init__(self) -> None:
        _nonneg("consecutive_5xx_errors", self.consecutive_5xx_errors)
        _nonneg("consecutive_gateway_errors", self.consecutive_gateway_errors)
        _check(self.interval > 0, "interval: must be > 0")
        _nonneg("base_ejection_time", self.base_ejection_time)
        _nonneg("max_ejection_time", self.max_ejection_time)
        _percent("max_ejection_percent", self.max_ejection_percent)


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: float
    percentage: float = 100.0

    def __post_init__(self) -> None:
        _nonneg("fixed_delay", self.fixed_delay)
        _percent("percentage", self.percentage)


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: int | None = None
    percentage: float = 100.0

    def __post_init__(self) -> None:
        _check(
            (self.http_status is None) != (self.grpc_status is None),
            "http_status: set exactly one of http_status and grpc_status",
        )
        if self.http_status is not None:
            _check(200 <= self.http_status <= 599, "http_status: must be within 200..599")
        if self.grpc_status is not None:
            _check(0 <= self.grpc_status <= 16, "grpc_status: must be within 0..16")
        _percent("percentage", self.percentage)


@dataclass(frozen=True, slots=True)
class FaultInjection:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Inbound token bucket for the workloads behind the service."""

    requests_per_second: float
    burst: int = 0  # 0: one second's worth (max(1, requests_per_second))
    per_source: bool = False

    def __post_init__(self) -> None:
        _check(self.requests_per_second > 0, "requests_per_second: must be > 0")
        _nonneg("burst", self.burst)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    name: str = ""  # "<namespace>/<name>" of the TrafficPolicy it came from
    load_balancer: LoadBalancer | None = None
    retry: RetryPolicy | None = None
    timeouts: Timeouts | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierDetection | None = None
    fault_injection: FaultInjection | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    headless: bool = False
    routes: tuple[Route, ...] = ()
    policy: TrafficPolicy | None = None

    def __post_init__(self) -> None:
        _check(bool(self.name), "name: must not be empty")
        _check(bool(self.namespace), "namespace: must not be empty")
        for i, ip in enumerate(self.cluster_ips):
            _ip(f"cluster_ips[{i}]", ip)
        seen: set[int] = set()
        for p in self.ports:
            _check(p.port not in seen, f"ports: port {p.port} appears twice")
            seen.add(p.port)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None


# --- security (PeerAuthentication, AuthorizationPolicy) -----------------------


@dataclass(frozen=True, slots=True)
class PortMtls:
    port: int
    mode: str

    def __post_init__(self) -> None:
        _port("port", self.port)
        _one_of("mode", self.mode, MTLS_MODES)


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """The effective inbound mTLS setting for this workload: the most specific
    PeerAuthentication (workload > namespace > mesh), merged over the default."""

    mode: str = "PERMISSIVE"
    port_level: tuple[PortMtls, ...] = ()
    source: str = ""  # "<namespace>/<name>" of the policy in force; "" for the default

    def __post_init__(self) -> None:
        _one_of("mode", self.mode, MTLS_MODES)

    def mode_for(self, port: int) -> str:
        for p in self.port_level:
            if p.port == port:
                return p.mode
        return self.mode


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in ("ip_blocks", "not_ip_blocks"):
            for i, block in enumerate(getattr(self, f)):
                try:
                    ipaddress.ip_network(block, strict=False)
                except ValueError:
                    _fail(f"{f}[{i}]: {block!r} is not an IP or CIDR")


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.key), "key: must not be empty")


@dataclass(frozen=True, slots=True)
class AuthorizationRule:
    from_: tuple[Source, ...] = ()
    to: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    name: str  # "<namespace>/<name>"
    action: str = "ALLOW"
    # Istio semantics: no rules with ALLOW matches nothing; a rule with no
    # from/to/when matches everything.
    rules: tuple[AuthorizationRule, ...] = ()

    def __post_init__(self) -> None:
        _one_of("action", self.action, AUTHZ_ACTIONS)


@dataclass(frozen=True, slots=True)
class Inbound:
    """What applies to this proxy's own workload."""

    peer_authentication: PeerAuthentication = field(default_factory=PeerAuthentication)
    authorization: tuple[AuthorizationPolicy, ...] = ()
    # Services whose selector picks this workload ("<namespace>/<name>"): their
    # TrafficPolicy rateLimit / faultInjection apply on the inbound side.
    services: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Workload:
    """The proxy's own workload, as the control plane sees it (no Pod name: every
    Pod of a workload gets the same config, with the same version)."""

    namespace: str = ""
    service_account: str = ""
    labels: Mapping[str, str] = field(default_factory=_labels)
    identity: str = ""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    version: str
    mesh: MeshSettings = field(default_factory=MeshSettings)
    services: tuple[Service, ...] = ()
    inbound: Inbound = field(default_factory=Inbound)
    trust_bundle: tuple[str, ...] = ()  # PEM root certificates
    workload: Workload = field(default_factory=Workload)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check(bool(self.version), "version: must not be empty")
        _check(self.schema == SCHEMA_VERSION, f"schema: unsupported {self.schema}")
        if len({(s.namespace, s.name) for s in self.services}) != len(self.services):
            seen: set[str] = set()
            for s in self.services:
                _check(s.key not in seen, f"services: {s.key} appears twice")
                seen.add(s.key)
        for i, pem in enumerate(self.trust_bundle):
            _check(
                "-----BEGIN CERTIFICATE-----" in pem, f"trust_bundle[{i}]: not a PEM certificate"
            )

    @classmethod
    def from_dict(cls, data: Any) -> ProxyConfig:
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        assert isinstance(out, dict)
        return out


# --- generic JSON conversion --------------------------------------------------

# JSON key for a field whose Python name is a keyword workaround.
_JSON_NAMES = {"from_": "from"}


@dataclass(frozen=True, slots=True)
class _FieldPlan:
    name: str
    key: str
    hint: Any
    required: bool


_plans: dict[type, tuple[_FieldPlan, ...]] = {}


def _plan(cls: type) -> tuple[_FieldPlan, ...]:
    plan = _plans.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = tuple(
            _FieldPlan(
                f.name,
                _JSON_NAMES.get(f.name, f.name),
                hints[f.name],
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
        )
        _plans[cls] = plan
    return plan


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        if value is None:
            _check(type(None) in args, f"{path}: must not be null")
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(hint):
        return from_dict(typing.cast(type, hint), value, path)
    if origin is tuple:
        _check(isinstance(value, list), f"{path}: expected a list, got {_type_name(value)}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is Mapping or hint is Mapping:
        _check(isinstance(value, dict), f"{path}: expected an object, got {_type_name(value)}")
        for k, v in value.items():
            _check(isinstance(v, str), f"{path}.{k}: expected a string, got {_type_name(v)}")
        return frozen_map(value)
    if hint is bool:
        _check(isinstance(value, bool), f"{path}: expected a boolean, got {_type_name(value)}")
        return value
    if hint is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            f"{path}: expected an integer, got {_type_name(value)}",
        )
        return value
    if hint is float:
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            f"{path}: expected a number, got {_type_name(value)}",
        )
        return float(value)
    if hint is str:
        _check(isinstance(value, str), f"{path}: expected a string, got {_type_name(value)}")
        return value
    raise ConfigError(f"{path}: unsupported type {hint!r}")  # pragma: no cover - schema bug


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from JSON data, validating every field on the way."""
    where = path or "config"
    _check(isinstance(data, dict), f"{where}: expected an object, got {_type_name(data)}")
    plan = _plan(cls)
    known = {p.key for p in plan}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
    kwargs: dict[str, Any] = {}
    for p in plan:
        sub = f"{path}.{p.key}" if path else p.key
        if p.key not in data:
            _check(not p.required, f"{sub}: required")
            continue
        kwargs[p.name] = _convert(p.hint, data[p.key], sub)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ messages name the field relative to the object.
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def to_dict(obj: Any) -> Any:
    """JSON data for a schema object (the inverse of `from_dict`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for p in _plan(type(obj)):
            v = getattr(obj, p.name)
            out[p.key] = to_dict(v)
        return out
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return dict(obj)
    return obj


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
