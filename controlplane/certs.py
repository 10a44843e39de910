"""`POST /v1/certificates`: workload enrollment on the controller API.

    POST /v1/certificates  {"csr": "<PEM>", "token": "<ServiceAccount token>"}
    200 {"chain": [leaf, intermediate], "trust_bundle": [roots], "spiffe_id", "not_after"}
    400 garbage (not JSON, no CSR, a CSR that does not parse or verify, a key that is not P-256)
    401 the token is not good (wrong audience, bad signature, expired, not a ServiceAccount)
    403 the CSR names another identity than the token's namespace and ServiceAccount

The token may also come as `Authorization: Bearer <token>`. Each refusal is one
log line naming the caller (when known) and the reason.

Where the CA comes from (`load_ca`):
- `--kubernetes`: Secret `synchro-ca` in the controller's namespace (keys
  `root.pem`, `root-key.pem`, optionally `extra-roots.pem`); created with a new
  root when missing (a plug-in CA is the same Secret, written by the user);
- otherwise `--ca-dir DIR` (env `SYNCHRO_CA_DIR`; default: the directory of
  `--tls-cert`, which is the state directory `synchro up` gives the controller):
  the same three files, the key at mode 0600, generated when missing.

Who the caller is: a TokenReview in Kubernetes; locally, tokens minted with the
key in `--token-key FILE` (default `<ca-dir>/token-key.pem`, created 0600 when
missing). `synchro up` mints each Pod's token with that same file, so the
controller and the local runtime share nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from controlplane import ca as ca_mod
from controlplane import metrics
from controlplane.tokens import Authenticator, Caller, LocalTokens, TokenInvalid, TokenReviewer

log = logging.getLogger(__name__)

SECRET_NAME = "synchro-ca"
TOKEN_KEY_FILE = "token-key.pem"
MAX_BODY = 64 * 1024
ENV_CA_DIR = "SYNCHRO_CA_DIR"
ENV_TOKEN_KEY = "SYNCHRO_TOKEN_KEY"
ENV_CERT_LIFETIME = "SYNCHRO_CERT_LIFETIME"


class CertsError(Exception):
    """Base of enrollment refusals; `status` is the HTTP status at the edge."""

    status = 400


class BadRequest(CertsError):
    status = 400


class Unauthenticated(CertsError):
    status = 401


class Forbidden(CertsError):
    status = 403


# --- the pure core: what a CSR asks for, and whether the caller may have it -----------


def requested_identity(csr_pem: bytes) -> str:
    """The single SPIFFE ID a CSR asks for; BadRequest for anything else."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise BadRequest(f"csr: not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise BadRequest("csr: its signature does not verify")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BadRequest("csr: no subjectAltName; it must name one spiffe:// URI") from None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise BadRequest(f"csr: unreadable extensions ({exc})") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(san)) != 1 or not uris[0].startswith("spiffe://"):
        raise BadRequest(
            f"csr: subjectAltName must be exactly one spiffe:// URI, got {[str(n.value) for n in san]}"
        )
    return uris[0]


def check_caller(requested: str, caller: Caller, trust_domain: str) -> str:
    """The caller's own SPIFFE ID, which must be what the CSR asks for (else Forbidden)."""
    own = ca_mod.spiffe_id(trust_domain, caller.namespace, caller.service_account)
    if requested != own:
        raise Forbidden(f"CSR asks for {requested}, but the token is {own}")
    return own


def parse_body(raw: bytes, authorization: str = "") -> tuple[bytes, str]:
    """(csr PEM, token) from the JSON body (token also from a Bearer header)."""
    if len(raw) > MAX_BODY:
        raise BadRequest(f"body: larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object {csr, token}")
    csr = body.get("csr")
    if not isinstance(csr, str) or not csr:
        raise BadRequest("csr: required, a PEM string")
    token = body.get("token")
    if token is None and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
    if not isinstance(token, str) or not token:
        raise Unauthenticated("token: required (body field or Authorization: Bearer)")
    return csr.encode(), token


# --- the adapter --------------------------------------------------------------------


