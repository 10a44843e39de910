"""Services on the local node: endpoints, names and a ClusterIP fallback (pure).

In a meshed Pod the proxy catches a connection to a ClusterIP (iptables
REDIRECT in the Pod's own namespace) and picks an endpoint itself; routing
never sees the ClusterIP. Two kinds of traffic do reach the network with a
ClusterIP as destination: connections from Pods without a proxy, and
connections a proxy passes through unchanged (a Service it has no config for
yet, `ALLOW_ANY`). Pods route everything through the node namespace (their
default gateway is the bridge), so the node does what kube-proxy does:

- `nat PREROUTING` (and `OUTPUT`, for the node's own processes) DNATs
  `ClusterIP:port` to a ready endpoint's `podIP:targetPort`, chosen at random
  per connection (`-m statistic`, kube-proxy's iptables mode);
- `nat POSTROUTING` masquerades what was DNATed: client and endpoint share the
  bridge, and without it the endpoint would answer the client directly from its
  own address, which the client would drop;
- a ClusterIP without ready endpoints is not routed anywhere, so the client
  gets "network unreachable" at once.

The node namespace belongs to one mesh, so the whole `nat` table is written
with `iptables-restore` (atomic; no stale per-Service chains to hunt down).
ClusterIPs themselves are the controller's (`GET /v1/services`): its compiler
allocates them (10.96.0.0/12, a hash of namespace/name) and the proxies use the
same table, so there is exactly one source of truth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from synchro.local.hosts import PodAddress, ServiceAddress
from synchro.local.manifests import PodSpec, ServicePort, ServiceSpec


@dataclass(frozen=True)
class RunningPod:
    """What the node knows about a Pod it runs."""

    spec: PodSpec
    ip: str
    ready: bool


@dataclass(frozen=True)
class Backend:
    ip: str
    port: int


@dataclass(frozen=True)
class ServiceRule:
    """`cluster_ip:port/protocol` of Service `ref`, and where it goes."""

    ref: str
    cluster_ip: str
    port: int
    protocol: str
    backends: tuple[Backend, ...]

    @property
    def chain(self) -> str:
        digest = hashlib.sha256(
            f"{self.ref}|{self.cluster_ip}|{self.port}|{self.protocol}".encode()
        ).hexdigest()
        return f"SYNCHRO-SVC-{digest[:12].upper()}"


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """A Service's selector; an absent or empty one manages no endpoints (as in Kubernetes)."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def target_port(port: ServicePort, pod: PodSpec) -> int | None:
    """The Pod port a Service port means: a number, or a named container port."""
    if isinstance(port.target_port, int):
        return port.target_port
    spec = pod.manifest.get("spec") or {}
    for container in spec.get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == port.target_port:
                number = declared.get("containerPort")
                return number if isinstance(number, int) else None
    return None


def endpoints(service: ServiceSpec, pods: Iterable[RunningPod]) -> list[tuple[RunningPod, bool]]:
    """The Pods behind `service`, each with whether it is ready."""
    return [
        (p, p.ready)
        for p in pods
        if p.spec.namespace == service.namespace and selects(service.selector, p.spec.labels)
    ]


def service_rules(
    services: Iterable[ServiceSpec],
    cluster_ips: Mapping[str, Sequence[str]],
    pods: Sequence[RunningPod],
) -> list[ServiceRule]:
    """One rule per ClusterIP and port, with the ready endpoints behind it."""
    out: list[ServiceRule] = []
    for svc in sorted(services, key=lambda s: s.ref):
        ips = [ip for ip in cluster_ips.get(svc.ref, ()) if ":" not in ip]
        if svc.headless or not ips:
            continue
        ready = [p for p, ok in endpoints(svc, pods) if ok]
        for port in svc.ports:
            protocol = port.protocol.lower()
            if protocol not in ("tcp", "udp", "sctp"):
                continue
            backends = []
            for p in sorted(ready, key=lambda p: p.ip):
                number = target_port(port, p.spec)
                if number is not None:
                    backends.append(Backend(p.ip, number))
            out.extend(ServiceRule(svc.ref, ip, port.port, protocol, tuple(backends)) for ip in ips)
    return out


def nat_table(rules: Iterable[ServiceRule]) -> str:
    """The node namespace's whole `nat` table, for `iptables-restore`."""
    rules = list(rules)
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":SYNCHRO-SERVICES - [0:0]",
    ]
    with_backends = [r for r in rules if r.backends]
    lines.extend(f":{r.chain} - [0:0]" for r in with_backends)
    lines += [
        "-A PREROUTING -j SYNCHRO-SERVICES",
        "-A OUTPUT -j SYNCHRO-SERVICES",
        "-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE",
    ]
    for r in with_backends:
        comment = f"{r.ref}:{r.port}"
        lines.append(
            f"-A SYNCHRO-SERVICES -d {r.cluster_ip}/32 -p {r.protocol} -m {r.protocol} "
            f'--dport {r.port} -m comment --comment "{comment}" -j {r.chain}'
        )
        n = len(r.backends)
        for i, b in enumerate(r.backends):
            pick = (
                f"-m statistic --mode random --probability {1 / (n - i):.10f} " if i < n - 1 else ""
            )
            lines.append(
                f"-A {r.chain} -p {r.protocol} {pick}-j DNAT --to-destination {b.ip}:{b.port}"
            )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def addresses(
    services: Iterable[ServiceSpec],
    cluster_ips: Mapping[str, Sequence[str]],
    pods: Sequence[RunningPod],
) -> tuple[list[ServiceAddress], list[PodAddress]]:
    """What the hosts files map: ClusterIPs, headless Services' ready Pods, and
    StatefulSet Pods (hostname + subdomain) by their own names."""
    svc_out: list[ServiceAddress] = []
    for svc in services:
        if svc.headless:
            ips = tuple(sorted(p.ip for p, ok in endpoints(svc, pods) if ok))
        else:
            ips = tuple(cluster_ips.get(svc.ref, ()))
        if ips:
            svc_out.append(ServiceAddress(svc.namespace, svc.name, ips))
    pod_out: list[PodAddress] = []
    for p in pods:
        spec = p.spec.manifest.get("spec") or {}
        hostname, subdomain = spec.get("hostname"), spec.get("subdomain")
        if isinstance(hostname, str) and isinstance(subdomain, str) and hostname and subdomain:
            pod_out.append(PodAddress(p.spec.namespace, hostname, subdomain, p.ip))
    return svc_out, pod_out
