"""`synchro explain SRC_POD DST[:PORT] [PATH]`: what the mesh would do with one request, and why.

From the live config: the controller compiles the source Pod's proxy config
and the destination Pods' inbound config (`GET /v1/config/{namespace}/{pod}`),
and the decisions come from the proxy's own cores on that config: the
registry resolves the destination, `RouteTable.match` picks the route (the
rules it passed over are listed with the condition that failed), the route's
weights give each backend's share, `retry.RetryPolicy` is the retry policy,
`authz.decide` is the authorization decision at the destination. Balancing,
circuit breaking and outlier detection are the backend service's
TrafficPolicy; the retry budget and timeouts the called service's, the route's
settings winning over both (as the proxy applies them).

The protocol is decided as the proxy's listener decides it: a port the proxy
treats as opaque (a server-first port, or one listed in the source Pod's
`synchro.dev/opaque-ports`) is TCP whatever its name; on any other port the
proxy detects HTTP/1, HTTP/2 and TLS from the client's first bytes
(`proxy.detect`), so HTTP routes apply to an HTTP client even on a port whose
name and appProtocol say nothing (or `tcp`). For such a port the answer is the
HTTP request's, with the opaque TCP fallback beside it.

SRC_POD is `namespace/name` or `name` (namespace default), as `synchro exec`
names them (a Deployment's Pods are `<deployment>-<n>` in a local mesh). DST is
a Service name (`name`, `name.namespace`, `name.namespace.svc.cluster.local`,
short names in the source Pod's namespace) or an IP, with an optional port.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy import config as pc
from proxy import ports
from proxy.registry import Passthrough, Refuse, Registry, ToEndpoint, ToService
from proxy.security import authz, runtime
from proxy.security.inbound import principal_of
from proxy.traffic.retry import RetryConfigError, RetryPolicy
from proxy.traffic.routing import RequestView, RouteTable
from synchro import controller_api, output
from synchro.commands import CommandError

EPILOG = """\
examples:
  synchro explain shop/frontend-0 catalog /api/items
  synchro explain shop/frontend-0 catalog.shop:8080 /api/items -H x-canary:true
  synchro explain shop/frontend-0 payments:50051 /shop.Payments/Charge --method POST \\
      -H content-type:application/grpc
  synchro explain shop/ratings-0 payments.shop -o json
  synchro explain --controller https://127.0.0.1:15012 --cacert ca.crt default/client web