@dataclass
class CertificateService:
    ca: ca_mod.CertificateAuthority
    authenticator: Authenticator
    lifetime: dt.timedelta = ca_mod.WORKLOAD_LIFETIME
    # The TokenReview client blocks on the network; local tokens are checked inline.
    blocking_auth: bool = False

    async def authenticate(self, token: str) -> Caller:
        try:
            if self.blocking_auth:
                return await asyncio.to_thread(self.authenticator.authenticate, token)
            return self.authenticator.authenticate(token)
        except TokenInvalid as exc:
            raise Unauthenticated(str(exc)) from None
        except Exception as exc:  # the API server unreachable: not the caller's fault, but no cert
            log.warning("token check failed: %r", exc)
            raise Unauthenticated(f"token could not be checked: {exc}") from None

    def sign(self, csr_pem: bytes, caller: Caller) -> dict[str, Any]:
        wanted = requested_identity(csr_pem)
        own = check_caller(wanted, caller, self.ca.trust_domain)
        try:
            chain = self.ca.sign_csr(
                csr_pem,
                namespace=caller.namespace,
                service_account=caller.service_account,
                lifetime=self.lifetime,
            )
        except ca_mod.CsrRejected as exc:
            raise BadRequest(str(exc)) from None
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        return {
            "chain": chain,
            "trust_bundle": self.ca.trust_bundle_pem(),
            "spiffe_id": own,
            "not_after": leaf.not_valid_after_utc.isoformat(),
        }

    async def handle(self, raw: bytes, authorization: str, client: str) -> dict[str, Any]:
        caller: Caller | None = None
        try:
            csr, token = parse_body(raw, authorization)
            caller = await self.authenticate(token)
            result = self.sign(csr, caller)
        except CertsError as exc:
            who = f"{caller.namespace}/{caller.service_account}" if caller else "unauthenticated"
            log.warning("certificate refused (%d) for %s from %s: %s", exc.status, who, client, exc)
            metrics.CERTIFICATES.labels("rejected").inc()
            raise
        metrics.CERTIFICATES.labels("issued").inc()
        log.debug("certificate issued to %s (pod %s)", result["spiffe_id"], caller.pod or "?")
        return result


def router(service: CertificateService) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/certificates")
    async def certificates(request: Request) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "?"
        try:
            raw = await request.body()
            result = await service.handle(raw, request.headers.get("authorization", ""), client)
        except CertsError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse(result)

    @r.get("/v1/trust-bundle")
    async def trust_bundle() -> dict[str, Any]:
        return {
            "trust_domain": service.ca.trust_domain,
            "trust_bundle": service.ca.trust_bundle_pem(),
        }

    return r


# --- where the CA and the token key come from ---------------------------------------------


