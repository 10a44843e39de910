"""The mesh's certificate authority: a root, an intermediate that signs workload
certificates, and the checks a CSR must pass before it is signed.

Pure with respect to I/O except `load_or_create` (files, mode 0600); the clock
is an argument so tests can issue expired certificates on purpose.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=365)
WORKLOAD_LIFETIME = dt.timedelta(hours=24)
# Issued certificates start a little in the past: clocks in a cluster drift.
BACKDATE = dt.timedelta(minutes=5)


class CAError(Exception):
    """Base of the CA's errors."""


class CsrRejected(CAError):
    """The CSR is malformed or asks for an identity the caller does not have."""


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _name(common_name: str, org: str = "synchro") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    lifetime: dt.timedelta,
    path_length: int | None,
    trust_domain: str,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # Key identifiers let verifiers pick the right issuer when two roots share
        # a name, as they do during a root rotation.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        # A CA of this mesh may only vouch for its own trust domain.
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def new_root(
    trust_domain: str, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed root (ECDSA P-256, 10 years) constrained to the trust domain."""
    key = _new_key()
    name = _name(f"synchro root CA ({trust_domain})")
    return _ca_cert(name, key, name, key, now, ROOT_LIFETIME, 1, trust_domain), key


@dataclass(frozen=True)
class Issuer:
    """A signing certificate and key, plus the chain up to (not including) the root."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class CertificateAuthority:
    trust_domain: str
    roots: tuple[x509.Certificate, ...]  # the first signed the issuer; others are still trusted
    issuer: Issuer

    @classmethod
    def generate(
        cls, trust_domain: str = "cluster.local", *, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        now = now or dt.datetime.now(dt.UTC)
        root, root_key = new_root(trust_domain, now)
        return cls.from_root(trust_domain, root, root_key, now=now)

    @classmethod
    def from_root(
        cls,
        trust_domain: str,
        root: x509.Certificate,
        root_key: ec.EllipticCurvePrivateKey,
        *,
        extra_roots: Sequence[x509.Certificate] = (),
        now: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A plug-in root: make a fresh intermediate under it."""
        now = now or dt.datetime.now(dt.UTC)
        key = _new_key()
        cert = _ca_cert(
            _name(f"synchro intermediate CA ({trust_domain})"),
            key,
            root.subject,
            root_key,
            now,
            INTERMEDIATE_LIFETIME,
            0,
            trust_domain,
        )
        return cls(trust_domain, (root, *extra_roots), Issuer(cert, key, (cert,)))

    def trust_bundle_pem(self) -> list[str]:
        return [r.public_bytes(serialization.Encoding.PEM).decode() for r in self.roots]

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        namespace: str,
        service_account: str,
        now: dt.datetime | None = None,
        lifetime: dt.timedelta = WORKLOAD_LIFETIME,
    ) -> list[str]:
        """Sign a workload CSR whose only SAN is the caller's own SPIFFE ID.
        Returns the PEM chain: leaf, then intermediates (roots travel in the bundle)."""
        now = now or dt.datetime.now(dt.UTC)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrRejected(f"not a PEM certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise CsrRejected("the CSR's signature does not verify")
        public_key = csr.public_key()
        if (
            not isinstance(public_key, ec.EllipticCurvePublicKey)
            or public_key.curve.name != "secp256r1"
        ):
            raise CsrRejected("the CSR's key must be ECDSA P-256")
        expected = spiffe_id(self.trust_domain, namespace, service_account)
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CsrRejected(f"the CSR has no SAN; it must name exactly {expected}") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        others = len(list(san)) - len(uris)
        if uris != [expected] or others:
            raise CsrRejected(
                f"the CSR asks for {[str(n.value) for n in san]}; the caller may only have {expected}"
            )
        not_after = min(now + lifetime, self.issuer.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "synchro")]))
            .issuer_name(self.issuer.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # Not critical: the subject is not empty (RFC 5280 4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(expected)]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issuer.key.public_key()),
                critical=False,
            )
            .sign(self.issuer.key, hashes.SHA256())
        )
        return [
            c.public_bytes(serialization.Encoding.PEM).decode() for c in (cert, *self.issuer.chain)
        ]


def save_root(
    directory: Path, root: x509.Certificate, root_key: ec.EllipticCurvePrivateKey
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "root-key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            root_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(key_path, 0o600)
    (directory / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))


def load_or_create(directory: Path, trust_domain: str) -> CertificateAuthority:
    """The root from `directory` (root.pem + root-key.pem, and optionally
    extra-roots.pem: other roots still trusted during a rotation), or a new
    one generated and stored there with its key at mode 0600."""
    root_path, key_path = directory / "root.pem", directory / "root-key.pem"
    if root_path.exists() and key_path.exists():
        root = x509.load_pem_x509_certificate(root_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path}: the root key must be ECDSA")
        extra_path = directory / "extra-roots.pem"
        extra = (
            x509.load_pem_x509_certificates(extra_path.read_bytes()) if extra_path.exists() else []
        )
        return CertificateAuthority.from_root(trust_domain, root, key, extra_roots=extra)
    now = dt.datetime.now(dt.UTC)
    root, root_key = new_root(trust_domain, now)
    save_root(directory, root, root_key)
    return CertificateAuthority.from_root(trust_domain, root, root_key, now=now)
