"""HTTP/1.x header rules: hop-by-hop removal, x-request-id, framing decisions."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from proxy import headers as h
from proxy.headers import Framing


def _fields(pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Parse the pieces back into fields, as a receiver would."""
    text = b"".join(pieces)
    assert text.endswith(b"\r\n") or not text
    out = []
    for line in text.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b": ")
        out.append((name, value))
    return out


def _ids() -> bytes:
    return b"generated-id"


def fwd(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], h.RequestMeta]:
    pieces, meta = h.forward_request(headers, new_request_id=_ids, default_host=b"up:80")
    return _fields(pieces), meta


def test_hop_by_hop_request_fields_are_removed_and_end_to_end_kept_in_order() -> None:
    out, meta = fwd(
        [
            (b"Host", b"svc"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"X-Secret", b"hidden"),
            (b"TE", b"gzip"),
            (b"Upgrade", b"h2c"),
            (b"Accept", b"*/*"),
            (b"Transfer-Encoding", b"chunked"),
        ]
    )
    assert out == [(b"Host", b"svc"), (b"Accept", b"*/*"), (b"x-request-id", b"generated-id")]
    assert meta.chunked and meta.has_body
    # Upgrade without `Connection: upgrade` is not an upgrade request.
    assert meta.upgrade is None
    assert not meta.te_trailers


def test_connection_option_named_later_than_its_field_is_still_removed() -> None:
    out, _ = fwd([(b"x-late", b"1"), (b"Host", b"a"), (b"connection", b"X-LATE")])
    assert (b"x-late", b"1") not in out


def test_request_id_is_preserved_when_present_and_generator_not_called() -> None:
    def boom() -> bytes:
        raise AssertionError("must not be called")

    pieces, meta = h.forward_request(
        [(b"Host", b"a"), (b"X-Request-Id", b"abc")], new_request_id=boom, default_host=b"x"
    )
    assert _fields(pieces) == [(b"Host", b"a"), (b"X-Request-Id", b"abc")]
    assert meta.request_id == b"abc"


def test_missing_host_is_filled_for_http10_clients() -> None:
    out, meta = fwd([(b"Accept", b"*/*")])
    assert (b"Host", b"up:80") in out
    assert not meta.has_host


def test_upgrade_expect_te_trailers_and_length_are_recognised() -> None:
    out, meta = fwd(
        [
            (b"Host", b"a"),
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Expect", b"100-Continue"),
            (b"TE", b"trailers"),
            (b"Content-Length", b"12"),
        ]
    )
    assert meta.upgrade == b"websocket"
    assert meta.expect_continue
    assert meta.te_trailers
    assert meta.content_length == 12 and meta.has_body
    assert (b"Content-Length", b"12") in out
    assert all(name.lower() not in h.HOP_BY_HOP for name, _ in out)


def test_zero_length_body_is_no_body() -> None:
    _, meta = fwd([(b"Host", b"a"), (b"Content-Length", b"0")])
    assert not meta.has_body


def test_response_fields_named_in_connection_are_removed() -> None:
    pieces, meta = h.forward_response(
        [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"close, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Trailer", b"x-checksum"),
            (b"Content-Length", b"5"),
        ]
    )
    assert _fields(pieces) == [
        (b"Content-Type", b"text/plain"),
        (b"Trailer", b"x-checksum"),
        (b"Content-Length", b"5"),
    ]
    assert meta.content_length == 5 and not meta.chunked


def test_response_length_is_dropped_when_chunked() -> None:
    pieces, meta = h.forward_response(
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")]
    )
    assert _fields(pieces) == []
    assert meta.chunked and meta.content_length is None


def test_response_upgrade_value_is_kept_in_meta() -> None:
    pieces, meta = h.forward_response(
        [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", b"x")]
    )
    assert _fields(pieces) == [(b"Sec-WebSocket-Accept", b"x")]
    assert meta.upgrade == b"websocket"


def test_trailer_block() -> None:
    assert h.trailer_block(None) == b"0\r\n\r\n"
    assert h.trailer_block([]) == b"0\r\n\r\n"
    assert (
        h.trailer_block([(b"X-Sum", b"abc"), (b"Connection", b"close")])
        == b"0\r\nX-Sum: abc\r\n\r\n"
    )


def test_chunk() -> None:
    assert b"".join(h.chunk(b"x" * 26)) == b"1a\r\n" + b"x" * 26 + b"\r\n"


def test_body_absent_for_head_1xx_204_304() -> None:
    assert h.body_absent(200, True)
    assert h.body_absent(100, False)
    assert h.body_absent(204, False)
    assert h.body_absent(304, False)
    assert not h.body_absent(200, False)
    assert not h.body_absent(404, False)


def test_response_framing_table() -> None:
    length = h.ResponseMeta(content_length=3)
    chunked = h.ResponseMeta(chunked=True)
    neither = h.ResponseMeta()
    assert h.upstream_response_framing(200, False, length) is Framing.LENGTH
    assert h.upstream_response_framing(200, False, chunked) is Framing.CHUNKED
    assert h.upstream_response_framing(200, False, neither) is Framing.CLOSE
    assert h.upstream_response_framing(200, True, chunked) is Framing.NONE
    assert h.upstream_response_framing(304, False, length) is Framing.NONE
    # HTTP/1.1 clients keep their connection behind a close-delimited upstream.
    assert h.downstream_response_framing(Framing.CLOSE, True) is Framing.CHUNKED
    assert h.downstream_response_framing(Framing.CHUNKED, True) is Framing.CHUNKED
    # HTTP/1.0 clients cannot read chunks.
    assert h.downstream_response_framing(Framing.CHUNKED, False) is Framing.CLOSE
    assert h.downstream_response_framing(Framing.LENGTH, False) is Framing.LENGTH
    assert h.downstream_response_framing(Framing.NONE, False) is Framing.NONE


def test_connection_tokens() -> None:
    assert h.connection_tokens([b"Keep-Alive, X-A ,,", b"close"]) == {
        b"keep-alive",
        b"x-a",
        b"close",
    }


_token = st.from_regex(re.compile(rb"\A[A-Za-z][A-Za-z0-9-]{0,12}\Z"))
_names = st.one_of(
    _token,
    st.sampled_from(
        [b"Connection", b"Keep-Alive", b"TE", b"Upgrade", b"Transfer-Encoding", b"Proxy-Connection"]
    ),
)
_value = st.from_regex(re.compile(rb"\A[ -~]{0,20}\Z")).map(bytes.strip)


@given(st.lists(st.tuples(_names, _value), max_size=12))
def test_forwarded_requests_never_carry_hop_by_hop_fields(
    fields: list[tuple[bytes, bytes]],
) -> None:
    fields = [(n, v) for n, v in fields if n.lower() != b"content-length"]
    out, meta = fwd(fields)
    tokens = h.connection_tokens(v for n, v in fields if n.lower() == b"connection")
    for name, _ in out:
        assert name.lower() not in h.HOP_BY_HOP
        assert name.lower() not in tokens
    # Every end-to-end field is kept, in order.
    kept = [(n, v) for n, v in fields if n.lower() not in h.HOP_BY_HOP | tokens]
    assert out[: len(kept)] == kept
    assert sum(1 for n, _ in out if n.lower() == b"x-request-id") >= 1
    assert meta.request_id
