"""The webhook's serving certificate when none is given: no cert-manager needed.

Pure part: `make_ca`, `issue_serving_cert`, `is_usable`, `ca_bundle_patch` (clock
as an argument). Adapter part: `ensure_serving_cert` keeps the certificate in a
Secret so that every controller replica serves the same one (each generating
its own would make them overwrite each other's caBundle), and
`patch_ca_bundle` writes the CA into the MutatingWebhookConfiguration.

RBAC this needs (namespace `synchro-system`): get/create/update Secret
`synchro-webhook-tls`; cluster-wide: get/patch MutatingWebhookConfiguration
`synchro-injector`.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

WEBHOOK_CONFIGURATION = "synchro-injector"
SECRET_NAME = "synchro-webhook-tls"
SERVICE_NAME = "synchro-controller"
NAMESPACE = "synchro-system"
CA_VALIDITY = dt.timedelta(days=3650)
SERVING_VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate clock skew between nodes


class WebhookTLSError(Exception):
    """The serving certificate could not be created, stored or published."""


@dataclass(frozen=True)
class ServingCert:
    ca_pem: bytes
    cert_pem: bytes  # leaf, then CA
    key_pem: bytes


def service_dns_names(service: str = SERVICE_NAME, namespace: str = NAMESPACE) -> list[str]:
    """The names the API server may use to reach the webhook Service."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str, now: dt.datetime) -> tuple[bytes, bytes]:
    """A self-signed CA: (cert PEM, key PEM)."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert), _key_pem(key)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_serving_cert(
    ca_pem: bytes,
    ca_key_pem: bytes,
    names: Sequence[str],
    now: dt.datetime,
    validity: dt.timedelta = SERVING_VALIDITY,
) -> ServingCert:
    """A TLS server certificate for `names` (DNS names or IP addresses) signed by the CA."""
    if not names:
        raise WebhookTLSError("a serving certificate needs at least one name")
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise WebhookTLSError("the CA key is not an EC key")
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + validity, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ServingCert(ca_pem=ca_pem, cert_pem=_pem(cert) + ca_pem, key_pem=_key_pem(key))


def self_signed(names: Sequence[str], now: dt.datetime) -> ServingCert:
    """A fresh CA and a serving certificate for `names`."""
    ca_pem, ca_key_pem = make_ca("synchro-webhook-ca", now)
    return issue_serving_cert(ca_pem, ca_key_pem, names, now)


def is_usable(cert: ServingCert, names: Sequence[str], now: dt.datetime) -> bool:
    """True when `cert` covers `names` and stays valid for RENEW_BEFORE."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.cert_pem)
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        serialization.load_pem_private_key(cert.key_pem, password=None)
        x509.load_pem_x509_certificate(cert.ca_pem)
    except (ValueError, x509.ExtensionNotFound):
        return False
    covered = {str(n) for n in sans.get_values_for_type(x509.DNSName)}
    covered |= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    in_time = leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc - RENEW_BEFORE
    return in_time and set(names) <= covered


def ca_bundle_patch(
    webhook_configuration: Mapping[str, Any], ca_pem: bytes
) -> list[dict[str, Any]]:
    """JSON Patch setting every webhook's caBundle; empty when all are current."""
    bundle = base64.b64encode(ca_pem).decode()
    ops: list[dict[str, Any]] = []
    for i, hook in enumerate(webhook_configuration.get("webhooks") or []):
        client = hook.get("clientConfig") or {}
        if client.get("caBundle") != bundle:
            path = f"/webhooks/{i}/clientConfig/caBundle"
            ops.append({"op": "add", "path": path, "value": bundle})
    return ops


def to_secret_data(cert: ServingCert) -> dict[str, bytes | str]:
    return {
        "ca.crt": base64.b64encode(cert.ca_pem).decode(),
        "tls.crt": base64.b64encode(cert.cert_pem).decode(),
        "tls.key": base64.b64encode(cert.key_pem).decode(),
    }


def from_secret_data(data: Mapping[str, str] | None) -> ServingCert | None:
    if not data or not {"ca.crt", "tls.crt", "tls.key"} <= set(data):
        return None
    try:
        return ServingCert(
            ca_pem=base64.b64decode(data["ca.crt"]),
            cert_pem=base64.b64decode(data["tls.crt"]),
            key_pem=base64.b64decode(data["tls.key"]),
        )
    except ValueError:
        return None


# --- adapters (kubernetes client) ------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ensure_serving_cert(
    core_v1: Any, namespace: str, names: Sequence[str], secret_name: str = SECRET_NAME
) -> ServingCert:
    """The shared serving certificate from its Secret, creating or renewing it."""
    from kubernetes.client import V1ObjectMeta, V1Secret
    from kubernetes.client.exceptions import ApiException

    now = _utcnow()
    try:
        secret = core_v1.read_namespaced_secret(secret_name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise WebhookTLSError(
                f"reading Secret {namespace}/{secret_name}: {exc.reason}"
            ) from exc
        secret = None
    current = from_secret_data(secret.data) if secret is not None else None
    if current is not None and is_usable(current, names, now):
        return current
    fresh = self_signed(names, now)
    body = V1Secret(
        metadata=V1ObjectMeta(name=secret_name, namespace=namespace),
        type="kubernetes.io/tls",
        data=to_secret_data(fresh),
    )
    try:
        if secret is None:
            core_v1.create_namespaced_secret(namespace, body)
        else:
            body.metadata = V1ObjectMeta(
                name=secret_name,
                namespace=namespace,
                resource_version=secret.metadata.resource_version,
            )
            core_v1.replace_namespaced_secret(secret_name, namespace, body)
    except ApiException as exc:
        if exc.status == 409:
            # Another replica won the race; use its certificate.
            return ensure_serving_cert(core_v1, namespace, names, secret_name)
        raise WebhookTLSError(f"writing Secret {namespace}/{secret_name}: {exc.reason}") from exc
    log.info("created serving certificate in Secret %s/%s", namespace, secret_name)
    return fresh


def patch_ca_bundle(admission_v1: Any, ca_pem: bytes, name: str = WEBHOOK_CONFIGURATION) -> int:
    """Publish the CA in MutatingWebhookConfiguration `name`; returns webhooks patched."""
    from kubernetes.client.exceptions import ApiException

    try:
        current = admission_v1.read_mutating_webhook_configuration(name)
        ops = ca_bundle_patch(admission_v1.api_client.sanitize_for_serialization(current), ca_pem)
        if ops:
            # A list body makes the client send application/json-patch+json.
            admission_v1.patch_mutating_webhook_configuration(name, ops)
    except ApiException as exc:
        raise WebhookTLSError(f"MutatingWebhookConfiguration {name}: {exc.reason}") from exc
    return len(ops)


def memory_file(name: str, data: bytes) -> str:
    """A path to `data` that needs no writable filesystem (the controller's root is
    read-only); uvicorn and `ssl` only take certificate paths."""
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    return f"/proc/self/fd/{fd}"
