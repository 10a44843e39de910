"""TLS with half-close for the opaque TCP leg between sidecars (ALPN synchro-tcp).

    transport, protocol = await connect(factory, host, port, context, timeout=5.0)
    transport = await accept(raw_transport, context, app_protocol, preread, timeout=5.0)

The transport given to the application protocol (a `StreamReaderProtocol`) is an
`asyncio.Transport` whose `write_eof()` sends TLS close_notify and keeps
reading, and whose protocol gets `eof_received()` on the peer's close_notify and
may keep writing: TLS 1.3 makes close_notify close only the sender's write side
(RFC 8446 section 6.1), which is how Envoy carries a TCP half-close over TLS.
The raw connection closes once both directions have ended.

Why a transport of our own: asyncio's SSL transport (asyncio/sslproto.py) and
uvloop's (which the proxy runs on) have no `write_eof`, and answer a received
close_notify with a full shutdown, so a client's FIN could never reach the
server's app through two sidecars. uvloop's SSLProtocol is a Cython class
whose read path cannot be overridden, and overriding the private state machine
of asyncio's would break with each Python release; this is the same
ssl.MemoryBIO + SSLObject pair they both drive, in about as many lines as such
an override. Only the synchro-tcp leg uses it: HTTP legs keep uvloop's C
transport, and never half-close.

OpenSSL 3.0 (checked with Python 3.11's ssl): after SSL_shutdown has sent
close_notify, SSL_read still returns the peer's data; after receiving one,
SSL_write still sends. Sidecars negotiate TLS 1.3 (OpenSSL's default maximum);
OpenSSL behaves the same under 1.2, where RFC 5246 would have the peer answer
close_notify at once, which no Synchro end does. One trap: `SSLObject.unwrap()` calls SSL_shutdown
twice, and the second call reads records to look for the peer's close_notify,
failing with APPLICATION_DATA_AFTER_CLOSE_NOTIFY when application data waits
in the incoming BIO. So the incoming BIO is decrypted to the application
first (a partial record left there is harmless).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

log = logging.getLogger(__name__)

READ_SIZE: Final = 256 * 1024

P = TypeVar("P", bound=asyncio.BaseProtocol)


class TLSProtocol(asyncio.Protocol):
    """The raw connection's protocol: TLS records in and out, plaintext to and
    from `app` through `app_transport` once the handshake is done."""

    def __init__(
        self, app: asyncio.BaseProtocol, context: ssl.SSLContext, *, server_side: bool
    ) -> None:
        self._app = cast(asyncio.Protocol, app)
        self._context = context
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=None
        )
        self._raw: asyncio.Transport | None = None
        self.app_transport = _AppTransport(self)
        self.handshake_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Nobody may be waiting any more (timeout): never "exception never retrieved".
        self.handshake_done.add_done_callback(_retrieve)
        self._wrapped = False
        self.sent_close_notify = False  # our close_notify went out
        self.got_close_notify = False  # the peer's close_notify came in
        self.closing = False
        self._error: Exception | None = None

    # --- raw transport side -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self._wrapped:
            self._handshake()
            if not self._wrapped:
                return
        self._read()

    def eof_received(self) -> bool:
        if self.got_close_notify:
            # A FIN after the peer's close_notify: we may still have to write.
            return not self.sent_close_notify
        # A FIN without close_notify could be a truncation: an error, not an end.
        self._fatal(ConnectionResetError("TLS peer closed the connection without close_notify"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if not self.handshake_done.done():
            self.handshake_done.set_exception(
                exc
                or self._error
                or ConnectionResetError("connection lost during the TLS handshake")
            )
        elif self._wrapped:
            self._app.connection_lost(exc or self._error)

    def pause_writing(self) -> None:
        if self._wrapped:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._wrapped:
            self._app.resume_writing()

    # --- TLS ------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None:
            self._raw.write(self._outgoing.read())

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert, so that the peer can say why
            if not self.handshake_done.done():
                self.handshake_done.set_exception(exc)
            self.closing = True
            if self._raw is not None:
                self._raw.close()
            return
        self._flush()
        self._wrapped = True
        if not self.handshake_done.done():
            self.handshake_done.set_result(None)
        self._app.connection_made(self.app_transport)

    def _read(self) -> None:
        """Decrypt all that the incoming BIO holds and hand it to the application."""
        chunks: list[bytes] = []
        eof = False
        error: ssl.SSLError | None = None
        try:
            while True:
                chunk = self._ssl.read(READ_SIZE)
                if not chunk:
                    eof = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except ssl.SSLError as exc:
            error = exc
        if chunks:
            self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if error is not None:
            self._fatal(error)
            return
        self._flush()  # post-handshake messages (key updates) may need an answer
        if eof and not self.got_close_notify:
            self.got_close_notify = True
            self._app.eof_received()
            self._finish_if_done()

    def _send_close_notify(self) -> None:
        self._read()  # see the module doc: unwrap must find no application data
        if self._error is not None:
            return
        self.sent_close_notify = True
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's close_notify comes in its own time
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._flush()

    def _finish_if_done(self) -> None:
        if self.sent_close_notify and self.got_close_notify and not self.closing:
            self.closing = True
            if self._raw is not None:
                self._raw.close()

    def _fatal(self, exc: Exception) -> None:
        log.debug("tls: %s", exc)
        if self._error is None:
            self._error = exc
        self.closing = True
        if self._raw is not None:
            self._raw.abort()

    # --- what the application transport does -------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.sent_close_notify:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data or self.closing:
            return
        self._ssl.write(data)
        self._flush()

    def write_eof(self) -> None:
        if not self.sent_close_notify and not self.closing:
            self._send_close_notify()
            self._finish_if_done()

    def close(self) -> None:
        if self.closing:
            return
        if self._wrapped and not self.sent_close_notify:
            self._send_close_notify()
        if not self.closing:
            self.closing = True
            if self._raw is not None:
                self._raw.close()

    def abort(self) -> None:
        self.closing = True
        if self._raw is not None:
            self._raw.abort()

    @property
    def raw(self) -> asyncio.Transport:
        assert self._raw is not None
        return self._raw

    def extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if name == "compression":
            return self._ssl.compression()
        return self.raw.get_extra_info(name, default) if self._raw is not None else default

    async def handshake(self, timeout: float) -> None:
        """Wait for the handshake; on failure or timeout the connection is aborted."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.handshake_done)
        except BaseException:
            self.abort()
            raise


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class _AppTransport(asyncio.Transport):
    """What the application protocol writes to (asyncio.Transport's interface)."""

    def __init__(self, tls: TLSProtocol) -> None:
        super().__init__()
        self._tls = tls

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.extra_info(name, default)

    def is_closing(self) -> bool:
        return self._tls.closing or self._tls.raw.is_closing()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)

    def write_eof(self) -> None:
        self._tls.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def is_reading(self) -> bool:
        return self._tls.raw.is_reading()

    def pause_reading(self) -> None:
        self._tls.raw.pause_reading()

    def resume_reading(self) -> None:
        self._tls.raw.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tls.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls._app = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls._app


async def connect(
    factory: Callable[[], P], host: str, port: int, context: ssl.SSLContext, *, timeout: float
) -> tuple[asyncio.Transport, P]:
    """Client side: `loop.create_connection(factory, host, port, ssl=context)` with
    a half-closable transport. Raises OSError (ssl.SSLError included) or TimeoutError."""
    loop = asyncio.get_running_loop()
    app = factory()
    _, tls = await loop.create_connection(
        lambda: TLSProtocol(app, context, server_side=False), host, port
    )
    await tls.handshake(timeout)
    return tls.app_transport, app


async def accept(
    raw: asyncio.Transport,
    context: ssl.SSLContext,
    app: asyncio.BaseProtocol,
    preread: bytes,
    *,
    timeout: float,
) -> asyncio.Transport:
    """Server side on an accepted connection whose reading is paused; `preread`
    holds the bytes already read from it (the ClientHello, for detection)."""
    tls = TLSProtocol(app, context, server_side=True)
    raw.set_protocol(tls)
    tls.connection_made(raw)
    if preread:
        tls.data_received(preread)
    raw.resume_reading()
    await tls.handshake(timeout)
    return tls.app_transport
