"""Header handling for proxied HTTP/2 streams (pure: no I/O, no clock).

HTTP/2 forbids connection-specific header fields (RFC 9113 section 8.2.2); h2
already rejects most of them on the way in, and this module makes sure none is
ever forwarded whatever the peer sent. It also builds the answers the proxy
gives itself when the upstream cannot be reached: a plain ``502`` for HTTP, a
trailers-only ``grpc-status: 14`` (UNAVAILABLE) for gRPC, because gRPC clients
read the status from trailers and would report a 502 as a vague INTERNAL error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

Header = tuple[bytes, bytes]

# RFC 9113 8.2.2 plus the RFC 9110 hop-by-hop fields an HTTP/1 peer might leak.
CONNECTION_SPECIFIC = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

REQUEST_ID = b"x-request-id"
GRPC_UNAVAILABLE = 14

_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
# RFC 9110 5.6.2 tchar, lowercase only (RFC 9113 8.2.1); pseudo-header names start with ':'.
_NAME = re.compile(rb":?[!#$%&'*+\-.^_`|~0-9a-z]+")
# Names seen to be valid, so that the regex runs once per name, not once per header.
_good_names: set[bytes] = set()
_MAX_GOOD_NAMES = 4096
_WHITESPACE = (0x20, 0x09)


class MalformedHeaders(ValueError):
    """A header block HTTP/2 calls malformed (RFC 9113 8.1.1): a stream error."""


# Fields seen to be valid (bounded): a repeated field costs one set lookup.
_good_fields: set[tuple[bytes, bytes]] = set()
_MAX_GOOD_FIELDS = 4096
_MAX_GOOD_FIELD_LEN = 256


def _check_new_field(header: Header) -> None:
    name, value = header
    _check_field(name, value)
    if len(name) + len(value) <= _MAX_GOOD_FIELD_LEN:
        if len(_good_fields) >= _MAX_GOOD_FIELDS:
            _good_fields.clear()
        _good_fields.add(header)


def _check_field(name: bytes, value: bytes) -> None:
    if name not in _good_names:
        if _NAME.fullmatch(name) is None:
            raise MalformedHeaders(f"invalid header name {name[:64]!r}")
        if len(_good_names) >= _MAX_GOOD_NAMES:
            _good_names.clear()
        _good_names.add(name)
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        raise MalformedHeaders(f"invalid character in the value of {name[:64]!r}")
    if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE):
        raise MalformedHeaders(f"whitespace around the value of {name[:64]!r}")


def request_headers(headers: Iterable[Header], new_request_id: Callable[[], bytes]) -> list[Header]:
    """Validate a request header block and make the one to send upstream.

    Raises MalformedHeaders for what RFC 9113 8.2/8.3 forbid (including
    connection-specific fields); adds x-request-id when absent.
    """
    out: list[Header] = []
    pseudo: dict[bytes, bytes] = {}
    regular = False
    has_id = False
    # The received tuples are forwarded as they are: hpack's NeverIndexedHeaderTuple
    # must stay never-indexed on the next hop (RFC 7541 7.1.3).
    for header in headers:
        name, value = header
        if header not in _good_fields:
            _check_new_field(header)
        if name[0] == 0x3A:  # ':'
            if regular or name not in _REQUEST_PSEUDO or name in pseudo:
                raise MalformedHeaders(f"misplaced, unknown or repeated pseudo-header {name!r}")
            pseudo[name] = value
        else:
            regular = True
            if name in CONNECTION_SPECIFIC:
                raise MalformedHeaders(f"connection-specific header {name!r}")
            if name == b"te" and value != b"trailers":
                raise MalformedHeaders("te other than trailers")
            if name == REQUEST_ID:
                has_id = True
        out.append(header)
    method = pseudo.get(b":method")
    if not method:
        raise MalformedHeaders("no :method")
    if method == b"CONNECT":
        if b":authority" not in pseudo or b":path" in pseudo or b":scheme" in pseudo:
            raise MalformedHeaders("CONNECT needs :authority and no :scheme or :path")
    elif not pseudo.get(b":scheme") or not pseudo.get(b":path"):
        raise MalformedHeaders("no :scheme or :path")
    if not has_id:
        out.append((REQUEST_ID, new_request_id()))
    return out


def response_headers(headers: Iterable[Header]) -> list[Header]:
    """Validate a response header block and make the one to send downstream.

    Connection-specific fields a sloppy upstream sends are dropped rather than
    failing the response; anything else malformed raises MalformedHeaders.
    """
    out: list[Header] = []
    status: bytes | None = None
    regular = False
    for header in headers:
        name, value = header
        if header not in _good_fields:
            _check_new_field(header)
        if name[0] == 0x3A:
            if regular or name != b":status" or status is not None:
                raise MalformedHeaders(f"misplaced, unknown or repeated pseudo-header {name!r}")
            status = value
        else:
            regular = True
            if name in CONNECTION_SPECIFIC or name == b"te":
                continue
        out.append(header)
    if status is None or len(status) != 3 or not status.isdigit():
        raise MalformedHeaders(f"missing or invalid :status {status!r}")
    return out


def trailer_headers(headers: Iterable[Header]) -> list[Header]:
    """Validate trailers (either direction): regular fields only."""
    out: list[Header] = []
    for header in headers:
        name = header[0]
        if header not in _good_fields:
            _check_new_field(header)
        if name[0] == 0x3A:
            raise MalformedHeaders(f"pseudo-header {name!r} in trailers")
        if name in CONNECTION_SPECIFIC or name == b"te":
            continue
        out.append(header)
    return out


def header_value(headers: Iterable[Header], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def is_grpc(headers: Iterable[Header]) -> bool:
    content_type = header_value(headers, b"content-type")
    return content_type is not None and content_type.startswith(b"application/grpc")


def encode_grpc_message(message: str) -> bytes:
    """Percent-encode as the gRPC HTTP/2 spec requires for grpc-message."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def error_response(
    request: Iterable[Header], status: int, grpc_status: int, message: str
) -> list[Header]:
    """The complete (end-of-stream) header block the proxy answers with on its own behalf."""
    if is_grpc(request):
        return [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(grpc_status).encode()),
            (b"grpc-message", encode_grpc_message(message)),
        ]
    return [
        (b":status", str(status).encode()),
        (b"content-length", b"0"),
        (b"x-synchro-error", encode_grpc_message(message)),
    ]
