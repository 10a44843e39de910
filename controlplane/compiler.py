"""The compiler core: `compile(resources, proxy) -> ProxyConfig`. Pure.

What a proxy gets:
- every Service with its ClusterIPs, ports and protocols, its endpoints, its
  routes (Gateway API precedence, flattened to one entry per match) and its
  TrafficPolicy: what the workload may call;
- the PeerAuthentication and AuthorizationPolicies that select its own workload,
  and the services it backs: what applies on its inbound side. Policies for
  other workloads stay out.

The part every proxy shares (services, routes, endpoints) is compiled once per
ResourceSet and cached on it; the per-proxy part is small. The version is a
content hash, so an unchanged result has an unchanged version and pushes nothing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane import resources as rs
from controlplane.validation import ResourceSet
from proxy import config as pc

# Where Services without a clusterIP (local files) get one: Kubernetes' default range.
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")

_PROTOCOL_PREFIXES = {
    "http": "http",
    "http2": "http2",
    "h2c": "http2",
    "grpc": "grpc",
    "grpc-web": "http",
    "tcp": "tcp",
    "tls": "tls",
    "https": "tls",
}


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """Who is asking: the proxy's Pod, from the resources or from its own report."""

    namespace: str
    name: str = ""
    labels: Mapping[str, str] = field(default_factory=pc.frozen_map)
    service_account: str = "default"


def proxy_info(
    resources: ResourceSet,
    namespace: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    service_account: str | None = None,
) -> ProxyInfo:
    """The Pod as the resources know it; the proxy's own report fills the gaps."""
    pod = resources.pod(namespace, name)
    if pod is not None:
        return ProxyInfo(namespace, name, pod.meta.labels, pod.service_account)
    return ProxyInfo(namespace, name, pc.frozen_map(labels or {}), service_account or "default")


# --- protocol, selectors, addresses ----------------------------------------------


def port_protocol(app_protocol: str, name: str) -> str:
    """appProtocol first, then the port name prefix (Istio's convention); else tcp."""
    ap = app_protocol.lower().removeprefix("kubernetes.io/")
    if ap in _PROTOCOL_PREFIXES:
        return _PROTOCOL_PREFIXES[ap]
    if ap == "ws" or ap == "wss":
        return "http" if ap == "ws" else "tls"
    n = name.lower()
    for prefix in sorted(_PROTOCOL_PREFIXES, key=len, reverse=True):
        if n == prefix or n.startswith(prefix + "-"):
            return _PROTOCOL_PREFIXES[prefix]
    return "tcp"


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes equality selector; an empty one selects everything."""
    if selector is None:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def allocate_cluster_ips(services: Iterable[rs.Service]) -> dict[tuple[str, str], str]:
    """Stable ClusterIPs for Services that have none (no API server to assign them).

    A hash of namespace/name picks the address, so a Service keeps its IP across
    controller restarts and unrelated changes; collisions probe linearly, in
    namespace/name order so that the result is deterministic.
    """
    taken = {ip for s in services for ip in s.cluster_ips}
    size = SERVICE_CIDR.num_addresses
    base = int(SERVICE_CIDR.network_address)
    out: dict[tuple[str, str], str] = {}
    for s in sorted(services, key=lambda s: (s.meta.namespace, s.meta.name)):
        if s.cluster_ips or s.headless or s.type == "ExternalName":
            continue
        h = int.from_bytes(hashlib.sha256(s.meta.key.encode()).digest()[:8], "big")
        for probe in range(size):
            off = (h + probe) % size
            if off in (0, 1, size - 1):  # network, the API server's own IP, broadcast
                continue
            ip = str(ipaddress.ip_address(base + off))
            if ip not in taken:
                taken.add(ip)
                out[(s.meta.namespace, s.meta.name)] = ip
                break
    return out


# --- endpoints -------------------------------------------------------------------


class _PodIndex:
    """Pods by namespace and label, so selecting is not pods x services; and
    whether a Pod's sidecar takes mesh TLS on a port."""

    def __init__(self, pods: Iterable[rs.Pod], resources: ResourceSet | None = None) -> None:
        self.resources = resources
        self._inbound: dict[tuple[Any, ...], pc.PeerAuthentication] = {}
        self.by_ns: dict[str, list[rs.Pod]] = {}
        self.by_label: dict[tuple[str, str, str], set[int]] = {}
        self.pods: list[rs.Pod] = []
        self.by_name: dict[str, rs.Pod] = {}
        for p in pods:
            i = len(self.pods)
            self.pods.append(p)
            self.by_name[p.meta.key] = p
            self.by_ns.setdefault(p.meta.namespace, []).append(p)
            for k, v in p.meta.labels.items():
                self.by_label.setdefault((p.meta.namespace, k, v), set()).add(i)

    def takes_mtls(self, pod: rs.Pod, port: int) -> bool:
        """A meshed Pod whose PeerAuthentication (workload > namespace > mesh,
        port level first) is not DISABLE on `port`. A DISABLE sidecar refuses
        mesh TLS, so callers must speak plaintext to it, as Istio's auto mTLS
        does; a Pod without a sidecar never takes it."""
        if not pod.meshed:
            return False
        if self.resources is None:
            return True
        key = (pod.meta.namespace, tuple(sorted(pod.meta.labels.items())))
        pa = self._inbound.get(key)
        if pa is None:
            info = ProxyInfo(pod.meta.namespace, pod.meta.name, pod.meta.labels)
            pa = self._inbound[key] = peer_authentication(self.resources, info)
        return pa.mode_for(port) != "DISABLE"

    def select(self, namespace: str, selector: Mapping[str, str]) -> list[rs.Pod]:
        if not selector:
            return list(self.by_ns.get(namespace, []))
        sets = []
        for k, v in selector.items():
            s = self.by_label.get((namespace, k, v))
            if not s:
                return []
            sets.append(s)
        sets.sort(key=len)
        hit = set.intersection(*sets)
        return [self.pods[i] for i in sorted(hit)]


