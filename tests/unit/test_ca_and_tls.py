"""The CA and mutual TLS between two in-process endpoints, with real handshakes.

Each rejection case is a real TLS handshake over a loopback socket pair."""

from __future__ import annotations

import datetime as dt
import random
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.ca import CertificateAuthority, CsrRejected, load_or_create, spiffe_id
from proxy.security.identity import (
    IdentityError,
    WorkloadCertificate,
    make_csr,
    new_key,
    renewal_time,
    retry_delay,
)
from proxy.security.tls import PeerIdentityError, check_peer, client_context, server_context, xfcc

FRONTEND = spiffe_id("cluster.local", "shop", "frontend")
PAYMENTS = spiffe_id("cluster.local", "shop", "payments")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("cluster.local")


def enroll(ca: CertificateAuthority, ns: str, sa: str, **kw) -> WorkloadCertificate:
    key = new_key()
    chain = ca.sign_csr(
        make_csr(key, spiffe_id(ca.trust_domain, ns, sa)), namespace=ns, service_account=sa, **kw
    )
    return WorkloadCertificate.from_chain(chain, key)


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[str | None, str | None, Exception | None]:
    """Run a real handshake over a socket pair; return (server saw, client saw, error)."""
    a, b = socket.socketpair()
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                result["server_saw"] = check_peer(s, None)
                s.sendall(b"ok")
        except Exception as exc:  # the client side reports the failure too
            result["server_error"] = exc

    t = threading.Thread(target=serve)
    t.start()
    client_saw, error = None, None
    try:
        with client_ctx.wrap_socket(b, server_side=False) as c:
            client_saw = check_peer(c, None)
            c.recv(2)
    except (ssl.SSLError, OSError) as exc:
        error = exc
    t.join(5)
    a.close()
    error = error or result.get("server_error")  # type: ignore[assignment]
    return result.get("server_saw"), client_saw, error  # type: ignore[return-value]


def test_mutual_tls_both_sides_see_spiffe_ids(ca: CertificateAuthority) -> None:
    server = enroll(ca, "shop", "payments")
    client = enroll(ca, "shop", "frontend")
    bundle = ca.trust_bundle_pem()
    server_saw, client_saw, error = handshake(
        server_context(server, bundle), client_context(client, bundle)
    )
    assert error is None
    assert server_saw == FRONTEND and client_saw == PAYMENTS
    assert xfcc(server_saw, PAYMENTS) == f"By={PAYMENTS};URI={FRONTEND}"


def test_csr_for_another_service_account_is_rejected(ca: CertificateAuthority) -> None:
    key = new_key()
    with pytest.raises(
        CsrRejected, match=r"may only have spiffe://cluster\.local/ns/shop/sa/frontend"
    ):
        ca.sign_csr(make_csr(key, PAYMENTS), namespace="shop", service_account="frontend")
    with pytest.raises(CsrRejected, match="not a PEM"):
        ca.sign_csr(b"garbage", namespace="shop", service_account="frontend")


def test_self_signed_cert_with_valid_looking_spiffe_id_is_refused(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")])
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(FRONTEND)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    forged_cert = WorkloadCertificate.from_chain(
        [forged.public_bytes(serialization.Encoding.PEM).decode()], key
    )
    server = enroll(ca, "shop", "payments")
    _, _, error = handshake(
        server_context(server, ca.trust_bundle_pem()),
        client_context(forged_cert, [forged_cert.chain_pem[0]]),
    )
    assert error is not None


def test_expired_certificate_is_refused(ca: CertificateAuthority) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    expired = enroll(ca, "shop", "frontend", now=old)
    assert expired.not_after < dt.datetime.now(dt.UTC)
    server = enroll(ca, "shop", "payments")
    bundle = ca.trust_bundle_pem()
    _, _, error = handshake(server_context(server, bundle), client_context(expired, bundle))
    assert error is not None


def test_other_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate("evil.example")
    intruder = enroll(other, "shop", "frontend")
    server = enroll(ca, "shop", "payments")
    _, _, error = handshake(
        server_context(server, ca.trust_bundle_pem()),
        client_context(intruder, other.trust_bundle_pem()),
    )
    assert error is not None


def test_root_rotation_with_two_roots_in_bundle(ca: CertificateAuthority, tmp_path) -> None:
    new_ca = CertificateAuthority.generate("cluster.local")
    bundle = ca.trust_bundle_pem() + new_ca.trust_bundle_pem()
    old_side = enroll(ca, "shop", "payments")
    new_side = enroll(new_ca, "shop", "frontend")
    _, client_saw, error = handshake(
        server_context(old_side, bundle), client_context(new_side, bundle)
    )
    assert error is None and client_saw == PAYMENTS


def test_wrong_expected_identity_is_refused(ca: CertificateAuthority) -> None:
    server = enroll(ca, "shop", "catalog")
    client = enroll(ca, "shop", "frontend")
    bundle = ca.trust_bundle_pem()
    a, b = socket.socketpair()
    t = threading.Thread(target=lambda: _quiet_accept(server_context(server, bundle), a))
    t.start()
    with (
        client_context(client, bundle).wrap_socket(b) as c,
        pytest.raises(PeerIdentityError, match="expected"),
    ):
        check_peer(c, PAYMENTS)
    t.join(5)
    a.close()


def _quiet_accept(ctx: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        with ctx.wrap_socket(sock, server_side=True) as s:
            s.recv(1)
    except (ssl.SSLError, OSError):
        pass


def test_identity_checks_and_renewal_schedule(ca: CertificateAuthority) -> None:
    cert = enroll(ca, "shop", "frontend")
    assert cert.spiffe_id == FRONTEND
    with pytest.raises(IdentityError, match="public key"):
        WorkloadCertificate.from_chain(list(cert.chain_pem), new_key())
    rng = random.Random(3)
    lifetime = cert.not_after - cert.not_before
    for _ in range(100):
        at = renewal_time(cert.not_before, cert.not_after, rng)
        assert cert.not_before + lifetime * 0.4 <= at <= cert.not_before + lifetime * 0.6
    assert all(0 <= retry_delay(n, rng) <= 60 for n in range(1, 20))


def test_ca_persists_root_with_private_mode(tmp_path) -> None:
    first = load_or_create(tmp_path, "cluster.local")
    assert (tmp_path / "root-key.pem").stat().st_mode & 0o777 == 0o600
    second = load_or_create(tmp_path, "cluster.local")
    assert first.roots[0] == second.roots[0]
    # the intermediate is new, but chains to the same root
    client = enroll(second, "shop", "frontend")
    server = enroll(first, "shop", "payments")
    _, _, error = handshake(
        server_context(server, first.trust_bundle_pem()),
        client_context(client, first.trust_bundle_pem()),
    )
    assert error is None
