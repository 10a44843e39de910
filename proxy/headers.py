"""HTTP/1.x header rules for forwarding: pure functions, bytes in, bytes out.

The HTTP/1.1 handler parses with httptools, which hands headers over as
`(name, value)` byte pairs in wire order and case. These functions decide what
is forwarded (hop-by-hop fields removed per RFC 9110 section 7.6.1, including
the fields a `Connection` header names; `x-request-id` added when absent) and
how a message body is framed on the other side. They return lists of header lines
so that the adapter writes a whole head with a single `b"".join`.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

Headers = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1 plus the historic `proxy-connection` and `keep-alive` that
# clients still send. `trailer` is not among them: trailers are forwarded, and
# so is the field announcing them.
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"}
)
REQUEST_ID: Final = b"x-request-id"
# Sidecar-to-sidecar metadata (proxy.telemetry.telemetry explains it): a request
# forwarded upstream never carries the app's own copy; the sidecar adds its own
# over mesh mTLS.
PEER_WORKLOAD: Final = b"x-synchro-peer-workload"
_REQUEST_DROPPED: Final = HOP_BY_HOP | {PEER_WORKLOAD}
_SEP: Final = b": "
_CRLF: Final = b"\r\n"


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The lowercased options of one or more `Connection` field values."""
    out: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                out.add(token)
    return frozenset(out)


@dataclass(slots=True)
class RequestMeta:
    """What the handler needs to know about a request's head, found in one pass."""

    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False
    # The `Upgrade` value when the client asked for it (`Connection: upgrade`).
    upgrade: bytes | None = None
    # The client announced it accepts trailers (`TE: trailers`).
    te_trailers: bool = False
    has_host: bool = False
    request_id: bytes = b""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


_NO_TOKENS: Final[frozenset[bytes]] = frozenset()


# The options of the few `Connection` values seen again and again (keep-alive,
# close, upgrade), bounded.
_options: dict[bytes, frozenset[bytes]] = {}
_MAX_OPTIONS = 256


def _connection_options(headers: Headers) -> frozenset[bytes]:
    """The options of every `Connection` field (lowercased); usually one pass of
    length checks, since most messages carry none or `keep-alive`."""
    tokens = _NO_TOKENS
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            found = _options.get(value)
            if found is None:
                found = connection_tokens((value,))
                if len(value) <= 64:
                    if len(_options) >= _MAX_OPTIONS:
                        _options.clear()
                    _options[value] = found
            tokens = tokens | found if tokens else found
    return tokens


def forward_request(
    headers: Headers,
    *,
    new_request_id: Callable[[], bytes],
    default_host: bytes,
) -> tuple[list[bytes], RequestMeta]:
    """Header lines to send upstream (without framing/connection fields) and the meta.

    `new_request_id` is called only when the request carries no `x-request-id`.
    `default_host` fills in `Host` for HTTP/1.0 clients that omit it, since the
    upstream side always speaks HTTP/1.1.
    """
    tokens = _connection_options(headers)
    meta = RequestMeta()
    out: list[bytes] = []
    for name, value in headers:
        low = name.lower()
        if low in _REQUEST_DROPPED or low in tokens:
            if low == b"transfer-encoding":
                meta.chunked = True
            elif low == b"upgrade" and b"upgrade" in tokens:
                meta.upgrade = value
            elif low == b"te" and b"trailers" in connection_tokens((value,)):
                meta.te_trailers = True
            continue
        if low == b"content-length":
            meta.content_length = int(value)
        elif low == b"expect":
            meta.expect_continue = value.strip().lower() == b"100-continue"
        elif low == REQUEST_ID:
            meta.request_id = value
        elif low == b"host":
            meta.has_host = True
        out.append(b"%s: %s\r\n" % (name, value))
    if not meta.has_host:
        out.append(b"Host: %s\r\n" % default_host)
    if not meta.request_id:
        meta.request_id = new_request_id()
        out.append(b"x-request-id: %s\r\n" % meta.request_id)
    return out, meta


@dataclass(slots=True)
class ResponseMeta:
    content_length: int | None = None
    chunked: bool = False
    upgrade: bytes | None = None


def forward_response(headers: Headers) -> tuple[list[bytes], ResponseMeta]:
    """Header lines to send downstream (without framing/connection fields) and the meta."""
    tokens = _connection_options(headers)
    meta = ResponseMeta()
    out: list[bytes] = []
    length: bytes | None = None
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in tokens:
            if low == b"transfer-encoding":
                meta.chunked = True
            elif low == b"upgrade":
                meta.upgrade = value
            continue
        if low == b"content-length":
            # Decided below: with chunked framing the length must not be forwarded.
            meta.content_length = int(value)
            if length is None:
                length = b"%s: %s\r\n" % (name, value)
            continue
        out.append(b"%s: %s\r\n" % (name, value))
    if meta.chunked:
        meta.content_length = None
    elif length is not None:
        out.append(length)
    return out, meta


def trailer_block(trailers: Headers | None) -> bytes:
    """The end of a chunked body: last chunk, trailer fields, blank line."""
    if not trailers:
        return b"0\r\n\r\n"
    pieces = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() not in HOP_BY_HOP:
            pieces += (name, _SEP, value, _CRLF)
    pieces.append(_CRLF)
    return b"".join(pieces)


class RequestIds:
    """Random (version 4) UUIDs for x-request-id from a batch of OS randomness:
    one getrandom() call per 256 requests instead of one per request."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def __call__(self) -> bytes:
        pos = self._pos
        if pos + 16 > len(self._buf):
            self._buf = os.urandom(16 * 256)
            pos = 0
        self._pos = pos + 16
        raw = bytearray(self._buf[pos : pos + 16])
        raw[6] = (raw[6] & 0x0F) | 0x40
        raw[8] = (raw[8] & 0x3F) | 0x80
        h = raw.hex().encode()
        return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


new_request_id: Final = RequestIds()


class Framing(enum.Enum):
    """How a message body is delimited on the wire."""

    NONE = "none"  # no body at all
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"
    CLOSE = "close"  # until the connection closes (responses only)


def body_absent(status: int, head_request: bool) -> bool:
    """RFC 9112 6.3: responses that never carry a body whatever their headers say."""
    return head_request or status < 200 or status in (204, 304)


def upstream_response_framing(status: int, head_request: bool, meta: ResponseMeta) -> Framing:
    """How the upstream delimits the body it is sending us."""
    if body_absent(status, head_request):
        return Framing.NONE
    if meta.chunked:
        return Framing.CHUNKED
    if meta.content_length is not None:
        return Framing.LENGTH
    return Framing.CLOSE


def downstream_response_framing(upstream: Framing, client_http11: bool) -> Framing:
    """How we delimit that body for the client.

    A length passes through; otherwise HTTP/1.1 clients get chunks (so the
    connection stays reusable even behind a close-delimited upstream) and
    HTTP/1.0 clients get the body delimited by closing the connection.
    """
    if upstream in (Framing.NONE, Framing.LENGTH):
        return upstream
    return Framing.CHUNKED if client_http11 else Framing.CLOSE


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body, as pieces."""
    return (b"%x\r\n" % len(data), data, _CRLF)
