"""Header handling for proxied HTTP/2 streams (pure: no I/O, no clock).

HTTP/2 forbids connection-specific header fields (RFC 9113 section 8.2.2); h2
already rejects most of them on the way in, and this module makes sure none is
ever forwarded whatever the peer sent. It also builds the answers the proxy
gives itself when the upstream cannot be reached: a plain ``502`` for HTTP, a
trailers-only ``grpc-status: 14`` (UNAVAILABLE) for gRPC, because gRPC clients
read the status from trailers and would report a 502 as a vague INTERNAL error.
"""

from __future__ import annotations

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


def _forwardable(name: bytes, value: bytes) -> bool:
    if name in CONNECTION_SPECIFIC:
        return False
    # `te` may only carry "trailers" in HTTP/2 (gRPC relies on it).
    return name != b"te" or value.strip().lower() == b"trailers"


def request_headers(headers: Iterable[Header], new_request_id: Callable[[], bytes]) -> list[Header]:
    """Headers to send upstream: connection-specific fields dropped, x-request-id added when absent."""
    out: list[Header] = []
    has_id = False
    for name, value in headers:
        if _forwardable(name, value):
            out.append((name, value))
            if name == REQUEST_ID:
                has_id = True
    if not has_id:
        out.append((REQUEST_ID, new_request_id()))
    return out


def response_headers(headers: Iterable[Header]) -> list[Header]:
    """Response headers or trailers to send downstream, connection-specific fields dropped."""
    return [(n, v) for n, v in headers if _forwardable(n, v)]


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
