"""The proxy's security state: its certificate (through `Enrollment`), the config
in force (PeerAuthentication, AuthorizationPolicies, which endpoints are meshed,
the trust bundle), and the compiled authorization policies.

The process entry makes one `MeshSecurity`, attaches it to the `ProxyContext`
(`attach(ctx, security)`), starts its enrollment and registers
`security.on_config` with the config client. The listener (inbound mTLS),
`proxy.upstream` (outbound mTLS) and the HTTP handlers (authorization, XFCC)
find it with `security_for(ctx)`; without one the proxy runs plaintext and
allows everything, as before.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from proxy import config as pc
from proxy.conn import ProxyContext
from proxy.registry import Registry, ToEndpoint
from proxy.security import authz
from proxy.security.enroll import ENV_TOKEN_FILE, Enrollment, EnrollSettings, TLSMaterial
from proxy.telemetry.telemetry import workload_name

log = logging.getLogger(__name__)

DISABLE = "DISABLE"
PERMISSIVE = "PERMISSIVE"
STRICT = "STRICT"


class SnapshotLike(Protocol):
    @property
    def config(self) -> pc.ProxyConfig: ...

    @property
    def registry(self) -> Registry: ...


def policy_spec(policy: pc.AuthorizationPolicy) -> dict[str, Any]:
    """The proxy config's AuthorizationPolicy back in Istio's spec shape, for
    `authz.compile_policy` (empty lists mean "not given")."""

    def put(out: dict[str, Any], key: str, values: tuple[str, ...]) -> None:
        if values:
            out[key] = list(values)

    rules = []
    for rule in policy.rules:
        froms = []
        for s in rule.from_:
            src: dict[str, Any] = {}
            put(src, "principals", s.principals)
            put(src, "notPrincipals", s.not_principals)
            put(src, "namespaces", s.namespaces)
            put(src, "notNamespaces", s.not_namespaces)
            put(src, "ipBlocks", s.ip_blocks)
            put(src, "notIpBlocks", s.not_ip_blocks)
            froms.append({"source": src})
        tos = []
        for o in rule.to:
            op: dict[str, Any] = {}
            for name in ("hosts", "ports", "methods", "paths"):
                put(op, name, getattr(o, name))
                put(op, "not" + name.capitalize(), getattr(o, "not_" + name))
            tos.append({"operation": op})
        whens = []
        for c in rule.when:
            cond: dict[str, Any] = {"key": c.key}
            put(cond, "values", c.values)
            put(cond, "notValues", c.not_values)
            whens.append(cond)
        rules.append({"from": froms, "to": tos, "when": whens})
    return {"action": policy.action, "rules": rules}


def compile_policies(policies: tuple[pc.AuthorizationPolicy, ...]) -> tuple[authz.Policy, ...]:
    """Compiled policies; one that does not compile becomes a DENY-all, so that a
    broken policy fails closed instead of silently allowing."""
    out = []
    for p in policies:
        try:
            out.append(authz.compile_policy(p.name, policy_spec(p)))
        except authz.AuthzPolicyError as exc:
            log.error(
                "AuthorizationPolicy %s does not compile (%s): denying all requests", p.name, exc
            )
            out.append(authz.Policy(p.name, authz.Action.DENY, (authz.Rule(),)))
    return tuple(out)


class MeshSecurity:
    def __init__(
        self, enrollment: Enrollment | None = None, own_ips: frozenset[str] = frozenset()
    ) -> None:
        self.enrollment = enrollment
        # The Pod's own addresses (POD_IP/POD_IPS): calls to them stay plaintext.
        self.own_ips = own_ips
        self.snapshot: SnapshotLike | None = None
        self.policies: tuple[authz.Policy, ...] = ()
        # For tests and tools without an enrollment: material set directly.
        self.static_material: TLSMaterial | None = None
        self._described: dict[str, tuple[str, str, str, str] | None] = {}

    @classmethod
    def from_env(cls, env: Mapping[str, str], controller: str = "") -> MeshSecurity | None:
        """The proxy's security from the webhook's environment (see
        `EnrollSettings.from_env`); None for a standalone proxy (no controller)."""
        if controller:
            env = {**env, "SYNCHRO_CONTROLLER": controller}
        settings = EnrollSettings.from_env(env)
        if settings is None:
            return None
        if not env.get(ENV_TOKEN_FILE, "").strip() and not settings.token_file.exists():
            # The webhook always mounts a token and names it; a proxy started
            # by hand without one runs without an identity, as before.
            log.info(
                "no ServiceAccount token at %s: no workload identity, mTLS off", settings.token_file
            )
            return None
        ips = {env.get("POD_IP", "").strip()}
        ips.update(ip.strip() for ip in env.get("POD_IPS", "").split(","))
        return cls(Enrollment(settings), frozenset(ip for ip in ips if ip))

    def start(self) -> None:
        if self.enrollment is not None:
            self.enrollment.start()

    def on_certificate(self, listener: Callable[[TLSMaterial], None]) -> None:
        """Call `listener` with the workload certificate in force now (if any) and
        with every new one (first enrollment, renewal, trust bundle change)."""
        if self.enrollment is not None:
            self.enrollment.listeners.append(listener)
        current = self.enrollment.material if self.enrollment else self.static_material
        if current is not None:
            listener(current)

    async def stop(self) -> None:
        if self.enrollment is not None:
            await self.enrollment.stop()

    # --- inputs -------------------------------------------------------------------

    def on_config(self, snapshot: SnapshotLike) -> None:
        """ConfigClient listener: the new config's policies and trust bundle."""
        config = snapshot.config
        self.policies = compile_policies(config.inbound.authorization)
        self.snapshot = snapshot
        self._described = {}
        if config.trust_bundle and self.enrollment is not None:
            self.enrollment.set_trust_bundle(config.trust_bundle)

    # --- what the data path reads -------------------------------------------------

    @property
    def config(self) -> pc.ProxyConfig | None:
        snap = self.snapshot
        return snap.config if snap is not None else None

    @property
    def registry(self) -> Registry | None:
        snap = self.snapshot
        return snap.registry if snap is not None else None

    @property
    def material(self) -> TLSMaterial | None:
        if self.enrollment is not None:
            return self.enrollment.material
        return self.static_material

    @property
    def own_id(self) -> str | None:
        m = self.material
        if m is not None:
            return m.spiffe_id
        if self.enrollment is not None:
            return self.enrollment.settings.spiffe_id
        config = self.config
        return config.workload.identity if config and config.workload.identity else None

    def describe_upstream(self, host_port: str) -> tuple[str, str, str, str] | None:
        """(service, workload, namespace, SPIFFE ID) of the Pod at `host_port` ("ip:port",
        as the traffic engine names endpoints), from the pushed endpoints; None
        when it is no known Pod. Remembered until the next config."""
        try:
            return self._described[host_port]
        except KeyError:
            pass
        found = None
        registry = self.registry
        host, _, port = host_port.rpartition(":")
        if registry is not None and port.isdigit():
            try:
                hit = registry.resolve(host.strip("[]"), int(port))
            except ValueError:
                hit = None
            if isinstance(hit, ToEndpoint) and hit.endpoint.pod:
                namespace, _, pod = hit.endpoint.pod.partition("/")
                found = (hit.service.key, workload_name(pod), namespace, hit.endpoint.identity)
        if len(self._described) < 10_000:  # bounded by the mesh's Pods anyway
            self._described[host_port] = found
        return found

    def mode_for(self, port: int) -> str:
        """The inbound PeerAuthentication mode on `port` (the mesh default without config)."""
        config = self.config
        if config is None:
            return PERMISSIVE
        return config.inbound.peer_authentication.mode_for(port)

    def outbound_mode(self) -> str:
        """Whether this proxy originates mTLS at all: Istio sends plaintext from a
        workload only when its mesh default is DISABLE."""
        config = self.config
        return config.mesh.default_mtls_mode if config is not None else PERMISSIVE

    def mtls_required(self) -> bool:
        config = self.config
        if config is None:
            return True
        pa = config.inbound.peer_authentication
        return pa.mode != DISABLE or any(p.mode != DISABLE for p in pa.port_level)

    def ready_reason(self) -> str | None:
        """For /healthz/ready: a certificate is required once enrollment is configured
        and mTLS is not disabled for the whole workload."""
        if self.enrollment is None or not self.mtls_required():
            return None
        return self.enrollment.ready_reason()

    def status(self) -> dict[str, Any]:
        config = self.config
        return {
            "enrollment": self.enrollment.status() if self.enrollment else None,
            "spiffe_id": self.own_id,
            "peer_authentication": (
                {
                    "mode": config.inbound.peer_authentication.mode,
                    "port_level": {
                        str(p.port): p.mode for p in config.inbound.peer_authentication.port_level
                    },
                    "source": config.inbound.peer_authentication.source,
                }
                if config
                else None
            ),
            "authorization_policies": [p.name for p in self.policies],
        }


