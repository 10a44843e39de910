"""The proxy's enrollment client: get a workload certificate, keep it fresh.

    enrollment = Enrollment(EnrollSettings.from_env(os.environ))
    enrollment.start()                   # in the proxy's event loop
    material = enrollment.material       # TLSMaterial (cert + both contexts) or None

The key is made in memory and never written anywhere (`identity.new_key`); the
CSR's only SAN is the workload's SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`
(from `SYNCHRO_TRUST_DOMAIN`, `POD_NAMESPACE`, `SERVICE_ACCOUNT`). It goes with
the projected ServiceAccount token (`SYNCHRO_TOKEN_FILE`, default
/var/run/secrets/synchro/tokens/token; re-read on every attempt, since the
kubelet rotates it) to `POST /v1/certificates` on the controller
(`SYNCHRO_CONTROLLER`, verified with `SYNCHRO_CONTROLLER_CA` when set).

Renewal at half the lifetime with jitter; a failed renewal retries with capped
exponential backoff while the current certificate stays in use. Each renewal
makes a fresh key. The certificate, the trust bundle and the two TLS contexts
built from them are one frozen `TLSMaterial` swapped in one assignment, so a
connection sees the old set or the new one, never a mix; connections already
open keep the certificate they were made with.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from proxy.security import identity, tls

log = logging.getLogger(__name__)

DEFAULT_TOKEN_FILE = "/var/run/secrets/synchro/tokens/token"
ENV_TOKEN_FILE = "SYNCHRO_TOKEN_FILE"
ENV_CONTROLLER = "SYNCHRO_CONTROLLER"
ENV_CONTROLLER_CA = "SYNCHRO_CONTROLLER_CA"


class EnrollError(Exception):
    """A certificate could not be obtained (the message says why)."""


@dataclass(frozen=True)
class EnrollSettings:
    controller: str  # https://host:port
    namespace: str
    service_account: str
    trust_domain: str = "cluster.local"
    token_file: Path = Path(DEFAULT_TOKEN_FILE)
    controller_ca: str | None = None
    timeout: float = 10.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0

    def __post_init__(self) -> None:
        for name in ("namespace", "service_account", "trust_domain"):
            value = getattr(self, name)
            if not value or "/" in value:
                raise EnrollError(f"{name}: {value!r} cannot be part of a SPIFFE ID")

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EnrollSettings | None:
        """None when no controller is configured (a standalone proxy has no identity)."""
        controller = env.get(ENV_CONTROLLER, "").strip()
        if not controller:
            return None
        if "://" not in controller:
            controller = f"https://{controller}"
        namespace = env.get("POD_NAMESPACE", "").strip()
        account = env.get("SERVICE_ACCOUNT", "").strip() or "default"
        if not namespace:
            raise EnrollError("POD_NAMESPACE is not set: the workload's identity is unknown")
        return cls(
            controller=controller.rstrip("/"),
            namespace=namespace,
            service_account=account,
            trust_domain=env.get("SYNCHRO_TRUST_DOMAIN", "").strip() or "cluster.local",
            token_file=Path(env.get(ENV_TOKEN_FILE, "").strip() or DEFAULT_TOKEN_FILE),
            controller_ca=env.get(ENV_CONTROLLER_CA, "").strip() or None,
        )


@dataclass(frozen=True)
class TLSMaterial:
    """Everything a handshake needs, swapped as one."""

    cert: identity.WorkloadCertificate
    trust_bundle: tuple[str, ...]
    server: ssl.SSLContext
    # One client context per mesh ALPN: a context's ALPN list is shared by all
    # of its connections, and a sidecar offers exactly the inner protocol's.
    clients: Mapping[str, ssl.SSLContext]

    @classmethod
    def build(cls, cert: identity.WorkloadCertificate, trust_bundle: Sequence[str]) -> TLSMaterial:
        bundle = tuple(trust_bundle)
        if not bundle:
            raise EnrollError("empty trust bundle")
        clients = {a: tls.client_context(cert, bundle, [a]) for a in tls.ALPN_PROTOCOLS}
        return cls(cert, bundle, tls.server_context(cert, bundle), clients)

    def client_for(self, inner: str) -> ssl.SSLContext:
        """The client context offering the ALPN of `inner` ("http/1.1", "h2", "tcp")."""
        return self.clients[tls.mesh_alpn(inner)]

    @property
    def spiffe_id(self) -> str:
        return self.cert.spiffe_id


# --- pure cores --------------------------------------------------------------------


def next_wait(
    received: dt.datetime | None,
    not_after: dt.datetime | None,
    now: dt.datetime,
    failures: int,
    rng: random.Random,
    *,
    base: float = 1.0,
    cap: float = 60.0,
) -> float:
    """Seconds until the next enrollment attempt: backoff after a failure, else
    the jittered half-life of the current certificate (0 when there is none).
    The life counts from when we received it: the CA backdates notBefore by
    minutes for clock skew, which would otherwise eat short lifetimes."""
    if failures:
        return identity.retry_delay(failures, rng, base=base, cap=cap)
    if received is None or not_after is None:
        return 0.0
    at = identity.renewal_time(min(received, not_after), not_after, rng)
    return max(0.0, (at - now).total_seconds())


def parse_response(status: int, body: object, key_spiffe_id: str) -> tuple[list[str], list[str]]:
    """(chain, trust bundle) from the controller's answer, or EnrollError."""
    if not isinstance(body, dict):
        raise EnrollError(f"controller answered {status} with a body that is not a JSON object")
    if status != 200:
        raise EnrollError(f"controller refused the CSR ({status}): {body.get('error', body)}")
    chain, bundle = body.get("chain"), body.get("trust_bundle")
    if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
        raise EnrollError("controller answer has no certificate chain")
    if not isinstance(bundle, list) or not bundle or not all(isinstance(c, str) for c in bundle):
        raise EnrollError("controller answer has no trust bundle")
    if body.get("spiffe_id") not in (None, key_spiffe_id):
        raise EnrollError(
            f"controller issued {body.get('spiffe_id')}, we asked for {key_spiffe_id}"
        )
    return chain, bundle