def _endpoint_from_pod(pod: rs.Pod, port: int, trust_domain: str, pods: _PodIndex) -> pc.Endpoint:
    return pc.Endpoint(
        ip=pod.ip,
        port=port,
        labels=pod.meta.labels,
        identity=pc.spiffe_id(trust_domain, pod.meta.namespace, pod.service_account),
        zone=pod.zone,
        ready=pod.ready,
        # `meshed` tells callers to speak mTLS: not to a sidecar that refuses it.
        meshed=pods.takes_mtls(pod, port),
        pod=pod.meta.key,
    )


def _endpoints_from_pods(
    svc: rs.Service, sp: rs.ServicePortSpec, pods: _PodIndex, td: str
) -> tuple[pc.Endpoint, ...]:
    """What the EndpointSlice controller would publish: selected Pods with an IP,
    the targetPort resolved (a name through the Pod's container ports)."""
    if svc.selector is None:
        return ()
    out = []
    for pod in pods.select(svc.meta.namespace, svc.selector):
        if not pod.ip or pod.terminating:
            continue
        tp = sp.target_port
        if isinstance(tp, str):
            num = pod.named_ports.get(tp)
            if num is None:
                continue  # like Kubernetes: a Pod without the named port is not an endpoint
            port = int(num)
        else:
            port = tp or sp.port
        out.append(_endpoint_from_pod(pod, port, td, pods))
    return tuple(out)


def _endpoints_from_slices(
    sp: rs.ServicePortSpec, slices: list[rs.EndpointSlice], pods: _PodIndex, td: str
) -> tuple[pc.Endpoint, ...]:
    out = []
    seen: set[tuple[str, int]] = set()
    for sl in slices:
        if sl.address_type == "FQDN":
            continue
        port = next((p.port for p in sl.ports if p.name == sp.name), None)
        if port is None:
            continue
        for ep in sl.endpoints:
            pod = pods.by_name.get(ep.pod) if ep.pod else None
            for addr in ep.addresses:
                if (addr, port) in seen:
                    continue
                seen.add((addr, port))
                if pod is not None:
                    e = _endpoint_from_pod(pod, port, td, pods)
                    out.append(replace(e, ip=addr, ready=ep.ready, zone=ep.zone or pod.zone))
                else:
                    out.append(
                        pc.Endpoint(ip=addr, port=port, zone=ep.zone, ready=ep.ready, pod=ep.pod)
                    )
    return tuple(out)


