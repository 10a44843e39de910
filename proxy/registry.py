"""Lookup index over one ProxyConfig: where an outbound connection goes.

Built once per config (the config client builds it next to the config and swaps
both together), then only read: `ClusterIP:port -> service`, `PodIP:port ->
endpoint` (headless services, and Pods called directly), `service -> ready
endpoints` with a round-robin pick, and the ALLOW_ANY / REGISTRY_ONLY decision
for destinations it does not know. Pure: no sockets, no logging.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.config import Endpoint, ProxyConfig, Service, ServicePort


@dataclass(frozen=True, slots=True)
class ToService:
    """The destination is a service's ClusterIP: balance over its endpoints."""

    service: Service
    port: ServicePort


@dataclass(frozen=True, slots=True)
class ToEndpoint:
    """The destination is one known Pod (a headless service, or a Pod IP)."""

    service: Service
    port: ServicePort
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Unknown destination, ALLOW_ANY: connect to the original destination."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Unknown destination, REGISTRY_ONLY: 502 for HTTP, a reset for TCP."""

    reason: str


Resolution = ToService | ToEndpoint | Passthrough | Refuse


def _norm_ip(ip: str) -> str:
    # "::ffff:10.0.0.1" (IPv4-mapped, as a dual-stack socket reports it) and
    # "10.0.0.1" are the same destination.
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class Registry:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._by_vip: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
        self._by_pod: dict[tuple[str, int], tuple[Service, ServicePort, Endpoint]] = {}
        self._by_key: dict[str, Service] = {}
        self._by_host: dict[str, Service] = {}
        self._ready: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
        self._rr: dict[tuple[str, int], int] = {}
        domain = config.mesh.trust_domain
        for svc in config.services:
            self._by_key[svc.key] = svc
            for host in _hostnames(svc, domain):
                self._by_host.setdefault(host, svc)
            for sp in svc.ports:
                self._ready[(svc.key, sp.port)] = tuple(e for e in sp.endpoints if e.ready)
                for ip in svc.cluster_ips:
                    self._by_vip[(_norm_ip(ip), sp.port)] = (svc, sp)
                for ep in sp.endpoints:
                    # A Pod IP reached on its own port: the first service that
                    # names it wins (a Pod behind two services is the same Pod).
                    self._by_pod.setdefault((_norm_ip(ep.ip), ep.port), (svc, sp, ep))
                    if svc.headless:
                        # Headless clients dial the Pod IP with the service port.
                        self._by_pod.setdefault((_norm_ip(ep.ip), sp.port), (svc, sp, ep))

    @property
    def version(self) -> str:
        return self.config.version

    def service(self, key: str) -> Service | None:
        """A service by "<namespace>/<name>"."""
        return self._by_key.get(key)

    def service_by_host(self, host: str) -> Service | None:
        """A service by DNS name: name.ns, name.ns.svc, name.ns.svc.<domain>."""
        return self._by_host.get(host.lower().rstrip("."))

    def resolve(self, ip: str, port: int) -> Resolution:
        try:
            key = (_norm_ip(ip), port)
        except ValueError:
            return self._unknown(f"{ip}:{port} is not an IP destination")
        hit = self._by_vip.get(key)
        if hit is not None:
            return ToService(hit[0], hit[1])
        pod = self._by_pod.get(key)
        if pod is not None:
            return ToEndpoint(*pod)
        return self._unknown(f"{ip}:{port} is not a known service or endpoint")

    def _unknown(self, reason: str) -> Resolution:
        if self.config.mesh.outbound_policy == "REGISTRY_ONLY":
            return Refuse(f"{reason} (outboundPolicy REGISTRY_ONLY)")
        return Passthrough()

    def ready_endpoints(self, service_key: str, port: int) -> tuple[Endpoint, ...]:
        return self._ready.get((service_key, port), ())

    def pick(self, service_key: str, port: int) -> Endpoint | None:
        """Round robin over the ready endpoints of a service port; None if none."""
        eps = self._ready.get((service_key, port), ())
        if not eps:
            return None
        k = (service_key, port)
        i = self._rr.get(k, 0)
        self._rr[k] = i + 1
        return eps[i % len(eps)]


def _hostnames(svc: Service, domain: str) -> tuple[str, ...]:
    base = f"{svc.name}.{svc.namespace}"
    # The DNS domain is almost always the trust domain; cluster.local covers the rest.
    return (base, f"{base}.svc", f"{base}.svc.{domain}", f"{base}.svc.cluster.local")
