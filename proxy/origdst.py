"""Where a redirected connection was really going: `SO_ORIGINAL_DST`.

iptables REDIRECT rewrites the destination to the proxy's port; netfilter's
conntrack remembers the original, and `getsockopt(SOL_IP, SO_ORIGINAL_DST)`
(IPv4) or `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` (IPv6) returns it as a raw
`struct sockaddr_in` / `sockaddr_in6`. Neither the `socket` module nor any
well-kept library decodes these, so a small `struct` parser does it here.

`parse_sockaddr` and `upstream_for` are pure; `original_dst` is the thin adapter.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Final, Protocol

from proxy.conn import Address, Direction

SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IP: Final = 0
SOL_IPV6: Final = 41

# sockaddr_in: family (host order), port (network order), 4-byte address, 8 zero bytes.
_SOCKADDR_IN: Final = struct.Struct("=H2s4s8x")
# sockaddr_in6: family, port, flowinfo, 16-byte address, scope id.
_SOCKADDR_IN6: Final = struct.Struct("=H2s4s16sI")


class OrigDstError(ValueError):
    """A sockaddr that does not parse."""


class _Sock(Protocol):
    """What `original_dst` needs of a socket (asyncio's and uvloop's wrappers fit)."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

    def getsockname(self) -> object: ...


def parse_sockaddr(raw: bytes) -> Address:
    """Decode a `sockaddr_in` or `sockaddr_in6` as returned by the kernel."""
    if len(raw) < 2:
        raise OrigDstError(f"sockaddr too short: {len(raw)} bytes")
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET:
        if len(raw) < _SOCKADDR_IN.size:
            raise OrigDstError(f"sockaddr_in too short: {len(raw)} bytes")
        _, port, addr = _SOCKADDR_IN.unpack_from(raw)
        return Address(str(ipaddress.IPv4Address(addr)), int.from_bytes(port, "big"))
    if family == socket.AF_INET6:
        if len(raw) < _SOCKADDR_IN6.size:
            raise OrigDstError(f"sockaddr_in6 too short: {len(raw)} bytes")
        _, port, _flow, addr, _scope = _SOCKADDR_IN6.unpack_from(raw)
        ip6 = ipaddress.IPv6Address(addr)
        host = str(ip6.ipv4_mapped) if ip6.ipv4_mapped else str(ip6)
        return Address(host, int.from_bytes(port, "big"))
    raise OrigDstError(f"unknown address family {family}")


def original_dst(sock: _Sock) -> Address | None:
    """The pre-NAT destination of an accepted socket, or None without conntrack NAT.

    On an IPv6 socket an IPv4-mapped peer was NATed by the IPv4 table, so both
    options are tried there.
    """
    attempts = [(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)]
    if sock.family == socket.AF_INET6:
        attempts.insert(0, (SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size))
    for level, opt, size in attempts:
        try:
            return parse_sockaddr(sock.getsockopt(level, opt, size))
        except (OSError, OrigDstError):
            continue
    return None


def _same(a: Address, b: Address) -> bool:
    if a.port != b.port:
        return False
    try:
        return ipaddress.ip_address(a.host) == ipaddress.ip_address(b.host)
    except ValueError:
        return a.host == b.host


def redirected(original: Address | None, local: Address) -> Address | None:
    """`original` if the connection really was redirected, else None.

    Without NAT there is no original destination, or (when conntrack tracks the
    connection anyway) it is the listener's own address; connecting there would loop.
    """
    if original is None or _same(original, local):
        return None
    return original


def upstream_for(
    direction: Direction,
    original: Address | None,
    static: Address | None,
) -> Address | None:
    """Where the proxy connects for an accepted connection, or None to refuse it.

    `original` is the redirected destination (see `redirected`); without one the
    static destination is used, if configured. Inbound traffic goes to the app on
    loopback, at the port the client asked for.
    """
    if original is None:
        return static
    if direction is Direction.INBOUND:
        loopback = "::1" if ipaddress.ip_address(original.host).version == 6 else "127.0.0.1"
        return Address(loopback, original.port)
    return original
