"""The workload's identity: a P-256 key kept in memory, its CSR, and when to renew.

The private key never touches the disk. Python's `ssl` only loads keys from a
path, so `tls.py` hands it one on an anonymous memory file (memfd).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class IdentityError(Exception):
    """A certificate that does not fit the key or the expected identity."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> bytes:
    """A CSR whose only SAN is the workload's SPIFFE ID."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "synchro")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class WorkloadCertificate:
    """A signed chain (leaf first) and its key, with the leaf's validity."""

    chain_pem: tuple[str, ...]
    key: ec.EllipticCurvePrivateKey
    spiffe_id: str
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def from_chain(
        cls, chain_pem: list[str] | tuple[str, ...], key: ec.EllipticCurvePrivateKey
    ) -> WorkloadCertificate:
        if not chain_pem:
            raise IdentityError("empty certificate chain")
        leaf = x509.load_pem_x509_certificate(chain_pem[0].encode())
        if leaf.public_key() != key.public_key():
            raise IdentityError("the signed certificate does not carry our public key")
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise IdentityError("the signed certificate has no SAN") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1 or not uris[0].startswith("spiffe://"):
            raise IdentityError(f"the signed certificate names {uris}, not one SPIFFE ID")
        return cls(
            tuple(chain_pem), key, uris[0], leaf.not_valid_before_utc, leaf.not_valid_after_utc
        )

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain_bytes(self) -> bytes:
        return "".join(self.chain_pem).encode()


def renewal_time(
    not_before: dt.datetime, not_after: dt.datetime, rng: random.Random, *, jitter: float = 0.1
) -> dt.datetime:
    """Renew at half the lifetime, jittered by +-`jitter` of the lifetime so a
    fleet started together does not renew together."""
    lifetime = not_after - not_before
    fraction = 0.5 + rng.uniform(-jitter, jitter)
    return not_before + lifetime * fraction


def retry_delay(
    failures: int, rng: random.Random, *, base: float = 1.0, cap: float = 60.0
) -> float:
    """Backoff after a failed renewal: exponential, full jitter, capped."""
    return rng.uniform(0.0, min(cap, base * 2 ** max(failures - 1, 0)))
