"""SO_ORIGINAL_DST decoding and the upstream choice (proxy.origdst)."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.conn import Address, Direction
from proxy.origdst import (
    OrigDstError,
    original_dst,
    parse_sockaddr,
    redirected,
    upstream_for,
)


def sockaddr_in(ip: str, port: int) -> bytes:
    # Built the way the kernel lays out struct sockaddr_in, independently of the parser.
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_pton(socket.AF_INET, ip)
        + bytes(8)
    )


def sockaddr_in6(ip: str, port: int, scope: int = 0) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!H", port)
        + bytes(4)
        + socket.inet_pton(socket.AF_INET6, ip)
        + struct.pack("=I", scope)
    )


def test_ipv4() -> None:
    assert parse_sockaddr(sockaddr_in("10.96.0.10", 8080)) == Address("10.96.0.10", 8080)


def test_ipv6() -> None:
    assert parse_sockaddr(sockaddr_in6("fd00::1:2", 443, scope=3)) == Address("fd00::1:2", 443)


def test_ipv4_mapped_ipv6_is_reported_as_ipv4() -> None:
    assert parse_sockaddr(sockaddr_in6("::ffff:10.0.0.7", 80)) == Address("10.0.0.7", 80)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x02",
        sockaddr_in("1.2.3.4", 80)[:7],
        sockaddr_in6("::1", 80)[:20],
        struct.pack("=H", 1) + bytes(14),
    ],
)
def test_bad_sockaddr(raw: bytes) -> None:
    with pytest.raises(OrigDstError):
        parse_sockaddr(raw)


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_ipv4_round_trip(ip: object, port: int) -> None:
    assert parse_sockaddr(sockaddr_in(str(ip), port)) == Address(str(ip), port)


@given(st.ip_addresses(v=6), st.integers(0, 65535))
def test_ipv6_round_trip(ip: object, port: int) -> None:
    got = parse_sockaddr(sockaddr_in6(str(ip), port))
    mapped = getattr(ip, "ipv4_mapped", None)
    assert got == Address(str(mapped or ip), port)


@given(st.binary(max_size=40))
def test_garbage_raises_only_origdst_error(raw: bytes) -> None:
    with contextlib.suppress(OrigDstError):
        parse_sockaddr(raw)


LOCAL = Address("127.0.0.1", 15001)
STATIC = Address("127.0.0.1", 9000)


def test_not_redirected_without_original() -> None:
    assert redirected(None, LOCAL) is None


def test_own_address_is_not_a_redirect() -> None:
    # conntrack reports the listener itself for a connection nobody NATed.
    assert redirected(Address("127.0.0.1", 15001), LOCAL) is None
    assert (
        redirected(Address("::ffff:127.0.0.1", 15001), Address("::ffff:127.0.0.1", 15001)) is None
    )


def test_redirect() -> None:
    original = Address("10.0.0.5", 80)
    assert redirected(original, LOCAL) == original


def test_outbound_goes_to_the_original_destination() -> None:
    assert upstream_for(Direction.OUTBOUND, Address("10.0.0.5", 80), STATIC) == Address(
        "10.0.0.5", 80
    )


def test_inbound_goes_to_the_app_on_loopback() -> None:
    assert upstream_for(Direction.INBOUND, Address("10.0.0.5", 8080), None) == Address(
        "127.0.0.1", 8080
    )
    assert upstream_for(Direction.INBOUND, Address("fd00::5", 8080), None) == Address("::1", 8080)


def test_static_destination_without_redirect() -> None:
    assert upstream_for(Direction.OUTBOUND, None, STATIC) == STATIC
    assert upstream_for(Direction.INBOUND, None, STATIC) == STATIC
    assert upstream_for(Direction.OUTBOUND, None, None) is None


def test_real_socket_without_nat_has_no_redirect() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            local = Address(*accepted.getsockname())
            assert redirected(original_dst(accepted), local) is None
