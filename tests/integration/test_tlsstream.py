"""proxy.security.tlsstream on its own, over real loopback sockets and TLS with
certificates from a real `controlplane.ca` CA, on uvloop and on asyncio's loop:
interop with OpenSSL through Python's blocking ssl sockets (close_notify one
way, then the other), truncation, handshake failure and timeout. The two-sidecar
path is in test_tcp_halfclose_mtls.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, cast

import pytest
import uvloop

from controlplane import ca as ca_mod
from proxy.security import tls, tlsstream
from proxy.security.identity import WorkloadCertificate, make_csr, new_key

TIMEOUT = 8.0


def _issue(ca: ca_mod.CertificateAuthority, ns: str, sa: str) -> WorkloadCertificate:
    key = new_key()
    chain = ca.sign_csr(
        make_csr(key, ca_mod.spiffe_id(ca.trust_domain, ns, sa)), namespace=ns, service_account=sa
    )
    return WorkloadCertificate.from_chain(chain, key)


class Certs:
    def __init__(self) -> None:
        ca = ca_mod.CertificateAuthority.generate()
        bundle = ca.trust_bundle_pem()
        self.server = tls.server_context(_issue(ca, "db", "db"), bundle)
        self.client = tls.client_context(_issue(ca, "shop", "c"), bundle, ["synchro-tcp"])
        foreign = ca_mod.CertificateAuthority.generate()
        self.foreign_client = tls.client_context(
            _issue(foreign, "shop", "c"), foreign.trust_bundle_pem(), ["synchro-tcp"]
        )


@pytest.fixture(scope="module")
def certs() -> Certs:
    return Certs()


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine on a fresh loop of the kind, bounded by TIMEOUT."""
    runner = cast(
        Callable[[Coroutine[Any, Any, Any]], Any],
        uvloop.run if request.param == "uvloop" else asyncio.run,
    )

    async def bounded(coro: Coroutine[Any, Any, Any]) -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await coro

    return lambda coro: runner(bounded(coro))


class BlockingServer:
    """One connection on a thread, served by `handle` with Python's ssl socket."""

    def __init__(self, handle: Callable[[socket.socket], Any]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.error: BaseException | None = None
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, args=(handle,), daemon=True)
        self.thread.start()

    def _run(self, handle: Callable[[socket.socket], Any]) -> None:
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(TIMEOUT)
            with conn:
                self.result = handle(conn)
        except BaseException as exc:
            self.error = exc

    def join(self) -> Any:
        self.thread.join(TIMEOUT)
        self.sock.close()
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def servers() -> Iterator[list[BlockingServer]]:
    made: list[BlockingServer] = []
    yield made
    for s in made:
        s.sock.close()


async def _open(
    port: int, context: ssl.SSLContext, timeout: float = TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    transport, protocol = await tlsstream.connect(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
        "127.0.0.1",
        port,
        context,
        timeout=timeout,
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def _recv_all(s: ssl.SSLSocket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_interop_client_close_notify_first_then_the_answer(
    certs: Certs, run: Callable[[Coroutine[Any, Any, Any]], Any], servers: list[BlockingServer]
) -> None:
    def handle(raw: socket.socket) -> bytes:
        with certs.server.wrap_socket(raw, server_side=True) as s:
            request = _recv_all(s)  # b"" at the client's close_notify
            s.sendall(b"read %d bytes" % len(request))
            s.unwrap()
            return request

    server = BlockingServer(handle)
    servers.append(server)
    request = b"q" * 300_000

    async def client() -> tuple[bytes, bool]:
        reader, writer = await _open(server.port, certs.client)
        assert writer.can_write_eof()
        writer.write(request)
        await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        closing = writer.transport.is_closing()  # both directions done: closed
        writer.close()
        return answer, closing

    assert run(client()) == (b"read 300000 bytes", True)
    assert server.join() == request


def test_the_server_half_closes_first_between_two_tlsstream_ends(
    certs: Certs, run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    async def main() -> tuple[bytes, bytes, bytes]:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            loop.create_future()
        )

        def factory() -> tlsstream.TLSProtocol:
            reader = asyncio.StreamReader(loop=loop)
            app = asyncio.StreamReaderProtocol(reader, loop=loop)
            tls_protocol = tlsstream.TLSProtocol(app, certs.server, server_side=True)
            writer = asyncio.StreamWriter(tls_protocol.app_transport, app, reader, loop)
            tls_protocol.handshake_done.add_done_callback(
                lambda _: accepted.set_result((reader, writer))
            )
            return tls_protocol

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            c_r, c_w = await _open(port, certs.client)
            s_r, s_w = await accepted
            # The server half-closes first; the client keeps sending.
            s_w.write(b"server done")
            s_w.write_eof()
            first = await c_r.read()
            c_w.write(b"c" * 500_000)
            await c_w.drain()
            c_w.write(b"then done")
            c_w.write_eof()
            rest = await s_r.read()
            with pytest.raises(RuntimeError):
                s_w.write(b"after write_eof")
            for w in (c_w, s_w):
                w.close()
                await w.wait_closed()
            return first, rest[-9:], rest[:-9]

    first, tail, body = run(main())
    assert (first, tail, body) == (b"server done", b"then done", b"c" * 500_000)


def test_a_fin_without_close_notify_is_an_error_not_an_end(
    certs: Certs, run: Callable[[Coroutine[Any, Any, Any]], Any], servers: list[BlockingServer]
) -> None:
    def handle(raw: socket.socket) -> None:
        s = certs.server.wrap_socket(raw, server_side=True)
        s.sendall(b"partial answer")
        s.shutdown(socket.SHUT_WR)  # a FIN without close_notify: under TLS, a truncation
        with contextlib.suppress(ConnectionResetError):
            s.recv(1)  # (plain now) until the client resets or closes

    server = BlockingServer(handle)
    servers.append(server)

    async def client() -> bytes:
        reader, writer = await _open(server.port, certs.client)
        data = await reader.readexactly(len(b"partial answer"))
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        return data

    assert run(client()) == b"partial answer"
    server.join()


def test_a_refused_certificate_fails_the_connect(
    certs: Certs, run: Callable[[Coroutine[Any, Any, Any]], Any], servers: list[BlockingServer]
) -> None:
    def handle(raw: socket.socket) -> None:
        with pytest.raises(ssl.SSLError):
            certs.server.wrap_socket(raw, server_side=True)

    server = BlockingServer(handle)
    servers.append(server)

    async def client() -> None:
        with pytest.raises(ssl.SSLError):
            reader, _writer = await _open(server.port, certs.foreign_client)
            # TLS 1.3: the client may finish first and hear the alert on its first read.
            await reader.read()

    run(client())
    server.join()


def test_a_silent_server_times_the_handshake_out(
    certs: Certs, run: Callable[[Coroutine[Any, Any, Any]], Any], servers: list[BlockingServer]
) -> None:
    def handle(raw: socket.socket) -> str:
        assert raw.recv(65536)  # the ClientHello, never answered
        try:
            return "closed" if raw.recv(1) == b"" else "data"
        except ConnectionResetError:
            return "closed"

    server = BlockingServer(handle)
    servers.append(server)

    async def client() -> None:
        with pytest.raises(TimeoutError):
            await _open(server.port, certs.client, timeout=0.3)

    run(client())
    assert server.join() == "closed"  # the client gave up and closed the connection