# --- routes (Gateway API precedence) ---------------------------------------------

_PATH_RANK = {"Exact": 3, "RegularExpression": 2, "PathPrefix": 1}


def http_precedence(m: pc.RouteMatch) -> tuple[int, ...]:
    """Bigger sorts first. Gateway API: an Exact path, then the longest prefix,
    then a method match, then the most header matches, then the most query
    matches. Regex precedence is implementation-specific: here after Exact and
    before any prefix, longer patterns first (as Envoy Gateway does)."""
    path = m.path or pc.PathMatch("PathPrefix", "/")
    return (
        _PATH_RANK[path.type],
        len(path.value),
        1 if m.method else 0,
        len(m.headers),
        len(m.query_params),
    )


def grpc_precedence(m: pc.RouteMatch) -> tuple[int, ...]:
    """Bigger sorts first: characters in the matching service, then in the
    method, then the number of header matches."""
    g = m.grpc or pc.GrpcMethodMatch()
    return (len(g.service), len(g.method), len(m.headers))


def _ts_key(meta: rs.Meta) -> tuple[str, str, str]:
    return (meta.creation_timestamp, meta.namespace, meta.name)


def compile_routes(routes: Iterable[rs.Route], svc_key: tuple[str, str]) -> tuple[pc.Route, ...]:
    """All matches of the routes attached to one Service, in precedence order:
    gRPC routes first (a gRPC request tries them first; HTTP routes are never
    merged with them), each kind sorted by the Gateway API rules, ties broken by
    the oldest route, then namespace/name, then rule and match order."""
    entries: list[tuple[tuple[Any, ...], pc.Route]] = []
    for route in routes:
        ports = [
            p.port
            for p in route.parent_refs
            if p.kind == "Service" and (p.namespace, p.name) == svc_key
        ]
        if not ports:
            continue
        # One parentRef without a port covers every port.
        attach: list[int | None] = [None]
        if None not in ports:
            attach = [p for p in sorted({p for p in ports if p is not None})]
        for ri, rule in enumerate(route.rules):
            matches = rule.matches or (pc.RouteMatch(),)
            backends = tuple(
                pc.WeightedBackend(f"{b.namespace}/{b.name}", b.port or 1, b.weight, b.filters)
                for b in rule.backends
            )
            for mi, match in enumerate(matches):
                prec = http_precedence(match) if route.kind == "http" else grpc_precedence(match)
                neg = tuple(-x for x in prec)
                for port in attach:
                    key = (
                        0 if route.kind == "grpc" else 1,
                        neg,
                        _ts_key(route.meta),
                        ri,
                        mi,
                        port or 0,
                    )
                    entries.append(
                        (
                            key,
                            pc.Route(
                                kind=route.kind,
                                name=route.meta.key,
                                rule=ri,
                                match=match,
                                backends=backends,
                                filters=rule.filters,
                                timeouts=rule.timeouts,
                                retry=rule.retry,
                                port=port,
                            ),
                        )
                    )
    entries.sort(key=lambda e: e[0])
    return tuple(r for _, r in entries)


# --- traffic policy ------------------------------------------------------------------

_TP_FIELDS = (
    "load_balancer",
    "retry",
    "timeouts",
    "circuit_breaker",
    "outlier_detection",
    "fault_injection",
    "rate_limit",
)


def merge_policies(
    namespace_wide: pc.TrafficPolicy | None, targeted: pc.TrafficPolicy | None
) -> pc.TrafficPolicy | None:
    """A Service's own TrafficPolicy wins section by section over its namespace's."""
    if namespace_wide is None or targeted is None:
        return targeted or namespace_wide
    merged = {
        f: getattr(targeted, f) if getattr(targeted, f) is not None else getattr(namespace_wide, f)
        for f in _TP_FIELDS
    }
    return pc.TrafficPolicy(name=f"{namespace_wide.name},{targeted.name}", **merged)


