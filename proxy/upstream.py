"""Every upstream connection of the proxy opens here: mTLS to meshed endpoints,
plaintext to everything else.

    reader, writer = await open_connection(address, ctx, alpn="http/1.1", timeout=5.0)
    transport, protocol = await create_connection(factory, address, ctx, alpn="h2", timeout=5.0)

`plan` (pure) decides: when the config in force says the destination
`ip:port` is an endpoint that runs a sidecar (`meshed`), the mesh default is not
DISABLE and this proxy has a certificate, the connection is TLS (1.3 when the
peer can, 1.2 at least) with an ALPN naming the inner protocol, and the server's
SPIFFE ID must be the endpoint's `identity` (a mismatch is an
`ssl.SSLError`, so callers that handle `OSError` treat it as a connect failure).
Otherwise, plaintext. The inbound side's connections to 127.0.0.1 are never
endpoints, so they stay plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar, cast

from proxy.conn import Address, ProxyContext
from proxy.registry import Registry, ToEndpoint
from proxy.security import tls, tlsstream
from proxy.security.enroll import TLSMaterial
from proxy.security.runtime import DISABLE, MeshSecurity, security_for

log = logging.getLogger(__name__)

STREAM_LIMIT: Final = 256 * 1024
HANDSHAKE_TIMEOUT: Final = 10.0

P = TypeVar("P", bound=asyncio.BaseProtocol)


@dataclass(frozen=True, slots=True)
class Plaintext:
    reason: str


@dataclass(frozen=True, slots=True)
class MutualTLS:
    context: ssl.SSLContext  # offers the inner protocol's mesh ALPN
    expected_identity: str | None


Plan = Plaintext | MutualTLS


def plan(
    address: Address,
    registry: Registry | None,
    mesh_mode: str,
    material: TLSMaterial | None,
    inner: str,
    own_ips: frozenset[str] = frozenset(),
) -> Plan:
    """TLS or plaintext to `address` for `inner` ("http/1.1", "h2" or "tcp").
    Pure: no sockets, no logging."""
    if registry is None:
        return Plaintext("no config")
    try:
        hit = registry.resolve(address.host, address.port)
    except ValueError:
        return Plaintext("not an IP destination")
    if not isinstance(hit, ToEndpoint) or not hit.endpoint.meshed:
        return Plaintext("destination has no sidecar")
    if hit.endpoint.ip in own_ips:
        # Our own Pod: the init rules let the proxy's traffic reach the app
        # directly (it never passes our inbound side), so TLS would meet the app.
        return Plaintext("own Pod")
    if mesh_mode == DISABLE:
        return Plaintext("mTLS disabled mesh-wide")
    if material is None:
        return Plaintext("no workload certificate")
    return MutualTLS(material.client_for(inner), hit.endpoint.identity or None)


def plan_for(ctx: ProxyContext | None, address: Address, inner: str) -> Plan:
    security: MeshSecurity | None = security_for(ctx)
    if security is None:
        return Plaintext("no mesh security")
    return plan(
        address,
        security.registry,
        security.outbound_mode(),
        security.material,
        inner,
        security.own_ips,
    )


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _check(transport: asyncio.BaseTransport, p: MutualTLS, address: Address) -> None:
    ssl_object = transport.get_extra_info("ssl_object")
    try:
        tls.check_peer(ssl_object, p.expected_identity)
    except tls.PeerIdentityError as exc:
        cast(asyncio.Transport, transport).abort()
        log.warning("mTLS to %s refused: %s", address, exc)
        raise


async def create_connection(
    factory: Callable[[], P],
    address: Address,
    ctx: ProxyContext | None,
    *,
    alpn: str,
    timeout: float,
) -> tuple[asyncio.BaseTransport, P]:
    """`loop.create_connection` to `address`, over mTLS when the plan says so."""
    p = plan_for(ctx, address, alpn)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        if isinstance(p, Plaintext):
            transport, protocol = await loop.create_connection(factory, address.host, address.port)
        else:
            try:
                if alpn == "tcp":
                    # Opaque TCP must carry a half-close, which asyncio's and
                    # uvloop's TLS transports cannot (see proxy.security.tlsstream).
                    transport, protocol = await tlsstream.connect(
                        factory, address.host, address.port, p.context, timeout=timeout
                    )
                else:
                    transport, protocol = await loop.create_connection(
                        factory,
                        address.host,
                        address.port,
                        ssl=p.context,
                        server_hostname="",
                        ssl_handshake_timeout=timeout,
                    )
            except ssl.SSLError as exc:
                log.warning("mTLS handshake with %s failed: %s", address, exc)
                raise
            _check(transport, p, address)
    _nodelay(transport)
    return transport, protocol


async def open_connection(
    address: Address,
    ctx: ProxyContext | None,
    *,
    alpn: str,
    timeout: float,
    limit: int = STREAM_LIMIT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams to `address`, over mTLS when the plan says so. Raises OSError
    (ssl.SSLError included) or TimeoutError, as `asyncio.open_connection` does."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    transport, protocol = await create_connection(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
        address,
        ctx,
        alpn=alpn,
        timeout=timeout,
    )
    # uvloop's transports are not asyncio.Transport subclasses, only alike.
    writer = asyncio.StreamWriter(cast(asyncio.Transport, transport), protocol, reader, loop)
    return reader, writer


def peer_identity(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> str | None:
    """The server's SPIFFE ID on an mTLS upstream connection; None on plaintext."""
    ssl_object = writer.get_extra_info("ssl_object")
    return tls.peer_spiffe_id(ssl_object) if ssl_object is not None else None