"""

# The engine's defaults (proxy/engine.py): without any retry setting a request is
# retried once when its first try never reached an upstream; a retry count
# without conditions means Istio's default conditions.
SAFE_RETRY_ON = ("connect-failure", "refused-stream")
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "503")
MAX_RETRIES = 10
DEFAULT_BACKOFF = 0.025
DEFAULT_LB = "ewma"
HTTP_PROTOCOLS = ("http", "http2", "grpc")


class ExplainError(ValueError):
    """The request cannot be explained (an unknown service port, a bad header...)."""


# --- the question -------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request to explain, as the source Pod's application would send it."""

    destination: str  # host name or IP, as the application dials it
    port: int | None = None
    path: str = "/"
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    source_pod: str = ""  # "<namespace>/<name>": finds the source IP for ipBlocks

    @property
    def grpc(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/grpc")


# --- the answer ----------------------------------------------------------------------


@dataclass(frozen=True)
class RouteCheck:
    route: str  # "<namespace>/<name> rule <i>"
    kind: str
    matches: str  # the match, in words
    matched: bool
    why: str  # for a route passed over: the condition that failed


@dataclass(frozen=True)
class Mtls:
    mode: str  # STRICT | PERMISSIVE | DISABLE | unknown | none (no sidecar)
    source: str  # the PeerAuthentication in force, "mesh default", or why unknown
    mutual_tls: bool  # does the connection use mutual TLS
    refused: bool  # a plaintext connection that STRICT refuses


@dataclass(frozen=True)
class Authorization:
    decision: str  # ALLOW | DENY | NOT_ENFORCED | UNKNOWN
    policy: str | None
    reason: str
    audited_by: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()  # every policy that applies to the destination


@dataclass(frozen=True)
class Backend:
    service: str
    port: int
    weight: int
    percent: float
    filters: tuple[str, ...]
    endpoints_ready: int
    endpoints_total: int
    pod: str  # the destination Pod examined for mTLS and authorization
    target_port: int
    load_balancer: dict[str, Any]
    circuit_breaker: dict[str, Any] | None
    outlier_detection: dict[str, Any] | None
    policy: str  # TrafficPolicy these come from, "" for none
    mtls: Mtls | None
    authorization: Authorization | None
    problem: str = ""  # e.g. the backend service does not exist


@dataclass(frozen=True)
class Retry:
    attempts: int  # total tries, the first included
    retry_on: tuple[str, ...]
    status_codes: tuple[int, ...]
    per_try_timeout: float | None
    backoff_base: float
    budget: dict[str, Any]
    source: str  # where the retry count came from


@dataclass(frozen=True)
class Timeouts:
    request: float | None
    request_source: str
    per_try: float | None
    connect: float | None
    idle: float | None


@dataclass(frozen=True)
class TcpFallback:
    """What a connection that does not start with HTTP gets on a detected port."""

    backends: tuple[Backend, ...]
    retry: Retry | None
    timeouts: Timeouts | None
    outcome: str
    status: int | None
    verdict: str


# How the source proxy picks the protocol of a connection to the port.
DECLARED = "declared"  # the port says HTTP (name or appProtocol); the proxy still sniffs
DETECTED = "detected"  # nothing (or tcp/tls) declared: decided from the client's first bytes
OPAQUE = "opaque"  # the proxy skips detection: TCP whatever the name says


@dataclass(frozen=True)
class Explanation:
    source: dict[str, Any]
    destination: dict[str, Any]
    resolution: str  # service | endpoint | passthrough | refused
    service: str | None
    port: int | None
    protocol: str
    routes: tuple[RouteCheck, ...]
    route: str | None
    route_filters: tuple[str, ...]
    backends: tuple[Backend, ...]
    retry: Retry | None
    timeouts: Timeouts | None
    fault_injection: dict[str, Any] | None
    rate_limit: dict[str, Any] | None
    outcome: str  # forwarded | refused | no-route | no-backend | redirect | denied | reset
    status: int | None  # the status the client gets when the mesh answers itself
    verdict: str
    notes: tuple[str, ...]
    detection: str = DECLARED
    tcp_fallback: TcpFallback | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dataclasses.asdict(self)
        return _plain(out)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


# --- authorization: compiled as the proxy compiles them ---------------------------------


def compiled_policies(config: pc.ProxyConfig) -> tuple[authz.Policy, ...]:
    """The destination proxy's own compilation (a policy that does not compile
    becomes DENY-all there, so it does here)."""
    return runtime.compile_policies(config.inbound.authorization)


# --- route matching, in words ---------------------------------------------------------


def _describe_match(m: pc.RouteMatch) -> list[tuple[str, pc.RouteMatch]]:
    """Each condition of a match as (words, a match holding only that condition)."""
    parts: list[tuple[str, pc.RouteMatch]] = []
    if m.path is not None:
        parts.append((f"path {m.path.type} {m.path.value}", pc.RouteMatch(path=m.path)))
    if m.method is not None:
        parts.append((f"method {m.method}", pc.RouteMatch(method=m.method)))
    for h in m.headers:
        op = "=" if h.type == "Exact" else "~"
        parts.append((f"header {h.name}{op}{h.value}", pc.RouteMatch(headers=(h,))))
    for q in m.query_params:
        op = "=" if q.type == "Exact" else "~"
        parts.append((f"query {q.name}{op}{q.value}", pc.RouteMatch(query_params=(q,))))
    if m.grpc is not None:
        g = m.grpc
        words = f"gRPC {g.service or '*'}/{g.method or '*'}"
        if g.type != "Exact":
            words += " (regex)"
        parts.append((words, pc.RouteMatch(grpc=g)))
    return parts


def _fits(route: pc.Route, match: pc.RouteMatch, view: RequestView) -> bool:
    # The proxy's own matcher, on a route reduced to one condition.
    one = dataclasses.replace(route, match=match, port=None)
    return RouteTable([one]).match(view) is not None


def _why_not(route: pc.Route, view: RequestView) -> str:
    failed = [words for words, m in _describe_match(route.match) if not _fits(route, m, view)]
    return "no match on " + ", ".join(failed) if failed else "does not match"


def _route_label(route: pc.Route) -> str:
    return f"{route.name} rule {route.rule}"


def _match_words(route: pc.Route) -> str:
    words = [w for w, _ in _describe_match(route.match)]
    text = ", ".join(words) if words else "every request"
    if route.port is not None:
        text += f" (port {route.port})"
    return text


def _filter_names(filters: Sequence[pc.Filter]) -> tuple[str, ...]:
    out = []
    for f in filters:
        if f.request_mirror is not None:
            m = f.request_mirror
            out.append(f"RequestMirror to {m.service}:{m.port} ({m.percent:g}%)")
        elif f.request_redirect is not None:
            out.append(f"RequestRedirect ({f.request_redirect.status_code})")
        else:
            out.append(f.type)
    return tuple(out)


# --- settings, as the proxy resolves them ----------------------------------------------


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def retry_of(svc: pc.Service, route: pc.Route | None, *, tcp: bool = False) -> Retry:
    """The retry policy the proxy applies: route retry count/codes, then the called
    service's TrafficPolicy, then the safe default; built by `retry.RetryPolicy`."""
    if tcp:
        # Only connect failures: nothing was sent yet (the engine's tcp_call).
        tcp_policy = RetryPolicy(attempts=3, retry_on=frozenset({"connect-failure"}))
        return Retry(
            tcp_policy.attempts,
            tuple(sorted(tcp_policy.retry_on)),
            (),
            None,
            DEFAULT_BACKOFF,
            {},
            "opaque TCP: connect failures only",
        )
    tp = svc.policy
    rr = route.retry if route is not None else None
    pr = tp.retry if tp is not None else None
    retries: int | None = None
    source = "default: retry once when the first try never reached an upstream"
    if rr is not None and rr.attempts is not None:
        retries, source = rr.attempts, f"route {_route_label(route)}" if route else "route"
    elif pr is not None:
        retries, source = pr.attempts, f"TrafficPolicy {tp.name}" if tp else "TrafficPolicy"
    items: tuple[str, ...] = pr.retry_on if pr is not None and pr.retry_on else ()
    codes: set[int] = set(rr.codes) if rr is not None else set()
    if retries is None:
        attempts, conditions = 2, set(SAFE_RETRY_ON)
    else:
        attempts = min(retries, MAX_RETRIES) + 1
        if not items and not codes:
            items = DEFAULT_RETRY_ON
        try:
            conds, parsed = RetryPolicy.parse_retry_on(items)
        except RetryConfigError as e:
            raise ExplainError(f"retryOn of {svc.key}: {e}") from None
        conditions = set(conds) | set(SAFE_RETRY_ON)
        codes |= parsed
    per_try = pr.per_try_timeout if pr is not None else None
    if route is not None and route.timeouts is not None and route.timeouts.backend_request:
        per_try = route.timeouts.backend_request
    policy = RetryPolicy(
        attempts=attempts,
        per_try_timeout=per_try or None,
        retry_on=frozenset(conditions),
        status_codes=frozenset(codes),
    )
    budget = pr.budget if pr is not None and pr.budget is not None else pc.RetryBudget()
    return Retry(
        attempts=policy.attempts,
        retry_on=tuple(sorted(policy.retry_on)),
        status_codes=tuple(sorted(policy.status_codes)),
        per_try_timeout=policy.per_try_timeout,
        backoff_base=(rr.backoff if rr is not None and rr.backoff else DEFAULT_BACKOFF),
        budget={
            "percent": budget.percent,
            "min_retries_per_second": budget.min_retries_per_second,
            "window": budget.window,
        },
        source=source,
    )


def timeouts_of(svc: pc.Service, route: pc.Route | None, retry: Retry | None) -> Timeouts:
    tp = svc.policy
    rt = route.timeouts if route is not None else None
    request: float | None = None
    source = "none"
    if rt is not None and rt.request is not None:
        request, source = rt.request or None, f"route {_route_label(route)}" if route else ""
    elif tp is not None and tp.timeouts is not None and tp.timeouts.request is not None:
        request, source = tp.timeouts.request or None, f"TrafficPolicy {tp.name}"
    t = tp.timeouts if tp is not None else None
    return Timeouts(
        request=request,
        request_source=source if request is not None else "none",
        per_try=retry.per_try_timeout if retry is not None else None,
        connect=t.connect if t is not None else None,
        idle=t.idle if t is not None else None,
    )


def _lb(policy: pc.TrafficPolicy | None) -> dict[str, Any]:
    lb = policy.load_balancer if policy is not None else None
    if lb is None:
        return {"type": DEFAULT_LB, "consistent_hash": None}
    ch = pc.to_dict(lb.consistent_hash) if lb.consistent_hash is not None else None
    return {"type": lb.type, "consistent_hash": _drop_none(ch) if ch else None}


# --- mTLS and authorization at the destination ------------------------------------------


def _source_ip(src: pc.ProxyConfig, pod: str) -> str:
    for svc in src.services:
        for sp in svc.ports:
            for ep in sp.endpoints:
                if pod and ep.pod == pod:
                    return ep.ip
    return ""


def _source_meshed(src: pc.ProxyConfig, pod: str) -> bool | None:
    for svc in src.services:
        for sp in svc.ports:
            for ep in sp.endpoints:
                if pod and ep.pod == pod:
                    return ep.meshed
    return None


def _identity(src: pc.ProxyConfig) -> str:
    w = src.workload
    if w.identity:
        return w.identity
    if w.namespace and w.service_account:
        return pc.spiffe_id(src.mesh.trust_domain, w.namespace, w.service_account)
    return ""


def _mtls_and_authz(
    src: pc.ProxyConfig,
    req: Request,
    endpoint: pc.Endpoint | None,
    dst: pc.ProxyConfig | None,
    protocol: str,
    host: str,
) -> tuple[Mtls | None, Authorization | None]:
    if endpoint is None:
        return None, None
    if not endpoint.meshed:
        return (
            Mtls("none", "the destination has no sidecar", False, False),
            Authorization("NOT_ENFORCED", None, "the destination has no sidecar to enforce policy"),
        )
    if dst is None:
        return (
            Mtls("unknown", f"no config for {endpoint.pod or endpoint.ip}", True, False),
            Authorization("UNKNOWN", None, f"no config for {endpoint.pod or endpoint.ip}"),
        )
    pa = dst.inbound.peer_authentication
    mode = pa.mode_for(endpoint.port)
    # As proxy.upstream.plan decides: the caller's proxy speaks mTLS to every meshed
    # endpoint unless its mesh default is DISABLE; a caller without a sidecar
    # speaks plaintext.
    mutual = (
        src.mesh.default_mtls_mode != "DISABLE" and _source_meshed(src, req.source_pod) is not False
    )
    where = pa.source or "mesh default"
    if any(p.port == endpoint.port for p in pa.port_level):
        where += f" (port {endpoint.port})"
    mtls = Mtls(mode, where, mutual, refused=(mode == "STRICT" and not mutual))
    principal, namespace = principal_of(_identity(src) if mutual else None)
    peer = authz.Peer(principal, namespace, _source_ip(src, req.source_pod))
    areq = authz.Request(
        port=endpoint.port,
        protocol="http" if protocol in HTTP_PROTOCOLS else "tcp",
        method=req.method,
        path=req.path,
        host=req.headers.get("host", host),
        headers=req.headers,
    )
    policies = compiled_policies(dst)
    names = tuple(p.name for p in policies)
    decision = authz.decide(policies, peer, areq)
    if isinstance(decision, authz.Deny):
        return mtls, Authorization(
            "DENY", decision.policy, decision.reason, decision.audited_by, names
        )
    if decision.policy is not None:
        reason = f"allowed by policy {decision.policy}"
    elif names:
        reason = "no DENY policy matched and no ALLOW policy applies"
    else:
        reason = "no AuthorizationPolicy applies to the destination"
    return mtls, Authorization("ALLOW", decision.policy, reason, decision.audited_by, names)


def _pick_endpoint(port: pc.ServicePort, dst: Mapping[str, pc.ProxyConfig]) -> pc.Endpoint | None:
    ready = [e for e in port.endpoints if e.ready]
    for e in ready:
        if e.pod in dst:
            return e
    return ready[0] if ready else None


def _backend(
    src: pc.ProxyConfig,
    registry: Registry,
    caller: pc.Service,
    req: Request,
    dst: Mapping[str, pc.ProxyConfig],
    *,
    service_key: str,
    port: int,
    weight: int,
    percent: float,
    filters: tuple[str, ...],
    protocol: str,
    host: str,
) -> Backend:
    svc = registry.service(service_key)
    sp = svc.port(port) if svc is not None else None
    if svc is None or sp is None:
        problem = f"backend {service_key}:{port} is not a known service port"
        return Backend(
            service_key, port, weight, percent, filters, 0, 0, "", 0, _lb(None),
            None, None, "", None, None, problem,
        )  # fmt: skip
    # Balancing, breakers and ejection are the backend's; a backend without its own
    # TrafficPolicy gets none (the called service's applies to the called service).
    policy = svc.policy
    endpoint = _pick_endpoint(sp, dst)
    dst_config = dst.get(endpoint.pod) if endpoint is not None else None
    mtls, authorization = _mtls_and_authz(src, req, endpoint, dst_config, protocol, host)
    ready = sum(1 for e in sp.endpoints if e.ready)
    return Backend(
        service=service_key,
        port=port,
        weight=weight,
        percent=percent,
        filters=filters,
        endpoints_ready=ready,
        endpoints_total=len(sp.endpoints),
        pod=(endpoint.pod or endpoint.ip) if endpoint is not None else "",
        target_port=endpoint.port if endpoint is not None else 0,
        load_balancer=_lb(policy),
        circuit_breaker=_drop_none(pc.to_dict(policy.circuit_breaker))
        if policy is not None and policy.circuit_breaker is not None
        else None,
        outlier_detection=_drop_none(pc.to_dict(policy.outlier_detection))
        if policy is not None and policy.outlier_detection is not None
        else None,
        policy=policy.name if policy is not None else "",
        mtls=mtls,
        authorization=authorization,
        problem="" if ready else f"{service_key}:{port} has no ready endpoint",
    )


# --- resolving the destination --------------------------------------------------------


def _resolve(
    src: pc.ProxyConfig, registry: Registry, req: Request
) -> tuple[str, pc.Service | None, pc.ServicePort | None, pc.Endpoint | None, str]:
    """(resolution, service, port, endpoint, message) like the proxy's registry."""
    host = req.destination.strip().rstrip(".").lower()
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = False
    svc: pc.Service | None = None
    if is_ip:
        if req.port is None:
            for s in src.services:
                if host in s.cluster_ips and len(s.ports) == 1:
                    svc = s
            if svc is None:
                raise ExplainError(f"{host}: give a port (DST:PORT) for an IP destination")
            port = svc.ports[0].port
        else:
            port = req.port
        res = registry.resolve(host, port)
    else:
        ns = src.workload.namespace or "default"
        if "." not in host:
            svc = registry.service_by_host(f"{host}.{ns}")
        else:
            svc = registry.service_by_host(host) or registry.service_by_host(f"{host}.{ns}")
        if svc is None:
            res = (
                Refuse(f"{host} is not a known service (outboundPolicy REGISTRY_ONLY)")
                if src.mesh.outbound_policy == "REGISTRY_ONLY"
                else Passthrough()
            )
        else:
            port = _service_port(svc, req.port)
            if not svc.cluster_ips:
                # Headless: the application dials a Pod IP itself; explain the first.
                sp = svc.port(port)
                assert sp is not None
                ep = next((e for e in sp.endpoints if e.ready), None)
                res = ToEndpoint(svc, sp, ep) if ep is not None else ToService(svc, sp)
            else:
                res = registry.resolve(svc.cluster_ips[0], port)
    if isinstance(res, ToService):
        return "service", res.service, res.port, None, ""
    if isinstance(res, ToEndpoint):
        return "endpoint", res.service, res.port, res.endpoint, ""
    if isinstance(res, Refuse):
        return "refused", None, None, None, res.reason
    return "passthrough", None, None, None, ""


def _service_port(svc: pc.Service, wanted: int | None) -> int:
    numbers = [p.port for p in svc.ports]
    if wanted is not None:
        if wanted not in numbers:
            raise ExplainError(
                f"service {svc.key} has no port {wanted} (ports: "
                f"{', '.join(map(str, numbers)) or 'none'})"
            )
        return wanted
    if len(numbers) == 1:
        return numbers[0]
    if 80 in numbers:
        return 80
    raise ExplainError(
        f"service {svc.key} has ports {', '.join(map(str, numbers))}: say which, as DST:PORT"
    )


# --- the core --------------------------------------------------------------------------


def destination_pods(src_config: pc.ProxyConfig, request: Request) -> list[str]:
    """The Pods whose inbound config `explain` needs: one ready endpoint per backend
    the request may go to (the adapter fetches their configs)."""
    try:
        partial = explain(src_config, {}, request)
    except ExplainError:
        return []
    backends = partial.backends + (partial.tcp_fallback.backends if partial.tcp_fallback else ())
    return list(dict.fromkeys(b.pod for b in backends if b.pod and "/" in b.pod))


def explain(
    src_config: pc.ProxyConfig,
    dst_configs: Mapping[str, pc.ProxyConfig] | pc.ProxyConfig | None,
    request: Request,
    *,
    opaque_ports: frozenset[int] = ports.SERVER_FIRST_PORTS,
) -> Explanation:
    """What the source Pod's proxy, then the destination's, do with `request`.

    `dst_configs` are destination Pods' configs by "<namespace>/<name>" (or one
    config used for every destination Pod); without one, the inbound side
    (mTLS mode, authorization) is reported as unknown. `opaque_ports` are the
    source proxy's (its default, plus the Pod's `synchro.dev/opaque-ports`).
    """
    if isinstance(dst_configs, pc.ProxyConfig):
        single = dst_configs
        dst: Mapping[str, pc.ProxyConfig] = _Everyone(single)
    else:
        dst = dst_configs or {}
    registry = Registry(src_config)
    identity = _identity(src_config)
    source = {
        "pod": request.source_pod,
        "namespace": src_config.workload.namespace,
        "identity": identity,
        "ip": _source_ip(src_config, request.source_pod),
        "config_version": src_config.version,
    }
    notes: list[str] = []
    if _source_meshed(src_config, request.source_pod) is False:
        notes.append(
            "the source Pod runs no sidecar: its traffic bypasses the mesh, none of this applies"
        )
    resolution, svc, sp, endpoint, message = _resolve(src_config, registry, request)
    host = request.destination
    destination = {"host": host, "port": request.port}
    empty: dict[str, Any] = dict(
        routes=(),
        route=None,
        route_filters=(),
        backends=(),
        retry=None,
        timeouts=None,
        fault_injection=None,
        rate_limit=None,
    )
    if svc is None or sp is None:
        if resolution == "refused":
            verdict = f"refused by the source proxy: {message}"
            return Explanation(
                source, destination, resolution, None, request.port, "unknown",
                outcome="refused", status=502, verdict=verdict, notes=tuple(notes), **empty,
            )  # fmt: skip
        verdict = (
            f"{host} is not a mesh service: sent as is to the original destination "
            "(outboundPolicy ALLOW_ANY); no route, retry or policy applies"
        )
        return Explanation(
            source, destination, resolution, None, request.port, "unknown",
            outcome="forwarded", status=None, verdict=verdict, notes=tuple(notes), **empty,
        )  # fmt: skip
    port = endpoint.port if resolution == "endpoint" and endpoint is not None else sp.port
    detection = port_detection(sp.protocol, port, opaque_ports)
    destination = {"host": host, "port": sp.port, "service": svc.key, "protocol": sp.protocol}
    if detection == OPAQUE:
        notes.append(
            f"port {port} is opaque in the proxy (a server-first protocol, or the source "
            "Pod's synchro.dev/opaque-ports): no protocol detection, it goes as TCP"
        )
        return _explain_service(
            src_config, dst, request, registry, source, destination, resolution, svc, sp,
            endpoint, notes, protocol="tcp", detection=OPAQUE,
        )  # fmt: skip
    protocol = "grpc" if request.grpc else "http" if detection == DETECTED else sp.protocol
    if detection == DECLARED:
        return _explain_service(
            src_config, dst, request, registry, source, destination, resolution, svc, sp,
            endpoint, notes, protocol=protocol, detection=DECLARED,
        )  # fmt: skip
    # Nothing declared: the listener sniffs, so the same port carries HTTP (routes
    # apply) or anything else (opaque TCP); both answers, the HTTP one first.
    notes.append(
        f"port {sp.port} declares {'no protocol' if sp.protocol == 'tcp' else sp.protocol} "
        "(name/appProtocol): the proxy detects it at runtime; HTTP routes apply if the "
        "client speaks HTTP, other bytes go as opaque TCP (see the TCP fallback)"
    )
    tcp = _explain_service(
        src_config, dst, request, registry, source, destination, resolution, svc, sp,
        endpoint, [], protocol="tcp", detection=DETECTED,
    )  # fmt: skip
    answer = _explain_service(
        src_config, dst, request, registry, source, destination, resolution, svc, sp,
        endpoint, notes, protocol=protocol, detection=DETECTED,
    )  # fmt: skip
    fallback = TcpFallback(
        tcp.backends, tcp.retry, tcp.timeouts, tcp.outcome, tcp.status, tcp.verdict
    )
    return dataclasses.replace(answer, tcp_fallback=fallback)


def port_detection(declared: str, port: int, opaque_ports: frozenset[int]) -> str:
    """How the source proxy's listener decides the protocol of a connection to
    `port` (proxy/listener.py): opaque ports skip detection; every other port is
    sniffed (proxy/detect.py), whatever the Service declares."""
    if port in opaque_ports:
        return OPAQUE
    return DECLARED if declared in HTTP_PROTOCOLS else DETECTED


def _explain_service(
    src_config: pc.ProxyConfig,
    dst: Mapping[str, pc.ProxyConfig],
    request: Request,
    registry: Registry,
    source: dict[str, Any],
    destination: dict[str, Any],
    resolution: str,
    svc: pc.Service,
    sp: pc.ServicePort,
    endpoint: pc.Endpoint | None,
    notes: list[str],
    *,
    protocol: str,
    detection: str,
) -> Explanation:
    """A service port's answer for a client speaking `protocol`."""
    host = request.destination
    http = protocol in HTTP_PROTOCOLS
    fault = (
        pc.to_dict(svc.policy.fault_injection)
        if svc.policy and svc.policy.fault_injection
        else None
    )
    rate = pc.to_dict(svc.policy.rate_limit) if svc.policy and svc.policy.rate_limit else None

    if resolution == "endpoint":
        assert endpoint is not None
        # A Pod called by its IP: no route; the one endpoint, retried in place.
        dst_config = dst.get(endpoint.pod)
        mtls, authorization = _mtls_and_authz(
            src_config, request, endpoint, dst_config, protocol, host
        )
        b = Backend(
            svc.key, sp.port, 1, 100.0, (), 1, 1, endpoint.pod or endpoint.ip, endpoint.port,
            _lb(svc.policy), None, None, svc.policy.name if svc.policy else "", mtls,
            authorization,
        )  # fmt: skip
        return _finish(
            source, destination, resolution, svc, sp, protocol, (), None, (), (b,),
            None, None, fault, rate, notes,
            f"sent to endpoint {endpoint.ip}:{endpoint.port} ({b.pod}) directly, no routing",
            detection=detection,
        )  # fmt: skip

    routes = tuple(r for r in svc.routes if r.port is None or r.port == sp.port) if http else ()
    checks: list[RouteCheck] = []
    chosen: pc.Route | None = None
    if routes:
        view = RequestView.from_target(request.method, request.path, request.headers)
        table = RouteTable(routes)
        compiled = table.match(view, sp.port)
        chosen = compiled.route if compiled is not None else None
        for r in routes:
            if r is chosen:
                checks.append(
                    RouteCheck(
                        _route_label(r),
                        r.kind,
                        _match_words(r),
                        True,
                        "first match in precedence order",
                    )
                )
                break
            checks.append(
                RouteCheck(_route_label(r), r.kind, _match_words(r), False, _why_not(r, view))
            )
        if chosen is None:
            return Explanation(
                source, destination, resolution, svc.key, sp.port, protocol, tuple(checks),
                None, (), (), None, None, fault, rate, "no-route", 404,
                f"no route of {svc.key} matches: the source proxy answers 404", tuple(notes),
                detection,
            )  # fmt: skip
    elif svc.routes and not http and detection != DETECTED:
        notes.append(f"port {sp.port} carries TCP: HTTP routes do not apply")

    tcp = not http
    retry = retry_of(svc, chosen, tcp=tcp)
    timeouts = timeouts_of(svc, chosen, retry) if not tcp else timeouts_of(svc, None, None)
    backends: list[Backend] = []
    route_filters: tuple[str, ...] = ()
    if chosen is None:
        backends.append(
            _backend(
                src_config, registry, svc, request, dst, service_key=svc.key, port=sp.port,
                weight=1, percent=100.0, filters=(), protocol=protocol, host=host,
            )
        )  # fmt: skip
    else:
        route_filters = _filter_names(chosen.filters)
        compiled_one = RouteTable([chosen]).routes[0]
        total = compiled_one.cumulative[-1] if compiled_one.cumulative else 0
        for wb in chosen.backends:
            backends.append(
                _backend(
                    src_config, registry, svc, request, dst, service_key=wb.service,
                    port=wb.port, weight=wb.weight,
                    percent=round(100.0 * wb.weight / total, 2) if total else 0.0,
                    filters=_filter_names(wb.filters), protocol=protocol, host=host,
                )
            )  # fmt: skip
        redirect = next((f.request_redirect for f in chosen.filters if f.request_redirect), None)
        if redirect is not None:
            return _finish(
                source, destination, resolution, svc, sp, protocol, tuple(checks),
                _route_label(chosen), route_filters, tuple(backends), retry, timeouts, fault,
                rate, notes, f"redirected by route {_route_label(chosen)}",
                outcome="redirect", status=redirect.status_code, detection=detection,
            )  # fmt: skip
        if total == 0:
            return _finish(
                source, destination, resolution, svc, sp, protocol, tuple(checks),
                _route_label(chosen), route_filters, tuple(backends), retry, timeouts, fault,
                rate, notes, f"route {_route_label(chosen)} has no backend with weight: 500",
                outcome="no-backend", status=500, detection=detection,
            )  # fmt: skip
    return _finish(
        source, destination, resolution, svc, sp, protocol, tuple(checks),
        _route_label(chosen) if chosen else None, route_filters, tuple(backends), retry,
        timeouts, fault, rate, notes, "", detection=detection,
    )  # fmt: skip


class _Everyone(Mapping[str, pc.ProxyConfig]):
    """One destination config standing for every destination Pod."""

    def __init__(self, config: pc.ProxyConfig) -> None:
        self.config = config

    def __getitem__(self, key: str) -> pc.ProxyConfig:
        return self.config

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


def _finish(
    source: dict[str, Any],
    destination: dict[str, Any],
    resolution: str,
    svc: pc.Service,
    sp: pc.ServicePort,
    protocol: str,
    checks: tuple[RouteCheck, ...],
    route: str | None,
    route_filters: tuple[str, ...],
    backends: tuple[Backend, ...],
    retry: Retry | None,
    timeouts: Timeouts | None,
    fault: dict[str, Any] | None,
    rate: dict[str, Any] | None,
    notes: list[str],
    verdict: str,
    *,
    outcome: str = "",
    status: int | None = None,
    detection: str = DECLARED,
) -> Explanation:
    if not outcome:
        outcome, status, verdict = _outcome(backends, retry, verdict, protocol == "grpc")
    if fault is not None:
        notes.append("fault injection is configured for this service (see fault_injection)")
    if rate is not None:
        notes.append("an inbound rate limit applies at the destination (429 when exceeded)")
    return Explanation(
        source, destination, resolution, svc.key, sp.port, protocol, checks, route,
        route_filters, backends, retry, timeouts, fault, rate, outcome, status, verdict,
        tuple(notes), detection,
    )  # fmt: skip


def _outcome(
    backends: tuple[Backend, ...], retry: Retry | None, verdict: str, grpc: bool
) -> tuple[str, int | None, str]:
    """The most likely backend decides (highest weight, the first on a tie)."""
    live = [b for b in backends if b.weight > 0] or list(backends)
    if not live:
        return "no-backend", 500, "no backend"
    b = max(live, key=lambda x: x.weight)
    share = f" ({b.percent:g}% of requests)" if len(live) > 1 else ""
    if b.problem and not b.endpoints_ready:
        return "no-backend", 503, f"{b.problem}: the source proxy answers 503{share}"
    if b.mtls is not None and b.mtls.refused:
        return "reset", None, f"{b.pod} requires mTLS (STRICT): the connection is refused{share}"
    if b.authorization is not None and b.authorization.decision == "DENY":
        answer = "403 (gRPC PERMISSION_DENIED)" if grpc else "403"
        return "denied", 403, f"denied at {b.pod}: {b.authorization.reason}: {answer}{share}"
    tries = f", up to {retry.attempts} attempts" if retry is not None else ""
    base = verdict or f"sent to {b.service}:{b.port}"
    return "forwarded", None, f"{base}{share}{tries}; allowed at the destination"


# --- rendering for people -----------------------------------------------------------------


def _seconds(v: float | None) -> str:
    return "-" if v is None else f"{v:g}s"


def render_text(e: dict[str, Any]) -> str:
    lines: list[str] = []

    def row(label: str, value: str) -> None:
        lines.append(f"{label + ':' if label else '':<19}{value}")

    src = e["source"]
    ident = f" ({src['identity']})" if src.get("identity") else ""
    row("Source", f"{src.get('pod') or '-'}{ident}")
    dst = e["destination"]
    target = f"{dst['host']}" + (f":{dst['port']}" if dst.get("port") else "")
    if e["service"]:
        target += f" -> service {e['service']} port {e['port']} ({_protocol_words(e)})"
    else:
        target += f" -> {e['resolution']}"
    row("Destination", target)
    for check in e["routes"]:
        mark = output.mark(check["matched"])
        row(
            "Route" if check is e["routes"][0] else "",
            f"{mark} {check['route']}: {check['matches']}",
        )
        lines.append(f"{'':19}    {check['why']}")
    if e["service"] and not e["routes"]:
        why = " (opaque TCP: HTTP routes do not apply)" if e["protocol"] == "tcp" else ""
        row("Route", f"none: the service's own endpoints{why}")
    if e["route_filters"]:
        row("Filters", ", ".join(e["route_filters"]))
    for i, b in enumerate(e["backends"]):
        label = "Backends" if i == 0 else ""
        ready = f"{b['endpoints_ready']}/{b['endpoints_total']} endpoints ready"
        row(label, f"{b['service']}:{b['port']}  weight {b['weight']} ({b['percent']:g}%)  {ready}")
        lb = b["load_balancer"]
        lb_text = lb["type"] + (f" on {lb['consistent_hash']}" if lb.get("consistent_hash") else "")
        extra = f" [{b['policy']}]" if b["policy"] else ""
        lines.append(f"{'':19}    load balancer {lb_text}{extra}")
        if b["circuit_breaker"]:
            cb = ", ".join(f"{k} {v}" for k, v in b["circuit_breaker"].items())
            lines.append(f"{'':19}    circuit breaker {cb}")
        if b["outlier_detection"]:
            od = ", ".join(f"{k} {v}" for k, v in b["outlier_detection"].items())
            lines.append(f"{'':19}    outlier detection {od}")
        if b["filters"]:
            lines.append(f"{'':19}    filters {', '.join(b['filters'])}")
        if b["mtls"]:
            m = b["mtls"]
            how = "mutual TLS" if m["mutual_tls"] else "plaintext"
            if m["refused"]:
                how += ", refused"
            lines.append(
                f"{'':19}    mTLS at {b['pod']}:{b['target_port']}: {m['mode']} ({m['source']}), {how}"
            )
        if b["authorization"]:
            a = b["authorization"]
            applies = f" (policies: {', '.join(a['policies'])})" if a["policies"] else ""
            lines.append(f"{'':19}    authorization {a['decision']}: {a['reason']}{applies}")
            if a["audited_by"]:
                lines.append(f"{'':19}    audited by {', '.join(a['audited_by'])}")
        if b["problem"]:
            lines.append(f"{'':19}    {output.FAIL_MARK} {b['problem']}")
    r = e["retry"]
    if r:
        on = ", ".join([*r["retry_on"], *map(str, r["status_codes"])])
        row(
            "Retry",
            f"{r['attempts']} attempts on {on}; per try {_seconds(r['per_try_timeout'])}, "
            f"backoff from {r['backoff_base'] * 1000:g}ms ({r['source']})",
        )
        bud = r["budget"]
        if bud:
            lines.append(
                f"{'':19}budget {bud['percent']:g}% of requests + "
                f"{bud['min_retries_per_second']:g}/s over {bud['window']:g}s"
            )
    t = e["timeouts"]
    if t:
        src_text = f" ({t['request_source']})" if t["request"] is not None else ""
        row(
            "Timeouts",
            f"request {_seconds(t['request'])}{src_text}, per try {_seconds(t['per_try'])}, "
            f"connect {_seconds(t['connect'])}, idle {_seconds(t['idle'])}",
        )
    if e["fault_injection"]:
        row("Fault injection", str(e["fault_injection"]))
    if e["rate_limit"]:
        row("Rate limit", str(e["rate_limit"]))
    fallback = e.get("tcp_fallback")
    if fallback:
        row("TCP fallback", "a client that does not speak HTTP: opaque TCP, no route")
        for b in fallback["backends"]:
            ready = f"{b['endpoints_ready']}/{b['endpoints_total']} endpoints ready"
            lines.append(f"{'':19}    {b['service']}:{b['port']}  {ready}")
            if b["authorization"]:
                a = b["authorization"]
                lines.append(f"{'':19}    authorization {a['decision']}: {a['reason']}")
        lines.append(f"{'':19}    {fallback['verdict']}")
    for note in e["notes"]:
        row("Note", note)
    row("Verdict", e["verdict"])
    return "\n".join(lines) + "\n"


def _protocol_words(e: Mapping[str, Any]) -> str:
    detection = e.get("detection", DECLARED)
    if detection == DETECTED:
        return (
            f"{e['destination'].get('protocol', 'tcp')} declared; detected at runtime: "
            "HTTP routes apply if the client speaks HTTP"
        )
    if detection == OPAQUE:
        return "opaque TCP: no protocol detection on this port"
    return str(e["protocol"])


# --- the command -----------------------------------------------------------------------------


def parse_pod(text: str) -> tuple[str, str]:
    namespace, sep, name = text.partition("/")
    if not sep:
        namespace, name = "default", text
    if not namespace or not name or "/" in name:
        raise CommandError(f"{text!r}: expected a Pod as NAMESPACE/NAME or NAME (in default)")
    return namespace, name


def parse_destination(text: str) -> tuple[str, int | None]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise CommandError(f"{text!r}: expected DST[:PORT]")
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise CommandError(f"{text!r}: the port must be a number within 1..65535")
        return host, int(port_text)
    return host, None


def parse_headers(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise CommandError(f"-H {item!r}: expected NAME:VALUE, e.g. -H x-canary:true")
        out[name.strip().lower()] = value.strip()
    return out


def fetch_config(client: controller_api.ControllerClient, pod: str) -> tuple[pc.ProxyConfig, bool]:
    namespace, name = pod.split("/", 1)
    data = client.get(f"/v1/config/{namespace}/{name}")
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise CommandError(f"{client.where}: unexpected answer for the config of {pod}")
    try:
        return pc.ProxyConfig.from_dict(data["config"]), bool(data.get("known"))
    except pc.ConfigError as e:
        raise CommandError(f"the config of {pod} does not parse: {e}") from None


def cmd_explain(args: argparse.Namespace) -> int:
    namespace, name = parse_pod(args.source)
    host, port = parse_destination(args.destination)
    path = args.path or "/"
    if not path.startswith("/"):
        raise CommandError(f"{path!r}: the path must start with '/'")
    request = Request(
        destination=host,
        port=port,
        path=path.partition("?")[0],
        method=args.method.upper(),
        headers=parse_headers(args.header or ()),
        source_pod=f"{namespace}/{name}",
    )
    client = controller_api.client_from_args(args)
    src, known = fetch_config(client, request.source_pod)
    if not known:
        raise CommandError(
            f"the controller knows no Pod {request.source_pod} (see `synchro status`)"
        )
    dst: dict[str, pc.ProxyConfig] = {}
    for pod in destination_pods(src, request):
        if pod not in dst:
            dst[pod] = fetch_config(client, pod)[0]
    try:
        result = explain(src, dst, request)
    except ExplainError as e:
        raise CommandError(str(e)) from None
    output.emit(result.to_dict(), args.output, table=render_text)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain",
        help="which route, backends, retries, timeouts, mTLS and authorization apply to a request",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC_POD", help="the calling Pod: NAMESPACE/NAME or NAME")
    p.add_argument(
        "destination",
        metavar="DST[:PORT]",
        help="a Service name (short names in the source Pod's namespace) or an IP",
    )
    p.add_argument("path", metavar="PATH", nargs="?", default="/", help="request path (default /)")
    p.add_argument("-X", "--method", default="GET", help="request method (default GET)")
    p.add_argument(
        "-H",
        "--header",
        action="append",
        metavar="NAME:VALUE",
        help="a request header (repeatable)",
    )
    output.add_output_flag(p)
    controller_api.add_controller_flags(p)
    p.set_defaults(func=cmd_explain)