# --- the shared part -------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    mesh: pc.MeshSettings
    services: tuple[pc.Service, ...]
    trust_bundle: tuple[str, ...]
    digest: str  # hash of the shared content
    services_json: str  # the services list as canonical JSON, reused when rendering
    selectors: tuple[tuple[str, str, Mapping[str, str]], ...]  # (namespace, name, selector)
    # Selectors by (namespace, one of their label pairs): a workload's candidates.
    selector_index: Mapping[tuple[str, str, str], tuple[tuple[str, str, Mapping[str, str]], ...]]
    json_prefix: str  # '{"services":' + services_json, one string for every proxy
    # GAMMA consumer routes (a route in another namespace than its parent
    # Service): route namespace -> Service key -> its routes there.
    consumer_routes: Mapping[str, Mapping[tuple[str, str], tuple[rs.Route, ...]]] = field(
        default_factory=dict
    )


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def shared(resources: ResourceSet) -> Shared:
    cached = resources._cache.get("shared")
    if isinstance(cached, Shared):
        return cached
    mesh = resources.mesh.settings
    td = mesh.trust_domain
    pods = _PodIndex(resources.pods, resources)
    slices: dict[tuple[str, str], list[rs.EndpointSlice]] = {}
    for sl in resources.endpoint_slices:
        slices.setdefault((sl.meta.namespace, sl.service), []).append(sl)
    routes_by_parent: dict[tuple[str, str], list[rs.Route]] = {}
    consumer: dict[str, dict[tuple[str, str], list[rs.Route]]] = {}
    for r in resources.routes:
        for p in r.parent_refs:
            if p.namespace == r.meta.namespace:
                lst = routes_by_parent.setdefault((p.namespace, p.name), [])
            else:
                lst = consumer.setdefault(r.meta.namespace, {}).setdefault(
                    (p.namespace, p.name), []
                )
            if not lst or lst[-1] is not r:
                lst.append(r)
    ns_policy: dict[str, pc.TrafficPolicy] = {}
    svc_policy: dict[tuple[str, str], pc.TrafficPolicy] = {}
    for tp in resources.traffic_policies:
        if tp.target is None:
            ns_policy[tp.meta.namespace] = tp.policy
        else:
            svc_policy[(tp.meta.namespace, tp.target)] = tp.policy
    vips = allocate_cluster_ips(resources.services.values())
    # Per-service results of the previous build, reused when every input is the
    # very same object (the parse cache keeps unchanged documents' models).
    previous: dict[tuple[str, str], tuple[tuple[Any, ...], pc.Service, str]] = resources.memo.get(
        "services", {}
    )
    current: dict[tuple[str, str], tuple[tuple[Any, ...], pc.Service, str]] = {}
    out = []
    jsons = []
    for key in sorted(resources.services):
        svc = resources.services[key]
        if svc.type == "ExternalName":
            continue
        own = slices.get(key)
        if own:
            members: tuple[Any, ...] = (
                *own,
                *(pods.by_name.get(ep.pod) for sl in own for ep in sl.endpoints),
            )
        else:
            members = (
                tuple(pods.select(svc.meta.namespace, svc.selector))
                if svc.selector is not None
                else ()
            )
        routes = tuple(routes_by_parent.get(key, ()))
        deps = (
            svc,
            members,
            routes,
            ns_policy.get(svc.meta.namespace),
            svc_policy.get(key),
            td,
            vips.get(key),
            # Which endpoints take mTLS depends on them.
            resources.peer_authentications,
            resources.mesh.settings.default_mtls_mode,
        )
        hit = previous.get(key)
        if hit is not None and _same(hit[0], deps):
            current[key] = hit
            out.append(hit[1])
            jsons.append(hit[2])
            continue
        compiled = _compile_service(
            svc, own, pods, td, vips.get(key), routes, ns_policy, svc_policy
        )
        text = _canonical(pc.to_dict(compiled))
        current[key] = (deps, compiled, text)
        out.append(compiled)
        jsons.append(text)
    resources.memo["services"] = current
    services = tuple(out)
    services_json = "[" + ",".join(jsons) + "]"
    digest = hashlib.sha256(
        "\n".join((services_json, _canonical(pc.to_dict(mesh)), *resources.trust_bundle)).encode()
    ).hexdigest()
    selectors = tuple(
        (s.meta.namespace, s.meta.name, s.selector)
        for s in resources.services.values()
        if s.selector
    )
    index: dict[tuple[str, str, str], list[tuple[str, str, Mapping[str, str]]]] = {}
    for sel in selectors:
        k, v = min(sel[2].items())
        index.setdefault((sel[0], k, v), []).append(sel)
    result = Shared(
        mesh,
        services,
        resources.trust_bundle,
        digest,
        services_json,
        selectors,
        {k: tuple(v) for k, v in index.items()},
        '{"services":' + services_json,
        {ns: {k: tuple(v) for k, v in by_svc.items()} for ns, by_svc in consumer.items()},
    )
    resources._cache["shared"] = result
    return result


