"""The seam between the proxy's listeners and its protocol handlers.

A listener accepts a connection, finds where it was going (`SO_ORIGINAL_DST`),
reads the first bytes to detect the protocol, and hands a `Downstream` to the
handler for that protocol (`proxy.http1.serve`, `proxy.http2.serve`,
`proxy.tcp.serve`). The handler owns the connection from then on and closes it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.telemetry.telemetry import Telemetry


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Direction(enum.Enum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"


class Protocol(enum.Enum):
    HTTP1 = "http/1.1"
    HTTP2 = "h2c"
    TLS = "tls"
    TCP = "tcp"


@dataclass(slots=True)
class ConnectionStats:
    """Per-connection counters the handlers update; telemetry reads them."""

    bytes_from_downstream: int = 0
    bytes_to_downstream: int = 0
    requests: int = 0


@dataclass(slots=True)
class Downstream:
    """An accepted client connection, after protocol detection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # Bytes detection already read from `reader`; a handler processes them first.
    preread: bytes
    direction: Direction
    protocol: Protocol
    # Where the client was going (the original destination before REDIRECT).
    original_dst: Address
    peer: Address
    # Where the proxy connects for this connection: the original destination
    # outbound, 127.0.0.1:<port> inbound. Per-request routing replaces it later.
    upstream: Address
    stats: ConnectionStats = field(default_factory=ConnectionStats)
    # The client's SPIFFE ID when the inbound side terminated mTLS for it
    # (proxy.security.inbound); None for plaintext and outbound connections.
    peer_identity: str | None = None


class ProxyContext:
    """Process-wide state a handler may need: settings and the shutdown signal.

    Grows with later issues (config in force, balancers, telemetry); handlers
    receive it rather than reaching for globals.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        header_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        pool_idle_timeout: float = 60.0,
        max_header_bytes: int = 64 * 1024,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.pool_idle_timeout = pool_idle_timeout
        self.max_header_bytes = max_header_bytes
        # Set when the proxy drains: handlers stop keep-alive and finish in-flight work.
        self.draining = asyncio.Event()
        # Imported here: the telemetry package imports this module's types.
        from proxy.telemetry.telemetry import Telemetry

        # Records nothing until the process entry installs the configured one.
        self.telemetry: Telemetry = Telemetry.disabled()


Handler = Callable[[Downstream, ProxyContext], Awaitable[None]]
