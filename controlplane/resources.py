"""Kubernetes, Gateway API and synchro.dev documents -> frozen, validated models.

`parse(doc)` turns one decoded YAML/JSON document into a model, or raises
`ResourceError` naming the field (`spec.rules[0].matches[1].path.value`).
Kinds the mesh does not read (Deployments, ServiceAccounts, ...) give `None`:
the same directory holds the workloads that `synchro up` runs. Policy bodies are
parsed straight into `proxy.config` objects, so the proxy's own validation
applies to them here too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from proxy import config as pc

GATEWAY_GROUP = "gateway.networking.k8s.io"
SYNCHRO_GROUP = "synchro.dev"
MESH_CONFIG_NAME = "synchro-config"
SYSTEM_NAMESPACE = "synchro-system"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
INJECT_STATUS_ANNOTATION = "synchro.dev/status"
PROXY_CONTAINER = "synchro-proxy"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_GRPC_CODES = {
    name: i
    for i, name in enumerate(
        [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ]
    )
}


class ResourceError(ValueError):
    """A document that is not a valid resource; `field` is a dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# --- a path-tracking reader over decoded YAML --------------------------------


class _R:
    """Reads typed fields from a dict, naming the full path in every error."""

    __slots__ = ("d", "path")

    def __init__(self, d: Mapping[str, Any], path: str) -> None:
        self.d = d
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, msg: str) -> NoReturn:
        raise ResourceError(self.at(key), msg)

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def raw(self, key: str) -> Any:
        return self.d.get(key)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self.d.get(key)
        if v is None:
            if required:
                self.fail(key, "required")
            return default
        if not isinstance(v, str):
            self.fail(key, f"expected a string, got {type(v).__name__}")
        return v

    def req(self, key: str) -> str:
        v = self.text(key, required=True)
        assert v is not None
        return v

    def integer(
        self, key: str, default: int | None = None, *, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        v = self.d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"expected an integer, got {type(v).__name__}")
        if lo is not None and v < lo:
            self.fail(key, f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            self.fail(key, f"must be <= {hi}, got {v}")
        return v

    def num(
        self,
        key: str,
        default: float | None = None,
        *,
        lo: float | None = None,
        hi: float | None = None,
    ) -> float | None:
        v = self.d.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.fail(key, f"expected a number, got {type(v).__name__}")
        if lo is not None and v < lo:
            self.fail(key, f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            self.fail(key, f"must be <= {hi}, got {v}")
        return float(v)

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {v!r}")
        return v

    def duration(self, key: str) -> float | None:
        v = self.d.get(key)
        if v is None:
            return None
        try:
            return parse_duration(v)
        except ValueError as e:
            self.fail(key, str(e))

    def enum(self, key: str, allowed: tuple[str, ...], default: str | None = None) -> str | None:
        v = self.text(key, default)
        if v is not None and v not in allowed:
            self.fail(key, f"{v!r} is not one of {', '.join(allowed)}")
        return v

    def obj(self, key: str, *, required: bool = False) -> _R | None:
        v = self.d.get(key)
        if v is None:
            if required:
                self.fail(key, "required")
            return None
        if not isinstance(v, dict):
            self.fail(key, f"expected an object, got {type(v).__name__}")
        return _R(v, self.at(key))

    def items(self, key: str) -> list[Any]:
        v = self.d.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail(key, f"expected a list, got {type(v).__name__}")
        return v

    def objs(self, key: str) -> Iterator[_R]:
        for i, item in enumerate(self.items(key)):
            sub = f"{self.at(key)}[{i}]"
            if not isinstance(item, dict):
                raise ResourceError(sub, f"expected an object, got {type(item).__name__}")
            yield _R(item, sub)

    def strs(self, key: str) -> tuple[str, ...]:
        out = []
        for i, item in enumerate(self.items(key)):
            if not isinstance(item, str):
                raise ResourceError(
                    f"{self.at(key)}[{i}]", f"expected a string, got {type(item).__name__}"
                )
            out.append(item)
        return tuple(out)

    def str_map(self, key: str) -> dict[str, str]:
        r = self.obj(key)
        if r is None:
            return {}
        out = {}
        for k, v in r.d.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                r.fail(str(k), f"expected a string, got {type(v).__name__}")
            out[str(k)] = v if isinstance(v, str) else str(v)
        return out


def parse_duration(v: Any) -> float:
    """Gateway API / Go durations ("250ms", "1h30m", "10s"); bare numbers are seconds."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a duration")
    if isinstance(v, int | float):
        if v < 0:
            raise ValueError(f"{v!r} is negative")
        return float(v)
    if not isinstance(v, str) or not v:
        raise ValueError(f"{v!r} is not a duration like 250ms, 10s or 1m30s")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(v):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(v):
        raise ValueError(f"{v!r} is not a duration like 250ms, 10s or 1m30s")
    return total


def _wrap(path: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Build a proxy.config object, turning its ConfigError into a ResourceError at `path`."""
    try:
        return fn(*args, **kwargs)
    except pc.ConfigError as e:
        text = str(e)
        sub, sep, msg = text.partition(": ")
        if sep and " " not in sub:
            raise ResourceError(f"{path}.{_camel(sub)}", msg) from None
        raise ResourceError(path, text) from None


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


# --- models ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    kind: str
    name: str
    namespace: str  # "" for cluster-scoped kinds
    labels: Mapping[str, str] = field(default_factory=pc.frozen_map)
    annotations: Mapping[str, str] = field(default_factory=pc.frozen_map)
    creation_timestamp: str = ""  # RFC 3339 as the API server writes it; "" when absent
    resource_version: str = ""
    generation: int = 0
    uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.key}"


@dataclass(frozen=True, slots=True)
class Namespace:
    meta: Meta


@dataclass(frozen=True, slots=True)
class ServicePortSpec:
    port: int
    name: str = ""
    target_port: int | str = 0  # 0: same as port; a string is a container port name
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    meta: Meta
    selector: Mapping[str, str] | None
    ports: tuple[ServicePortSpec, ...]
    cluster_ips: tuple[str, ...] = ()
    headless: bool = False
    type: str = "ClusterIP"


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    pod: str = ""  # "<namespace>/<name>" from targetRef
    zone: str = ""
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class SlicePort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    meta: Meta
    service: str  # the owning Service's name (label kubernetes.io/service-name)
    address_type: str
    endpoints: tuple[SliceEndpoint, ...]
    ports: tuple[SlicePort, ...]


@dataclass(frozen=True, slots=True)
class Pod:
    meta: Meta
    ip: str  # "" until the Pod has one
    service_account: str = "default"
    ready: bool = False
    # Container port names, for Services whose targetPort is a name.
    named_ports: Mapping[str, int] = field(default_factory=pc.frozen_map)  # type: ignore[arg-type]
    meshed: bool = False
    zone: str = ""
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The mesh-wide part of ConfigMap synchro-system/synchro-config."""

    meta: Meta | None = None
    settings: pc.MeshSettings = field(default_factory=pc.MeshSettings)


@dataclass(frozen=True, slots=True)
class ParentRef:
    name: str
    namespace: str
    group: str = ""
    kind: str = "Service"
    port: int | None = None


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    namespace: str
    port: int | None
    weight: int = 1
    group: str = ""
    kind: str = "Service"
    filters: tuple[pc.Filter, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteRule:
    matches: tuple[pc.RouteMatch, ...]
    backends: tuple[BackendRef, ...]
    filters: tuple[pc.Filter, ...] = ()
    timeouts: pc.RouteTimeouts | None = None
    retry: pc.RouteRetry | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    """An HTTPRoute (kind "http") or GRPCRoute (kind "grpc")."""

    meta: Meta
    kind: str
    parent_refs: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    meta: Meta
    target: str | None  # Service name in the policy's namespace; None: the whole namespace
    policy: pc.TrafficPolicy


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    meta: Meta
    selector: Mapping[str, str] | None
    mode: str | None  # None: UNSET, inherit
    port_level: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    meta: Meta
    selector: Mapping[str, str] | None
    policy: pc.AuthorizationPolicy


Resource = (
    Namespace
    | Service
    | EndpointSlice
    | Pod
    | MeshConfig
    | Route
    | TrafficPolicy
    | PeerAuthentication
    | AuthorizationPolicy
)


# --- parsing -----------------------------------------------------------------


def _meta(doc: _R, kind: str, namespaced: bool) -> Meta:
    m = doc.obj("metadata", required=True)
    assert m is not None
    name = m.req("name")
    if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
        m.fail("name", f"{name!r} is not a valid name (lower-case RFC 1123 subdomain)")
    ns = ""
    if namespaced:
        ns = m.text("namespace") or "default"
        if not _DNS_LABEL.match(ns) or len(ns) > 63:
            m.fail("namespace", f"{ns!r} is not a valid namespace name")
    ts = m.raw("creationTimestamp")
    return Meta(
        kind=kind,
        name=name,
        namespace=ns,
        labels=pc.frozen_map(m.str_map("labels")),
        annotations=pc.frozen_map(m.str_map("annotations")),
        creation_timestamp="" if ts is None else str(ts),
        resource_version=str(m.raw("resourceVersion") or ""),
        generation=m.integer("generation", 0) or 0,
        uid=str(m.raw("uid") or ""),
    )


def _selector(
    r: _R | None, key: str = "selector", *, match_labels: bool = True
) -> dict[str, str] | None:
    if r is None or not r.has(key):
        return None
    if match_labels:
        sel = r.obj(key)
        assert sel is not None
        if sel.has("matchExpressions"):
            sel.fail("matchExpressions", "not supported; use matchLabels")
        return sel.str_map("matchLabels")
    return r.str_map(key)


def parse_namespace(doc: _R) -> Namespace:
    return Namespace(_meta(doc, "Namespace", False))


def parse_service(doc: _R) -> Service:
    meta = _meta(doc, "Service", True)
    spec = doc.obj("spec") or _R({}, "spec")
    ports = []
    seen: set[int] = set()
    for p in spec.objs("ports"):
        port = p.integer("port", lo=1, hi=65535)
        if port is None:
            p.fail("port", "required")
        if port in seen:
            p.fail("port", f"port {port} appears twice")
        seen.add(port)
        tp = p.raw("targetPort")
        target: int | str = 0
        if isinstance(tp, int) and not isinstance(tp, bool):
            if not 1 <= tp <= 65535:
                p.fail("targetPort", f"{tp} is not a port")
            target = tp
        elif isinstance(tp, str):
            target = int(tp) if tp.isdigit() else tp
        elif tp is not None:
            p.fail("targetPort", "expected a port number or a port name")
        proto = p.enum("protocol", ("TCP", "UDP", "SCTP"), "TCP")
        ports.append(
            ServicePortSpec(
                port=port,
                name=p.text("name", "") or "",
                target_port=target,
                protocol=proto or "TCP",
                app_protocol=p.text("appProtocol", "") or "",
            )
        )
    cluster_ip = spec.text("clusterIP", "") or ""
    ips = list(spec.strs("clusterIPs")) or ([cluster_ip] if cluster_ip else [])
    headless = cluster_ip == "None" or ips == ["None"]
    ips = [] if headless else ips
    for i, ip in enumerate(ips):
        _wrap(f"spec.clusterIPs[{i}]", pc._ip, "ip", ip)
    stype = spec.enum(
        "type", ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"), "ClusterIP"
    )
    selector = spec.str_map("selector") if spec.has("selector") else None
    return Service(meta, selector, tuple(ports), tuple(ips), headless, stype or "ClusterIP")


def parse_endpoint_slice(doc: _R) -> EndpointSlice:
    meta = _meta(doc, "EndpointSlice", True)
    svc = meta.labels.get(SERVICE_NAME_LABEL, "")
    if not svc:
        raise ResourceError("metadata.labels", f"missing {SERVICE_NAME_LABEL}")
    at = doc.enum("addressType", ("IPv4", "IPv6", "FQDN"), "IPv4") or "IPv4"
    eps = []
    for e in doc.objs("endpoints"):
        addrs = e.strs("addresses")
        if at != "FQDN":
            for i, a in enumerate(addrs):
                _wrap(f"{e.at('addresses')}[{i}]", pc._ip, "ip", a)
        cond = e.obj("conditions") or _R({}, e.at("conditions"))
        # Kubernetes: a nil `ready` means ready.
        ready = cond.flag("ready", True) and not cond.flag("terminating", False)
        ref = e.obj("targetRef")
        pod = ""
        if ref is not None and ref.text("kind") == "Pod":
            pod = f"{ref.text('namespace') or meta.namespace}/{ref.text('name') or ''}"
        eps.append(
            SliceEndpoint(addrs, ready, pod, e.text("zone", "") or "", e.text("hostname", "") or "")
        )
    ports = []
    for p in doc.objs("ports"):
        port = p.integer("port", lo=1, hi=65535)
        if port is None:
            continue  # a nil port means "all ports", which a mesh cannot route
        ports.append(
            SlicePort(
                port,
                p.text("name", "") or "",
                p.text("protocol", "TCP") or "TCP",
                p.text("appProtocol", "") or "",
            )
        )
    return EndpointSlice(meta, svc, at, tuple(eps), tuple(ports))


def parse_pod(doc: _R) -> Pod:
    meta = _meta(doc, "Pod", True)
    spec = doc.obj("spec") or _R({}, "spec")
    status = doc.obj("status") or _R({}, "status")
    ip = status.text("podIP", "") or ""
    if ip:
        _wrap("status.podIP", pc._ip, "ip", ip)
    ready = False
    for c in status.objs("conditions"):
        if c.text("type") == "Ready":
            ready = c.raw("status") in ("True", True)
    named: dict[str, int] = {}
    meshed = INJECT_STATUS_ANNOTATION in meta.annotations
    for key in ("containers", "initContainers"):
        for c in spec.objs(key):
            if c.text("name") == PROXY_CONTAINER:
                meshed = True
            for p in c.objs("ports"):
                name, num = p.text("name"), p.integer("containerPort", lo=1, hi=65535)
                if name and num:
                    named.setdefault(name, num)
    phase = status.text("phase", "") or ""
    terminating = doc.raw("metadata").get("deletionTimestamp") is not None or phase in (
        "Succeeded",
        "Failed",
    )
    return Pod(
        meta=meta,
        ip=ip,
        service_account=spec.text("serviceAccountName") or spec.text("serviceAccount") or "default",
        ready=ready and not terminating,
        named_ports=pc.frozen_map(named),  # type: ignore[arg-type]
        meshed=meshed,
        zone=meta.labels.get(ZONE_LABEL, ""),
        terminating=terminating,
    )


def parse_mesh_config(doc: _R) -> MeshConfig | None:
    meta = _meta(doc, "ConfigMap", True)
    if meta.name != MESH_CONFIG_NAME or meta.namespace != SYSTEM_NAMESPACE:
        return None
    data = doc.obj("data") or _R({}, "data")
    mode = data.enum("defaultMtlsMode", pc.MTLS_MODES) or data.enum("mtlsMode", pc.MTLS_MODES)
    settings = pc.MeshSettings(
        trust_domain=data.text("trustDomain") or "cluster.local",
        outbound_policy=data.enum("outboundPolicy", pc.OUTBOUND_POLICIES) or "ALLOW_ANY",
        default_mtls_mode=mode or "PERMISSIVE",
    )
    return MeshConfig(meta, settings)


# Gateway API routes -----------------------------------------------------------


def _parent_refs(doc: _R, meta: Meta) -> tuple[ParentRef, ...]:
    spec = doc.obj("spec", required=True)
    assert spec is not None
    refs = []
    for p in spec.objs("parentRefs"):
        refs.append(
            ParentRef(
                name=p.req("name"),
                namespace=p.text("namespace") or meta.namespace,
                group=p.text("group", "") or "",
                kind=p.text("kind", "Gateway") or "Gateway",
                port=p.integer("port", lo=1, hi=65535),
            )
        )
    if not refs:
        spec.fail("parentRefs", "at least one parentRef (a Service) is required")
    return tuple(refs)


def _value_match(r: _R) -> pc.ValueMatch:
    return _wrap(
        r.path,
        pc.ValueMatch,
        name=r.req("name"),
        value=r.req("value"),
        type=r.text("type", "Exact") or "Exact",
    )


def _header_modifier(r: _R) -> pc.HeaderModifier:
    def pairs(key: str) -> dict[str, str]:
        out = {}
        for h in r.objs(key):
            out[h.req("name")] = h.req("value")
        return out

    return pc.HeaderModifier(
        set=pc.frozen_map(pairs("set")), add=pc.frozen_map(pairs("add")), remove=r.strs("remove")
    )


def _path_modifier(r: _R | None) -> pc.PathModifier | None:
    if r is None:
        return None
    t = r.enum("type", ("ReplaceFullPath", "ReplacePrefixMatch"))
    if t == "ReplaceFullPath":
        return pc.PathModifier(t, r.req("replaceFullPath"))
    if t == "ReplacePrefixMatch":
        return pc.PathModifier(t, r.req("replacePrefixMatch"))
    r.fail("type", "required")


def _filters(r: _R, key: str, ns: str) -> tuple[pc.Filter, ...]:
    out = []
    for f in r.objs(key):
        t = f.req("type")
        if t in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            body = f.obj(t[0].lower() + t[1:], required=True)
            assert body is not None
            hm = _header_modifier(body)
            if t == "RequestHeaderModifier":
                out.append(pc.Filter(type=t, request_header_modifier=hm))
            else:
                out.append(pc.Filter(type=t, response_header_modifier=hm))
        elif t == "URLRewrite":
            body = f.obj("urlRewrite", required=True)
            assert body is not None
            out.append(
                pc.Filter(
                    type=t,
                    url_rewrite=pc.URLRewrite(
                        body.text("hostname"), _path_modifier(body.obj("path"))
                    ),
                )
            )
        elif t == "RequestRedirect":
            body = f.obj("requestRedirect", required=True)
            assert body is not None
            redirect = _wrap(
                body.path,
                pc.RequestRedirect,
                scheme=body.enum("scheme", ("http", "https")),
                hostname=body.text("hostname"),
                path=_path_modifier(body.obj("path")),
                port=body.integer("port", lo=1, hi=65535),
                status_code=body.integer("statusCode", 302) or 302,
            )
            out.append(pc.Filter(type=t, request_redirect=redirect))
        elif t == "RequestMirror":
            body = f.obj("requestMirror", required=True)
            assert body is not None
            ref = body.obj("backendRef", required=True)
            assert ref is not None
            port = ref.integer("port", lo=1, hi=65535)
            if port is None:
                ref.fail("port", "required")
            pct = body.num("percent", lo=0, hi=100)
            frac = body.obj("fraction")
            if frac is not None:
                num = frac.integer("numerator", lo=0) or 0
                den = frac.integer("denominator", 100, lo=1) or 100
                pct = 100.0 * num / den
            mirror = pc.RequestMirror(
                f"{ref.text('namespace') or ns}/{ref.req('name')}",
                port,
                100.0 if pct is None else pct,
            )
            out.append(pc.Filter(type=t, request_mirror=mirror))
        else:
            f.fail("type", f"unsupported filter {t!r}")
    return tuple(out)


def _backends(r: _R, ns: str) -> tuple[BackendRef, ...]:
    out = []
    for b in r.objs("backendRefs"):
        kind = b.text("kind", "Service") or "Service"
        group = b.text("group", "") or ""
        if kind != "Service" or group not in ("", "core"):
            b.fail("kind", f"only Service backends are supported, got {group or 'core'}/{kind}")
        out.append(
            BackendRef(
                name=b.req("name"),
                namespace=b.text("namespace") or ns,
                port=b.integer("port", lo=1, hi=65535),
                weight=b.integer("weight", 1, lo=0, hi=1_000_000) or 0,
                filters=_filters(b, "filters", ns),
            )
        )
    return tuple(out)


def _http_match(m: _R) -> pc.RouteMatch:
    path = None
    p = m.obj("path")
    if p is not None:
        path = _wrap(
            p.path,
            pc.PathMatch,
            type=p.text("type", "PathPrefix") or "PathPrefix",
            value=p.text("value", "/") or "/",
        )
    method = m.enum(
        "method", ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
    )
    return pc.RouteMatch(
        path=path,
        method=method,
        headers=tuple(_value_match(h) for h in m.objs("headers")),
        query_params=tuple(_value_match(q) for q in m.objs("queryParams")),
    )


def _grpc_match(m: _R) -> pc.RouteMatch:
    grpc = None
    mm = m.obj("method")
    if mm is not None:
        t = mm.enum("type", pc.VALUE_MATCH_TYPES, "Exact") or "Exact"
        service, method = mm.text("service", "") or "", mm.text("method", "") or ""
        if t == "Exact" and not (service or method):
            mm.fail("service", "one of service or method is required")
        grpc = _wrap(mm.path, pc.GrpcMethodMatch, service=service, method=method, type=t)
    return pc.RouteMatch(grpc=grpc, headers=tuple(_value_match(h) for h in m.objs("headers")))


def _route_timeouts(r: _R) -> pc.RouteTimeouts | None:
    t = r.obj("timeouts")
    if t is None:
        return None
    req, backend = t.duration("request"), t.duration("backendRequest")
    if req and backend and backend > req:
        t.fail("backendRequest", "must not be longer than request")
    return pc.RouteTimeouts(request=req, backend_request=backend)


def _route_retry(r: _R) -> pc.RouteRetry | None:
    t = r.obj("retry")
    if t is None:
        return None
    codes = []
    for i, c in enumerate(t.items("codes")):
        if isinstance(c, bool) or not isinstance(c, int) or not 400 <= c <= 599:
            raise ResourceError(f"{t.at('codes')}[{i}]", f"{c!r} is not an HTTP status 400..599")
        codes.append(c)
    return pc.RouteRetry(
        attempts=t.integer("attempts", lo=0), codes=tuple(codes), backoff=t.duration("backoff")
    )


def parse_route(doc: _R, kind: str) -> Route:
    meta = _meta(doc, "HTTPRoute" if kind == "http" else "GRPCRoute", True)
    parents = _parent_refs(doc, meta)
    spec = doc.obj("spec")
    assert spec is not None
    rules = []
    for rule in spec.objs("rules"):
        matches = tuple(
            (_http_match if kind == "http" else _grpc_match)(m) for m in rule.objs("matches")
        )
        rules.append(
            RouteRule(
                matches=matches,
                backends=_backends(rule, meta.namespace),
                filters=_filters(rule, "filters", meta.namespace),
                timeouts=_route_timeouts(rule) if kind == "http" else None,
                retry=_route_retry(rule) if kind == "http" else None,
                name=rule.text("name", "") or "",
            )
        )
    return Route(meta, kind, parents, tuple(rules), spec.strs("hostnames"))


# synchro.dev kinds -------------------------------------------------------------


def _traffic_spec(spec: _R) -> pc.TrafficPolicy:
    lb = None
    if (r := spec.obj("loadBalancer")) is not None:
        ch = None
        if (c := r.obj("consistentHash")) is not None:
            cookie = c.obj("cookie")
            ch = pc.ConsistentHash(
                header=c.text("header"),
                cookie=cookie.req("name") if cookie else None,
                cookie_ttl=cookie.duration("ttl") if cookie else None,
                source_ip=c.flag("sourceIP"),
            )
        lb = _wrap(
            r.path,
            pc.LoadBalancer,
            type=r.enum("type", pc.LB_TYPES, "ewma") or "ewma",
            consistent_hash=ch,
        )
    retry = None
    if (r := spec.obj("retry")) is not None:
        budget = None
        if (b := r.obj("budget")) is not None:
            budget = pc.RetryBudget(
                percent=b.num("percent", 20.0, lo=0, hi=100) or 0.0,
                min_retries_per_second=b.num("minRetriesPerSecond", 10.0, lo=0) or 0.0,
                window=b.duration("ttl") or 10.0,
            )
        conds = r.strs("retryOn")
        known = {
            "connect-failure",
            "refused-stream",
            "reset",
            "5xx",
            "gateway-error",
            "retriable-4xx",
            "cancelled",
            "deadline-exceeded",
            "internal",
            "resource-exhausted",
            "unavailable",
        }
        for i, cond in enumerate(conds):
            if cond not in known and not (cond.isdigit() and 100 <= int(cond) <= 599):
                raise ResourceError(f"{r.at('retryOn')}[{i}]", f"unknown retry condition {cond!r}")
        retry = pc.RetryPolicy(
            attempts=r.integer("attempts", 0, lo=0, hi=10) or 0,
            per_try_timeout=r.duration("perTryTimeout"),
            retry_on=conds,
            budget=budget,
        )
    timeouts = None
    if (r := spec.obj("timeouts")) is not None:
        timeouts = pc.Timeouts(
            request=r.duration("request"), connect=r.duration("connect"), idle=r.duration("idle")
        )
    cb = None
    if (r := spec.obj("circuitBreaker")) is not None:
        cb = pc.CircuitBreaker(
            max_connections=r.integer("maxConnections", lo=1),
            max_pending_requests=r.integer("maxPendingRequests", lo=0),
            max_requests=r.integer("maxRequests", lo=1),
            max_retries=r.integer("maxRetries", lo=0),
        )
    od = None
    if (r := spec.obj("outlierDetection")) is not None:
        sr = None
        if (s := r.obj("successRate")) is not None:
            sr = pc.SuccessRateEjection(
                minimum_hosts=s.integer("minimumHosts", 5, lo=1) or 5,
                request_volume=s.integer("requestVolume", 100, lo=1) or 100,
                stdev_factor=s.num("stdevFactor", 1.9, lo=0) or 0.0,
            )
        od = _wrap(
            r.path,
            pc.OutlierDetection,
            consecutive_5xx_errors=r.integer("consecutive5xxErrors", 5, lo=0),
            consecutive_gateway_errors=r.integer("consecutiveGatewayErrors", lo=0),
            interval=r.duration("interval") or 10.0,
            base_ejection_time=r.duration("baseEjectionTime") or 30.0,
            max_ejection_time=r.duration("maxEjectionTime"),
            max_ejection_percent=r.num("maxEjectionPercent", 10.0, lo=0, hi=100),
            success_rate=sr,
        )
    fi = None
    if (r := spec.obj("faultInjection")) is not None:
        delay = abort = None
        if (d := r.obj("delay")) is not None:
            fixed = d.duration("fixedDelay")
            if fixed is None:
                d.fail("fixedDelay", "required")
            delay = pc.FaultDelay(fixed, d.num("percentage", 100.0, lo=0, hi=100) or 0.0)
        if (a := r.obj("abort")) is not None:
            grpc = a.enum("grpcStatus", tuple(_GRPC_CODES))
            abort = _wrap(
                a.path,
                pc.FaultAbort,
                http_status=a.integer("httpStatus", lo=200, hi=599),
                grpc_status=None if grpc is None else _GRPC_CODES[grpc],
                percentage=a.num("percentage", 100.0, lo=0, hi=100),
            )
        fi = pc.FaultInjection(delay, abort)
    rl = None
    if (r := spec.obj("rateLimit")) is not None:
        n = r.integer("requestsPerUnit", lo=1)
        if n is None:
            r.fail("requestsPerUnit", "required")
        unit = r.enum("unit", ("second", "minute", "hour"), "second") or "second"
        rate = n / {"second": 1.0, "minute": 60.0, "hour": 3600.0}[unit]
        rl = pc.RateLimit(
            requests_per_second=rate,
            burst=r.integer("burst", 0, lo=0) or 0,
            per_source=r.flag("perSource"),
        )
    return pc.TrafficPolicy(
        load_balancer=lb,
        retry=retry,
        timeouts=timeouts,
        circuit_breaker=cb,
        outlier_detection=od,
        fault_injection=fi,
        rate_limit=rl,
    )


def parse_traffic_policy(doc: _R) -> TrafficPolicy:
    meta = _meta(doc, "TrafficPolicy", True)
    spec = doc.obj("spec") or _R({}, "spec")
    target = None
    if (t := spec.obj("targetRef")) is not None:
        if (t.text("group", "") or "") not in ("", "core") or t.text("kind") != "Service":
            t.fail("kind", 'targetRef must name a Service (group "", kind Service)')
        target = t.req("name")
        if t.has("namespace") and t.text("namespace") != meta.namespace:
            t.fail("namespace", "a TrafficPolicy can only target a Service in its own namespace")
    policy = _traffic_spec(spec)
    return TrafficPolicy(
        meta,
        target,
        pc.TrafficPolicy(
            name=meta.key,
            **{
                f: getattr(policy, f)
                for f in (
                    "load_balancer",
                    "retry",
                    "timeouts",
                    "circuit_breaker",
                    "outlier_detection",
                    "fault_injection",
                    "rate_limit",
                )
            },
        ),
    )


_MODES = ("UNSET", *pc.MTLS_MODES)


def parse_peer_authentication(doc: _R) -> PeerAuthentication:
    meta = _meta(doc, "PeerAuthentication", True)
    spec = doc.obj("spec") or _R({}, "spec")
    mtls = spec.obj("mtls")
    mode = mtls.enum("mode", _MODES, "UNSET") if mtls else "UNSET"
    levels = []
    if (pl := spec.obj("portLevelMtls")) is not None:
        # Keys are numbers in YAML (`8080: {mode: DISABLE}`, as Istio's docs
        # write them) and strings in JSON: read the value under the key as given.
        for key, value in pl.d.items():
            if not str(key).isdigit() or not 1 <= int(key) <= 65535:
                pl.fail(str(key), "port-level keys must be port numbers")
            if not isinstance(value, dict):
                pl.fail(str(key), f"expected an object, got {type(value).__name__}")
            body = _R(value, pl.at(str(key)))
            m = body.enum("mode", _MODES, "UNSET")
            if m != "UNSET":
                levels.append((int(key), str(m)))
        if levels and not spec.has("selector"):
            pl.fail("", "portLevelMtls requires a workload selector (as in Istio)")
    return PeerAuthentication(
        meta, _sel(spec), None if mode == "UNSET" else mode, tuple(sorted(levels))
    )


def _sel(spec: _R) -> Mapping[str, str] | None:
    s = _selector(spec)
    return None if s is None else pc.frozen_map(s)


def parse_authorization_policy(doc: _R) -> AuthorizationPolicy:
    meta = _meta(doc, "AuthorizationPolicy", True)
    spec = doc.obj("spec") or _R({}, "spec")
    action = spec.enum("action", pc.AUTHZ_ACTIONS, "ALLOW") or "ALLOW"
    rules = []
    for rule in spec.objs("rules"):
        froms = []
        for f in rule.objs("from"):
            s = f.obj("source", required=True)
            assert s is not None
            froms.append(
                _wrap(
                    s.path,
                    pc.Source,
                    **{
                        _snake(k): s.strs(k)
                        for k in (
                            "principals",
                            "notPrincipals",
                            "namespaces",
                            "notNamespaces",
                            "ipBlocks",
                            "notIpBlocks",
                        )
                    },
                )
            )
        tos = []
        for t in rule.objs("to"):
            o = t.obj("operation", required=True)
            assert o is not None
            for k in ("ports", "notPorts"):
                for i, v in enumerate(o.items(k)):
                    if (
                        not (isinstance(v, int) or (isinstance(v, str) and v.isdigit()))
                        or not 1 <= int(v) <= 65535
                    ):
                        raise ResourceError(f"{o.at(k)}[{i}]", f"{v!r} is not a port")
            tos.append(
                pc.Operation(
                    **{
                        _snake(k): tuple(str(v) for v in o.items(k))
                        for k in (
                            "hosts",
                            "notHosts",
                            "ports",
                            "notPorts",
                            "methods",
                            "notMethods",
                            "paths",
                            "notPaths",
                        )
                    }
                )
            )
        whens = []
        for w in rule.objs("when"):
            key = w.req("key")
            whens.append(
                pc.Condition(key=key, values=w.strs("values"), not_values=w.strs("notValues"))
            )
        rules.append(pc.AuthorizationRule(from_=tuple(froms), to=tuple(tos), when=tuple(whens)))
    policy = pc.AuthorizationPolicy(name=meta.key, action=action, rules=tuple(rules))
    return AuthorizationPolicy(meta, _sel(spec), policy)


def _snake(camel: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)


# --- dispatch ------------------------------------------------------------------

_CORE = {"Namespace", "Service", "Pod", "ConfigMap"}
_GATEWAY_VERSIONS = ("v1", "v1beta1", "v1alpha2")
SYNCHRO_KINDS = ("TrafficPolicy", "PeerAuthentication", "AuthorizationPolicy")


def doc_identity(doc: Any) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name) of a document, best effort, for error lines."""
    if not isinstance(doc, dict):
        return ("", "", "", "")
    raw = doc.get("metadata")
    meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return (
        str(doc.get("apiVersion", "")),
        str(doc.get("kind", "")),
        str(meta.get("namespace", "") or ""),
        str(meta.get("name", "") or ""),
    )


def is_relevant(api_version: str, kind: str) -> bool:
    group, _, _ = api_version.rpartition("/")
    if group == "" and kind in _CORE:
        return True
    if group == "discovery.k8s.io" and kind == "EndpointSlice":
        return True
    if group == GATEWAY_GROUP and kind in ("HTTPRoute", "GRPCRoute"):
        return True
    return group == SYNCHRO_GROUP


def parse(doc: Any) -> Resource | None:
    """One document -> a model; None for kinds the mesh does not read."""
    if not isinstance(doc, dict):
        raise ResourceError("", f"a document must be a mapping, got {type(doc).__name__}")
    r = _R(doc, "")
    api_version = r.req("apiVersion")
    kind = r.req("kind")
    if not is_relevant(api_version, kind):
        return None
    group, _, version = api_version.rpartition("/")
    if group == "":
        if kind == "Namespace":
            return parse_namespace(r)
        if kind == "Service":
            return parse_service(r)
        if kind == "Pod":
            return parse_pod(r)
        return parse_mesh_config(r)
    if group == "discovery.k8s.io":
        return parse_endpoint_slice(r)
    if group == GATEWAY_GROUP:
        if version not in _GATEWAY_VERSIONS:
            r.fail("apiVersion", f"unsupported Gateway API version {version!r}")
        return parse_route(r, "http" if kind == "HTTPRoute" else "grpc")
    if version != "v1alpha1":
        r.fail("apiVersion", f"unsupported version {api_version!r}; use synchro.dev/v1alpha1")
    if kind == "TrafficPolicy":
        return parse_traffic_policy(r)
    if kind == "PeerAuthentication":
        return parse_peer_authentication(r)
    if kind == "AuthorizationPolicy":
        return parse_authorization_policy(r)
    r.fail("kind", f"unknown synchro.dev kind {kind!r}; expected one of {', '.join(SYNCHRO_KINDS)}")