# --- the adapter -------------------------------------------------------------------


class Enrollment:
    def __init__(
        self,
        settings: EnrollSettings,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        self._material: TLSMaterial | None = None
        self._received: dt.datetime | None = None
        self._bundle_override: tuple[str, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self.renewals = 0
        self.last_error = ""
        self.listeners: list[Callable[[TLSMaterial], None]] = []

    # --- what the proxy reads -----------------------------------------------------

    @property
    def material(self) -> TLSMaterial | None:
        """The certificate and contexts in force; None before the first one (or once
        it expired, since no peer would accept it)."""
        m = self._material
        if m is not None and m.cert.not_after <= self.clock():
            return None
        return m

    @property
    def current(self) -> identity.WorkloadCertificate | None:
        m = self.material
        return m.cert if m else None

    def ready_reason(self) -> str | None:
        """Why the proxy is not ready for mTLS, or None."""
        if self.material is not None:
            return None
        if self._material is not None:
            return f"workload certificate expired ({self.last_error or 'renewal pending'})"
        return f"no workload certificate yet ({self.last_error or 'enrolling'})"

    def status(self) -> dict[str, object]:
        m = self._material
        return {
            "spiffe_id": self.settings.spiffe_id,
            "controller": self.settings.controller,
            "not_before": m.cert.not_before.isoformat() if m else None,
            "not_after": m.cert.not_after.isoformat() if m else None,
            "renewals": self.renewals,
            "failures": self.failures,
            "last_error": self.last_error,
            "trust_bundle_roots": len(m.trust_bundle) if m else 0,
        }

    def set_trust_bundle(self, bundle: Sequence[str]) -> None:
        """A trust bundle pushed with the config (root rotation): rebuild the contexts
        around the current certificate. It wins over the enrollment answer's."""
        bundle = tuple(bundle)
        if not bundle or bundle == self._bundle_override:
            return
        self._bundle_override = bundle
        m = self._material
        if m is not None and m.trust_bundle != bundle:
            try:
                self._swap(TLSMaterial.build(m.cert, bundle))
                log.info("trust bundle updated: %d root(s)", len(bundle))
            except (ssl.SSLError, ValueError, EnrollError) as exc:
                log.error("pushed trust bundle unusable, keeping the old one: %s", exc)

    def _swap(self, material: TLSMaterial) -> None:
        self._material = material  # the one atomic swap
        for listener in self.listeners:
            try:
                listener(material)
            except Exception:
                log.exception("TLS material listener failed")

    # --- enrolling ------------------------------------------------------------------

    def _token(self) -> str:
        try:
            token = self.settings.token_file.read_text().strip()
        except OSError as exc:
            raise EnrollError(
                f"ServiceAccount token {self.settings.token_file}: {exc.strerror or exc}"
            ) from None
        if not token:
            raise EnrollError(f"ServiceAccount token {self.settings.token_file} is empty")
        return token

    def _verify(self) -> bool | ssl.SSLContext:
        if self.settings.controller_ca:
            return ssl.create_default_context(cafile=self.settings.controller_ca)
        return True

    async def enroll_once(self, http: httpx.AsyncClient | None = None) -> TLSMaterial:
        """One CSR round trip; swaps in the new material and returns it."""
        key = identity.new_key()
        csr = identity.make_csr(key, self.settings.spiffe_id).decode()
        token = self._token()
        url = f"{self.settings.controller}/v1/certificates"
        try:
            if http is None:
                async with httpx.AsyncClient(
                    verify=self._verify(), timeout=self.settings.timeout
                ) as c:
                    resp = await c.post(url, json={"csr": csr, "token": token})
            else:
                resp = await http.post(url, json={"csr": csr, "token": token})
        except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
            raise EnrollError(
                f"controller {self.settings.controller} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:200]}
        chain, bundle = parse_response(resp.status_code, body, self.settings.spiffe_id)
        try:
            cert = identity.WorkloadCertificate.from_chain(chain, key)
        except (identity.IdentityError, ValueError) as exc:
            raise EnrollError(f"unusable certificate from the controller: {exc}") from None
        if cert.spiffe_id != self.settings.spiffe_id:
            raise EnrollError(
                f"controller issued {cert.spiffe_id}, we asked for {self.settings.spiffe_id}"
            )
        material = TLSMaterial.build(cert, self._bundle_override or bundle)
        self._received = self.clock()
        self._swap(material)
        return material

    async def run(self) -> None:
        async with httpx.AsyncClient(verify=self._verify(), timeout=self.settings.timeout) as http:
            while True:
                m = self._material
                wait = next_wait(
                    self._received if m else None,
                    m.cert.not_after if m else None,
                    self.clock(),
                    self.failures,
                    self.rng,
                    base=self.settings.backoff_base,
                    cap=self.settings.backoff_cap,
                )
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    first = self._material is None
                    m = await self.enroll_once(http)
                except asyncio.CancelledError:
                    raise
                except (EnrollError, ssl.SSLError, ValueError) as exc:
                    self.failures += 1
                    self.last_error = str(exc)
                    log.warning(
                        "enrollment of %s failed (attempt %d): %s; %s",
                        self.settings.spiffe_id,
                        self.failures,
                        exc,
                        "keeping the current certificate"
                        if self._material
                        else "no certificate yet",
                    )
                    continue
                self.failures, self.last_error = 0, ""
                if not first:
                    self.renewals += 1
                log.info(
                    "%s certificate for %s, valid until %s",
                    "got a" if first else "renewed the",
                    m.spiffe_id,
                    m.cert.not_after.isoformat(timespec="seconds"),
                )

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="enrollment")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