_state: weakref.WeakKeyDictionary[ProxyContext, MeshSecurity] = weakref.WeakKeyDictionary()


def attach(ctx: ProxyContext, security: MeshSecurity) -> None:
    _state[ctx] = security
    # Outbound records name the destination Pod's workload and identity.
    ctx.telemetry.describe_upstream = security.describe_upstream
    security.on_certificate(_expiry_setter(ctx))


def _expiry_setter(ctx: ProxyContext) -> Callable[[TLSMaterial], None]:
    """Sets `synchro_certificate_expiry_timestamp_seconds` of `ctx`'s telemetry
    from each certificate. A weak reference: `_state` is keyed weakly by the
    context, and a listener holding it strongly would keep it alive forever."""
    ref = weakref.ref(ctx)

    def set_expiry(material: TLSMaterial) -> None:
        owner = ref()
        if owner is not None:
            owner.telemetry.metrics.cert_expiry.set(material.cert.not_after.timestamp())

    return set_expiry


def security_for(ctx: ProxyContext | None) -> MeshSecurity | None:
    """The security attached to `ctx`. Without a ctx (a pool made outside a
    handler), the process's only one; None when there are several (tests)."""
    if ctx is not None:
        return _state.get(ctx)
    if len(_state) == 1:
        return next(iter(_state.values()))
    return None
