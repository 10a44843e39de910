"""TLS contexts for mutual TLS between sidecars, and SPIFFE ID checks.

OpenSSL verifies the chain against the trust bundle (which may hold several
roots during a rotation) and the CA's name constraints; Synchro then checks the
SPIFFE ID in the peer's URI SAN, since hostnames mean nothing between Pods.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from proxy.security.identity import WorkloadCertificate

# ALPN between sidecars names the inner protocol with a mesh prefix: the server
# then knows the inner protocol without sniffing (server-first TCP protocols
# would stall that), and tells the mesh's TLS from an application's own TLS
# (which PERMISSIVE passes through untouched), as Istio's "istio-*" ALPNs do.
ALPN_BY_PROTOCOL = {"http/1.1": "synchro-http/1.1", "h2c": "synchro-h2", "tcp": "synchro-tcp"}
PROTOCOL_BY_ALPN = {v: k for k, v in ALPN_BY_PROTOCOL.items()}
ALPN_PROTOCOLS = list(ALPN_BY_PROTOCOL.values())


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate verified but names the wrong (or no) SPIFFE ID."""


@contextmanager
def _memory_files(*blobs: bytes) -> Iterator[list[str]]:
    """Paths to anonymous in-memory files holding `blobs` (the key never hits disk)."""
    fds = []
    try:
        for blob in blobs:
            fd = os.memfd_create("synchro-tls", os.MFD_CLOEXEC)
            os.write(fd, blob)
            fds.append(fd)
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def mesh_alpn(inner: str) -> str:
    """The ALPN for an inner protocol: "http/1.1", "h2c" (or "h2") or "tcp"."""
    return ALPN_BY_PROTOCOL["h2c" if inner == "h2" else inner]


def _base_context(
    purpose: int,
    cert: WorkloadCertificate,
    trust_bundle: Sequence[str],
    alpn: Sequence[str] = ALPN_PROTOCOLS,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(trust_bundle))
    with _memory_files(cert.chain_bytes(), cert.key_pem()) as (chain_path, key_path):
        ctx.load_cert_chain(chain_path, key_path)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(cert: WorkloadCertificate, trust_bundle: Sequence[str]) -> ssl.SSLContext:
    """Inbound: require and verify a client certificate from the mesh."""
    return _base_context(ssl.PROTOCOL_TLS_SERVER, cert, trust_bundle)


def client_context(
    cert: WorkloadCertificate, trust_bundle: Sequence[str], alpn: Sequence[str] = ALPN_PROTOCOLS
) -> ssl.SSLContext:
    """Outbound: present our certificate, verify the server's chain; the caller
    checks the SPIFFE ID with `check_peer`. Sidecars offer one ALPN, the inner
    protocol's (`mesh_alpn`)."""
    return _base_context(ssl.PROTOCOL_TLS_CLIENT, cert, trust_bundle, alpn)


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    peer = ssl_object.getpeercert()
    if not peer:
        return None
    sans: tuple[tuple[str, str], ...] = peer.get("subjectAltName", ())  # type: ignore[assignment]
    uris = [value for kind, value in sans if kind == "URI"]
    spiffe = [u for u in uris if isinstance(u, str) and u.startswith("spiffe://")]
    return spiffe[0] if len(spiffe) == 1 else None


def check_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: str | None) -> str:
    """The peer's SPIFFE ID, which must equal `expected` when one is given."""
    got = peer_spiffe_id(ssl_object)
    if got is None:
        raise PeerIdentityError("peer certificate carries no single SPIFFE ID")
    if expected is not None and got != expected:
        raise PeerIdentityError(f"peer is {got}, expected {expected}")
    return got


def xfcc(peer_id: str | None, own_id: str) -> str:
    """Envoy's x-forwarded-client-cert value for what this hop verified."""
    if peer_id is None:
        return ""
    return f"By={own_id};URI={peer_id}"
