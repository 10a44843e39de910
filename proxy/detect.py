"""Protocol detection from a connection's first bytes (sans-IO core).

`detect(data)` looks at what a client sent so far and answers `Detected(protocol)`
or `NEED_MORE`. The listener calls it after each read and, when its detection
timeout expires or the client half-closes, once more with `final=True`, which
always decides (opaque TCP when nothing else fits).

- HTTP/2 with prior knowledge starts with the 24-byte connection preface.
- HTTP/1.x starts with a known method and a space; when the request line is
  complete it must end in `HTTP/1.0` or `HTTP/1.1`, otherwise the bytes are some
  other text protocol that merely starts with a word like `GET` (opaque).
- TLS starts with a handshake record header: type 22, version 3.x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.conn import Protocol

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9110 methods plus the common WebDAV and PATCH ones; methods are case-sensitive.
HTTP_METHODS: Final = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"SEARCH",
    b"REPORT",
    b"PURGE",
)
_METHOD_PREFIXES: Final = tuple(m + b" " for m in HTTP_METHODS)
# A request line longer than this is still handed to the HTTP/1 handler, which
# rejects it properly; detection should not buffer without bound.
MAX_REQUEST_LINE: Final = 8192

_TLS_HANDSHAKE: Final = 0x16
_TLS_MAJOR: Final = 0x03
_TLS_MAX_MINOR: Final = 0x04


@dataclass(frozen=True, slots=True)
class Detected:
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not enough bytes to decide yet."""


NEED_MORE: Final = NeedMore()
Result = Detected | NeedMore

_TCP: Final = Detected(Protocol.TCP)
_HTTP1: Final = Detected(Protocol.HTTP1)
_HTTP2: Final = Detected(Protocol.HTTP2)
_TLS: Final = Detected(Protocol.TLS)


def detect(data: bytes, *, final: bool = False) -> Result:
    """Decide the protocol from the bytes a client sent first.

    `final=True` means no more bytes will come in time: a decision is forced.
    """
    if not data:
        return _TCP if final else NEED_MORE
    undecided = False
    for check in (_h2, _tls, _http1):
        result = check(data)
        if isinstance(result, Detected):
            return result
        undecided = undecided or result is NEED_MORE
    if undecided and not final:
        return NEED_MORE
    # A method and a space without a complete line yet is HTTP/1, so that a
    # slow client meets the HTTP handler's header timeout rather than a tunnel.
    if final and data.startswith(_METHOD_PREFIXES) and b"\n" not in data:
        return _HTTP1
    return _TCP


def _h2(data: bytes) -> Result | None:
    if data.startswith(H2_PREFACE):
        return _HTTP2
    if H2_PREFACE.startswith(data):
        return NEED_MORE
    return None


def _tls(data: bytes) -> Result | None:
    if data[0] != _TLS_HANDSHAKE:
        return None
    if len(data) < 3:
        return NEED_MORE if len(data) < 2 or data[1] == _TLS_MAJOR else None
    if data[1] == _TLS_MAJOR and data[2] <= _TLS_MAX_MINOR:
        return _TLS
    return None


def _http1(data: bytes) -> Result | None:
    if not data.startswith(_METHOD_PREFIXES):
        if any(p.startswith(data) for p in _METHOD_PREFIXES):
            return NEED_MORE
        return None
    end = data.find(b"\n")
    if end < 0:
        return NEED_MORE if len(data) < MAX_REQUEST_LINE else _HTTP1
    line = data[:end].rstrip(b"\r")
    if line.endswith((b" HTTP/1.1", b" HTTP/1.0")):
        return _HTTP1
    return None