def _pem_key(data: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ca_mod.CAError(f"{where}: the key must be ECDSA")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_token_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The local token signing key, created (mode 0600) when missing."""
    if path.exists():
        return _pem_key(path.read_bytes(), str(path))
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # the local runtime made it first: use theirs
        return _pem_key(path.read_bytes(), str(path))
    with os.fdopen(fd, "wb") as f:
        f.write(_key_pem(key))
    return key


def ca_from_secret_data(data: dict[str, str], trust_domain: str) -> ca_mod.CertificateAuthority:
    def field(name: str) -> bytes:
        return base64.b64decode(data[name])

    root = x509.load_pem_x509_certificate(field("root.pem"))
    key = _pem_key(field("root-key.pem"), f"Secret {SECRET_NAME} root-key.pem")
    extra = (
        x509.load_pem_x509_certificates(field("extra-roots.pem"))
        if "extra-roots.pem" in data
        else []
    )
    return ca_mod.CertificateAuthority.from_root(trust_domain, root, key, extra_roots=extra)


def load_from_secret(core: Any, namespace: str, trust_domain: str) -> ca_mod.CertificateAuthority:
    """The CA from Secret synchro-ca, created with a fresh root when it does not exist."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    for _ in range(3):
        try:
            secret = core.read_namespaced_secret(SECRET_NAME, namespace)
            log.info("CA root from Secret %s/%s", namespace, SECRET_NAME)
            return ca_from_secret_data(secret.data or {}, trust_domain)
        except ApiException as exc:
            if exc.status != 404:
                raise ca_mod.CAError(
                    f"reading Secret {namespace}/{SECRET_NAME}: {exc.reason}"
                ) from exc
        root, key = ca_mod.new_root(trust_domain, dt.datetime.now(dt.UTC))
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=SECRET_NAME, namespace=namespace),
            type="Opaque",
            data={
                "root.pem": base64.b64encode(
                    root.public_bytes(serialization.Encoding.PEM)
                ).decode(),
                "root-key.pem": base64.b64encode(_key_pem(key)).decode(),
            },
        )
        try:
            core.create_namespaced_secret(namespace, body)
            log.info("generated a new CA root in Secret %s/%s", namespace, SECRET_NAME)
            return ca_mod.CertificateAuthority.from_root(trust_domain, root, key)
        except ApiException as exc:
            if exc.status != 409:  # 409: another replica created it first; read theirs
                raise ca_mod.CAError(
                    f"creating Secret {namespace}/{SECRET_NAME}: {exc.reason}"
                ) from exc
    raise ca_mod.CAError(f"Secret {namespace}/{SECRET_NAME}: could not read or create it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("certificate authority")
    group.add_argument(
        "--ca-dir",
        type=Path,
        metavar="DIR",
        default=Path(os.environ[ENV_CA_DIR]) if os.environ.get(ENV_CA_DIR) else None,
        help="root.pem + root-key.pem (+ extra-roots.pem) of the mesh CA, generated when missing "
        f"(env {ENV_CA_DIR}; default: the directory of --tls-cert; Secret {SECRET_NAME} with --kubernetes)",
    )
    group.add_argument(
        "--token-key",
        type=Path,
        metavar="FILE",
        default=Path(os.environ[ENV_TOKEN_KEY]) if os.environ.get(ENV_TOKEN_KEY) else None,
        help="key of the local runtime's ServiceAccount tokens (without Kubernetes; "
        f"env {ENV_TOKEN_KEY}; default <ca-dir>/{TOKEN_KEY_FILE})",
    )
    group.add_argument(
        "--trust-domain", default=None, help="default: the mesh config's trustDomain"
    )
    group.add_argument(
        "--cert-lifetime",
        type=float,
        default=float(
            os.environ.get(ENV_CERT_LIFETIME) or ca_mod.WORKLOAD_LIFETIME.total_seconds()
        ),
        metavar="SECONDS",
        help=f"lifetime of workload certificates (env {ENV_CERT_LIFETIME}; default 24 h)",
    )


def _trust_domain(args: argparse.Namespace) -> str:
    if getattr(args, "trust_domain", None):
        return str(args.trust_domain)
    mesh_config = getattr(args, "mesh_config", None)
    if mesh_config is not None:
        from webhook.config import load

        try:
            return load(Path(mesh_config)).trust_domain
        except Exception as exc:  # main.py reports a broken mesh config itself
            log.warning(
                "trust domain from %s unavailable (%s); using cluster.local", mesh_config, exc
            )
    return "cluster.local"


def ca_dir(args: argparse.Namespace) -> Path | None:
    if getattr(args, "ca_dir", None) is not None:
        return Path(args.ca_dir)
    for name in ("api_tls_cert", "tls_cert"):
        cert = getattr(args, name, None)
        if cert is not None:
            return Path(cert).resolve().parent
    return None


def build_service(args: argparse.Namespace) -> CertificateService:
    trust_domain = _trust_domain(args)
    lifetime = dt.timedelta(seconds=float(getattr(args, "cert_lifetime", 86400.0)))
    if lifetime.total_seconds() < 1:
        raise ValueError("--cert-lifetime must be at least 1 second")
    if getattr(args, "kubernetes", False):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
        namespace = getattr(args, "namespace", None) or os.environ.get(
            "POD_NAMESPACE", "synchro-system"
        )
        ca = load_from_secret(client.CoreV1Api(api_client), namespace, trust_domain)
        return CertificateService(ca, TokenReviewer(api_client), lifetime, blocking_auth=True)
    directory = ca_dir(args)
    if directory is None:
        log.warning("no --ca-dir: the CA and the token key live in memory until exit")
        return CertificateService(
            ca_mod.CertificateAuthority.generate(trust_domain), LocalTokens(), lifetime
        )
    ca = ca_mod.load_or_create(directory, trust_domain)
    token_key = getattr(args, "token_key", None) or directory / TOKEN_KEY_FILE
    log.info(
        "CA root from %s (trust domain %s); local tokens checked with %s",
        directory,
        trust_domain,
        token_key,
    )
    return CertificateService(ca, LocalTokens(load_token_key(Path(token_key))), lifetime)


def mount(app: FastAPI, args: argparse.Namespace, controller: Any = None) -> CertificateService:
    """Add the enrollment routes to the controller API; the CA's roots become the
    proxies' trust bundle unless `--trust-bundle` named one."""
    try:
        service = build_service(args)
    except (ca_mod.CAError, ValueError, OSError) as exc:
        raise ValueError(f"certificate authority: {exc}") from exc
    app.include_router(router(service))
    app.state.certificates = service
    if controller is not None and not getattr(controller, "trust_bundle", ()):
        # Before the controller starts: its first configuration carries the roots.
        controller.trust_bundle = tuple(service.ca.trust_bundle_pem())
    return service