def _same(a: Any, b: Any) -> bool:
    """Identity for objects, equality for plain values, element-wise for tuples."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a is None or isinstance(a, str | int):
        return bool(a == b)
    return a is b


def _compile_service(
    svc: rs.Service,
    own: list[rs.EndpointSlice] | None,
    pods: _PodIndex,
    td: str,
    vip: str | None,
    routes: tuple[rs.Route, ...],
    ns_policy: Mapping[str, pc.TrafficPolicy],
    svc_policy: Mapping[tuple[str, str], pc.TrafficPolicy],
) -> pc.Service:
    key = (svc.meta.namespace, svc.meta.name)
    ports = []
    for sp in svc.ports:
        if sp.protocol != "TCP":
            continue  # the mesh carries TCP only
        eps = (
            _endpoints_from_slices(sp, own, pods, td)
            if own
            else _endpoints_from_pods(svc, sp, pods, td)
        )
        target = sp.target_port if isinstance(sp.target_port, int) else 0
        ports.append(
            pc.ServicePort(
                port=sp.port,
                protocol=port_protocol(sp.app_protocol, sp.name),
                name=sp.name,
                target_port=target,
                endpoints=eps,
            )
        )
    return pc.Service(
        name=svc.meta.name,
        namespace=svc.meta.namespace,
        cluster_ips=svc.cluster_ips or ((vip,) if vip else ()),
        ports=tuple(ports),
        headless=svc.headless,
        routes=compile_routes(routes, key),
        policy=merge_policies(ns_policy.get(svc.meta.namespace), svc_policy.get(key)),
    )


# --- the per-proxy part ------------------------------------------------------------------


def peer_authentication(resources: ResourceSet, proxy: ProxyInfo) -> pc.PeerAuthentication:
    """Istio's order: workload selector > namespace > mesh (synchro-system) >
    the mesh default; UNSET inherits from the next level; port-level settings
    come from the workload policy."""
    mode = resources.mesh.settings.default_mtls_mode
    source = ""
    port_level: tuple[pc.PortMtls, ...] = ()
    mesh_wide = [
        p
        for p in resources.peer_authentications
        if p.meta.namespace == rs.SYSTEM_NAMESPACE and p.selector is None
    ]
    ns_wide = [
        p
        for p in resources.peer_authentications
        if p.meta.namespace == proxy.namespace and p.selector is None
    ]
    workload = [
        p
        for p in resources.peer_authentications
        if p.meta.namespace == proxy.namespace and selects(p.selector, proxy.labels)
    ]
    for level in (mesh_wide, ns_wide, workload[:1]):  # already oldest first
        for p in level:
            if p.mode is not None:
                mode, source = p.mode, p.meta.key
            if p.port_level:
                port_level = tuple(pc.PortMtls(port, m) for port, m in p.port_level)
                source = p.meta.key
    return pc.PeerAuthentication(mode=mode, port_level=port_level, source=source)


def authorization(resources: ResourceSet, proxy: ProxyInfo) -> tuple[pc.AuthorizationPolicy, ...]:
    out = []
    for a in resources.authorization_policies:
        ns = a.meta.namespace
        if ns == rs.SYSTEM_NAMESPACE:
            applies = a.selector is None or selects(a.selector, proxy.labels)
        else:
            applies = ns == proxy.namespace and (
                a.selector is None or selects(a.selector, proxy.labels)
            )
        if applies:
            out.append(a.policy)
    return tuple(out)


def _backed_services(sh: Shared, proxy: ProxyInfo) -> tuple[str, ...]:
    """The services whose selector picks this workload (inbound side)."""
    found = set()
    for k, v in proxy.labels.items():
        for ns, name, sel in sh.selector_index.get((proxy.namespace, k, v), ()):
            if selects(sel, proxy.labels):
                found.add(f"{ns}/{name}")
    return tuple(sorted(found))


def _consumer_services(
    resources: ResourceSet, sh: Shared, namespace: str
) -> tuple[tuple[pc.Service, ...], str]:
    """The services as callers in `namespace` see them, and a digest of what
    differs. GAMMA: a route in the caller's namespace whose parent is a Service
    elsewhere (a consumer route) applies to that namespace's callers only, and
    replaces the Service's own (producer) routes for them."""
    mine = sh.consumer_routes.get(namespace)
    if not mine:
        return sh.services, ""
    cache: dict[str, tuple[tuple[pc.Service, ...], str]] = resources._cache.setdefault(
        "consumer", {}
    )
    hit = cache.get(namespace)
    if hit is not None:
        return hit
    out = []
    changed = []
    for svc in sh.services:
        key = (svc.namespace, svc.name)
        if key in mine:
            svc = replace(svc, routes=compile_routes(mine[key], key))
            changed.append(_canonical(pc.to_dict(svc)))
        out.append(svc)
    result = (tuple(out), hashlib.sha256("\n".join(changed).encode()).hexdigest())
    cache[namespace] = result
    return result


