"""proxy.h2headers: validation and rewriting of HTTP/2 header blocks (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.h2headers import (
    MalformedHeaders,
    encode_grpc_message,
    error_response,
    is_grpc,
    request_headers,
    response_headers,
    trailer_headers,
)

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/")]


def fixed_id() -> bytes:
    return b"id-1"


def test_request_id_added_when_absent_and_kept_when_present() -> None:
    assert request_headers(GET, fixed_id)[-1] == (b"x-request-id", b"id-1")
    kept = request_headers([*GET, (b"x-request-id", b"mine")], fixed_id)
    assert [v for n, v in kept if n == b"x-request-id"] == [b"mine"]


def test_request_keeps_order_and_te_trailers() -> None:
    headers = [*GET, (b"te", b"trailers"), (b"content-type", b"application/grpc"), (b"a", b"1")]
    assert request_headers(headers, fixed_id)[:-1] == headers


@pytest.mark.parametrize(
    "headers",
    [
        [*GET, (b"connection", b"keep-alive")],
        [*GET, (b"transfer-encoding", b"chunked")],
        [*GET, (b"upgrade", b"websocket")],
        [*GET, (b"te", b"gzip")],
        [*GET, (b"Content-Type", b"text/plain")],  # uppercase
        [*GET, (b"", b"x")],
        [*GET, (b"bad name", b"x")],
        [*GET, (b"x", b"a\r\nInjected: yes")],
        [*GET, (b"x", b"nul\x00")],
        [*GET, (b"x", b" leading")],
        [*GET, (b"x", b"trailing\t")],
        [(b"x", b"1"), *GET],  # pseudo-header after a regular one
        [*GET, (b":method", b"POST")],  # repeated
        [*GET, (b":status", b"200")],  # response pseudo-header in a request
        [*GET, (b":protocol", b"websocket")],
        [(b":scheme", b"http"), (b":path", b"/")],  # no :method
        [(b":method", b"GET"), (b":scheme", b"http")],  # no :path
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"")],
        [(b":method", b"CONNECT"), (b":authority", b"h:1"), (b":path", b"/")],
    ],
)
def test_malformed_requests_are_rejected(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedHeaders):
        request_headers(headers, fixed_id)


def test_connect_request() -> None:
    out = request_headers([(b":method", b"CONNECT"), (b":authority", b"h:443")], fixed_id)
    assert out[0] == (b":method", b"CONNECT")


def test_response_drops_connection_specific_fields() -> None:
    out = response_headers(
        [(b":status", b"200"), (b"connection", b"close"), (b"keep-alive", b"x"), (b"x-a", b"1")]
    )
    assert out == [(b":status", b"200"), (b"x-a", b"1")]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-a", b"1")],
        [(b":status", b"20")],
        [(b":status", b"abc")],
        [(b":status", b"200"), (b":status", b"200")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b"x-a", b"1"), (b":status", b"200")],
        [(b":status", b"200"), (b"X-Upper", b"1")],
    ],
)
def test_malformed_responses_are_rejected(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedHeaders):
        response_headers(headers)


def test_trailers() -> None:
    assert trailer_headers([(b"grpc-status", b"0"), (b"grpc-message", b"")]) == [
        (b"grpc-status", b"0"),
        (b"grpc-message", b""),
    ]
    with pytest.raises(MalformedHeaders):
        trailer_headers([(b":status", b"200")])


def test_grpc_error_response_is_trailers_only_unavailable() -> None:
    request = [*GET, (b"content-type", b"application/grpc+proto")]
    assert is_grpc(request)
    out = dict(error_response(request, 502, 14, "upstream unavailable: é"))
    assert out[b":status"] == b"200"
    assert out[b"grpc-status"] == b"14"
    assert out[b"grpc-message"] == b"upstream unavailable: %C3%A9"


def test_plain_error_response_is_the_http_status() -> None:
    out = dict(error_response(GET, 502, 14, "refused"))
    assert out[b":status"] == b"502"
    assert b"grpc-status" not in out


@given(st.text())
def test_grpc_message_encoding_is_printable_ascii_and_reversible(message: str) -> None:
    encoded = encode_grpc_message(message)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    # gRPC's percent-decoding gives the UTF-8 bytes back.
    from urllib.parse import unquote_to_bytes

    assert unquote_to_bytes(encoded) == message.encode()


_names = st.from_regex(rb"\A[a-z][a-z0-9-]{0,15}\Z", fullmatch=True)
_values = st.binary(max_size=40)


@given(st.lists(st.tuples(_names, _values), max_size=8))
def test_requests_either_pass_unchanged_or_are_rejected(extra: list[tuple[bytes, bytes]]) -> None:
    headers = [*GET, *extra]
    try:
        out = request_headers(headers, fixed_id)
    except MalformedHeaders:
        return
    body = out[: len(headers)]
    assert body == headers
    for _, value in out:
        assert b"\r" not in value and b"\n" not in value and b"\x00" not in value


def test_never_indexed_fields_are_forwarded_as_such() -> None:
    """RFC 7541 7.1.3: the proxy passes hpack's NeverIndexedHeaderTuple on unchanged."""
    from hpack import NeverIndexedHeaderTuple

    secret = NeverIndexedHeaderTuple(b"authorization", b"Bearer x")
    assert type(request_headers([*GET, secret], fixed_id)[4]) is NeverIndexedHeaderTuple
    response = response_headers([(b":status", b"200"), secret])
    assert type(response[1]) is NeverIndexedHeaderTuple
    assert type(trailer_headers([secret])[0]) is NeverIndexedHeaderTuple
