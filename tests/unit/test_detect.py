"""Protocol detection from the first bytes (proxy.detect)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.conn import Protocol
from proxy.detect import H2_PREFACE, HTTP_METHODS, NEED_MORE, Detected, NeedMore, detect

HTTP1 = Detected(Protocol.HTTP1)
HTTP2 = Detected(Protocol.HTTP2)
TLS = Detected(Protocol.TLS)
TCP = Detected(Protocol.TCP)

# A TLS 1.2/1.3 ClientHello record header and the start of its handshake.
CLIENT_HELLO = bytes.fromhex("160301020001000200030300") + b"\x00" * 32


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", HTTP1),
        (b"POST /upload HTTP/1.1\r\n", HTTP1),
        (b"HEAD / HTTP/1.0\r\n", HTTP1),
        (b"GET / HTTP/1.1\n", HTTP1),  # bare LF line ends, as lenient servers accept
        (b"OPTIONS * HTTP/1.1\r\n", HTTP1),
        (b"CONNECT example.com:443 HTTP/1.1\r\n", HTTP1),
        (b"PROPFIND /dav HTTP/1.1\r\n", HTTP1),
        (H2_PREFACE, HTTP2),
        (H2_PREFACE + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00", HTTP2),
        (CLIENT_HELLO, TLS),
        (b"\x16\x03\x00", TLS),  # SSL 3.0 record version
        (b"\x16\x03\x01", TLS),
        (b"\x16\x03\x05", TCP),  # no such TLS version
        (b"\x16\x02\x01", TCP),
        (b"SSH-2.0-OpenSSH_9.6\r\n", TCP),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", TCP),  # PostgreSQL SSLRequest
        (b"get / HTTP/1.1\r\n", TCP),  # methods are case-sensitive
        (b"GET key\r\n", TCP),  # a text protocol that is not HTTP/1
        (b"GET / HTTP/2.0\r\n", TCP),
        (b"GETX / HTTP/1.1\r\n", TCP),
        (b"PRI * HTTP/1.1\r\n", TCP),
        (b"*1\r\n$4\r\nPING\r\n", TCP),  # redis
    ],
)
def test_decides(data: bytes, expected: Detected) -> None:
    assert detect(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"G",
        b"GE",
        b"GET",
        b"GET ",
        b"GET /path",
        b"POS",
        b"PRI * HTTP/2",
        b"\x16",
        b"\x16\x03",
        b"PROPFI",
    ],
)
def test_waits_for_more_on_a_prefix(data: bytes) -> None:
    assert detect(data) == NEED_MORE


def test_long_request_line_is_http1_without_waiting_forever() -> None:
    assert detect(b"GET /" + b"a" * 10_000) == HTTP1


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", TCP),
        (b"GET / HTTP/1.1", HTTP1),  # a slow client: the HTTP handler's header timeout applies
        (b"GET ", HTTP1),
        (b"GE", TCP),
        (b"PRI * HTTP/2.0\r\n", TCP),
        (b"\x16\x03", TCP),
    ],
)
def test_final_always_decides(data: bytes, expected: Detected) -> None:
    assert detect(data, final=True) == expected


@given(st.binary(max_size=200), st.booleans())
def test_never_raises_and_final_always_decides(data: bytes, final: bool) -> None:
    result = detect(data, final=final)
    assert isinstance(result, Detected | NeedMore)
    if final:
        assert isinstance(result, Detected)


@given(st.binary(max_size=100), st.binary(max_size=100))
def test_a_decision_stands_when_more_bytes_arrive(head: bytes, tail: bytes) -> None:
    first = detect(head)
    if isinstance(first, Detected):
        assert detect(head + tail) == first


@st.composite
def http1_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(HTTP_METHODS))
    path = draw(st.from_regex(rb"/[A-Za-z0-9._~/?=&%-]{0,100}", fullmatch=True))
    version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/1.1"]))
    return method + b" " + path + b" " + version + b"\r\nHost: x\r\n\r\n"


def _first_decision(data: bytes, cuts: list[int]) -> Detected:
    """Feed `data` in pieces, as the listener does, until detection decides."""
    seen = b""
    for end in [*sorted(cuts), len(data)]:
        seen = data[:end] if end > len(seen) else seen
        result = detect(seen)
        if isinstance(result, Detected):
            return result
    result = detect(data, final=True)
    assert isinstance(result, Detected)
    return result


@given(http1_requests(), st.lists(st.integers(min_value=0, max_value=300), max_size=5))
def test_http1_requests_are_http1_however_split(request: bytes, cuts: list[int]) -> None:
    assert _first_decision(request, cuts) == HTTP1


@given(st.binary(max_size=64), st.lists(st.integers(min_value=0, max_value=90), max_size=5))
def test_h2_preface_is_h2_however_split(frames: bytes, cuts: list[int]) -> None:
    assert _first_decision(H2_PREFACE + frames, cuts) == HTTP2


@given(st.binary(min_size=1, max_size=64))
def test_bytes_no_protocol_starts_with_are_opaque(data: bytes) -> None:
    if data[:1] in (b"\x16",) or any(
        m.startswith(data[: len(m)]) or data.startswith(m) for m in (*HTTP_METHODS, b"PRI")
    ):
        return
    assert detect(data) == TCP