def compile(resources: ResourceSet, proxy: ProxyInfo) -> pc.ProxyConfig:
    sh = shared(resources)
    memo_key = (
        "proxy",
        proxy.namespace,
        tuple(sorted(proxy.labels.items())),
        proxy.service_account,
    )
    memo: dict[Any, pc.ProxyConfig] = resources._cache.setdefault("proxies", {})
    hit = memo.get(memo_key)
    if hit is not None:
        return hit
    inbound = pc.Inbound(
        peer_authentication=peer_authentication(resources, proxy),
        authorization=authorization(resources, proxy),
        services=_backed_services(sh, proxy),
    )
    td = sh.mesh.trust_domain
    workload = pc.Workload(
        namespace=proxy.namespace,
        service_account=proxy.service_account,
        labels=proxy.labels,
        identity=pc.spiffe_id(td, proxy.namespace, proxy.service_account),
    )
    services, consumer_digest = _consumer_services(resources, sh, proxy.namespace)
    own = _canonical(
        {
            "inbound": pc.to_dict(inbound),
            "sa": proxy.service_account,
            "ns": proxy.namespace,
            "labels": dict(proxy.labels),
            "consumer_routes": consumer_digest,
        }
    )
    version = hashlib.sha256(f"{sh.digest}\n{own}".encode()).hexdigest()[:16]
    config = pc.ProxyConfig(
        version=version,
        mesh=sh.mesh,
        services=services,
        inbound=inbound,
        trust_bundle=sh.trust_bundle,
        workload=workload,
    )
    memo[memo_key] = config
    return config


def render_parts(resources: ResourceSet, config: pc.ProxyConfig) -> tuple[str, str]:
    """The config's JSON as (prefix, tail), JSON = prefix + tail. The prefix holds
    the services (the bulk) and is the same string for every proxy of one
    ResourceSet, so callers can serialize or compress it once."""
    sh = shared(resources)
    if config.services is not sh.services:
        return "", json.dumps(config.to_dict(), separators=(",", ":"))
    rest = json.dumps(_shallow(config), separators=(",", ":"))
    return sh.json_prefix, "," + rest[1:]


def render(resources: ResourceSet, config: pc.ProxyConfig) -> bytes:
    """The config as JSON bytes."""
    prefix, tail = render_parts(resources, config)
    return (prefix + tail).encode()


def _shallow(config: pc.ProxyConfig) -> dict[str, Any]:
    d = {}
    for f in ("version", "mesh", "inbound", "trust_bundle", "workload", "schema"):
        d[f] = pc.to_dict(getattr(config, f))
    return d
