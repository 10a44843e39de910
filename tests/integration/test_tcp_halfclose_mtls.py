"""Opaque TCP between two sidecars over STRICT mTLS carries a half-close both
ways (TLS close_notify on the mesh leg, FIN to the apps), passes resets on, and
logs the connection when it ends.

Layout (all on 127.0.0.1, no controller): two in-process sidecars with the
proxy's real listeners and handlers, each on its own event loop thread
(uvloop, as in production, and asyncio's), with certificates from a real
`controlplane.ca` CA; `client` -> client sidecar (outbound) -> mTLS, ALPN
synchro-tcp -> server sidecar (inbound, STRICT) -> the test's listening socket.
The test plays both apps with blocking sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import uvloop

from controlplane import ca as ca_mod
from proxy import config as pc
from proxy import listener as listener_mod
from proxy.conn import Address, Direction, ProxyContext
from proxy.listener import Listener, ListenerSettings
from proxy.registry import Registry
from proxy.security.enroll import TLSMaterial
from proxy.security.identity import WorkloadCertificate, make_csr, new_key
from proxy.security.runtime import MeshSecurity, attach
from proxy.telemetry.accesslog import AccessLog
from proxy.telemetry.telemetry import Telemetry, TelemetrySettings
from tests.integration.proxy_harness import free_port

CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
SERVER_ID = "spiffe://cluster.local/ns/db/sa/db"
TIMEOUT = 8.0  # per blocking socket call; the old code hangs here until it expires


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


class Snapshot:
    def __init__(self, config: pc.ProxyConfig) -> None:
        self.config = config
        self.registry = Registry(config)


class Sidecar:
    """One proxy: a listener with a static destination, mesh security with a
    static certificate and config, a JSON access log kept in memory."""

    def __init__(
        self,
        name: str,
        direction: Direction,
        target: int,
        material: TLSMaterial,
        config: pc.ProxyConfig,
        loop_kind: str,
    ) -> None:
        self.name = name
        self.direction = direction
        self.port = free_port()
        self.target = target
        self.material = material
        self.config = config
        self.loop_kind = loop_kind
        self.access = Lines()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Sidecar:
        started: Future[None] = Future()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.result(timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None and self.thread is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(10)

    def _run(self, started: Future[None]) -> None:
        try:
            if self.loop_kind == "uvloop":
                uvloop.run(self._main(started))
            else:
                asyncio.run(self._main(started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)

    async def _main(self, started: Future[None]) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ctx = ProxyContext(connect_timeout=3.0, header_timeout=10.0, idle_timeout=60.0)
        ctx.telemetry = Telemetry(TelemetrySettings(access_log="json", workload=self.name))
        logger = logging.getLogger(f"test.access.{self.name}.{id(self)}")
        logger.addHandler(self.access)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        ctx.telemetry.access_log = AccessLog("json", logger)
        security = MeshSecurity()
        security.static_material = self.material
        security.on_config(Snapshot(self.config))
        attach(ctx, security)
        item = Listener(
            ListenerSettings(
                name=self.name,
                direction=self.direction,
                addresses=(Address("127.0.0.1", self.port),),
                static_destination=Address("127.0.0.1", self.target),
            ),
            ctx,
            listener_mod.load_handlers(),
        )
        await item.start()
        started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            item.stop_accepting()
            listener_mod.cancel_connections([item])
            await listener_mod.wait_connections([item], 2.0)

    def tcp_lines(self) -> list[dict[str, Any]]:
        return [line for line in self.access.lines if line["protocol"] == "tcp"]


def _issue(ca: ca_mod.CertificateAuthority, ns: str, sa: str) -> WorkloadCertificate:
    key = new_key()
    chain = ca.sign_csr(
        make_csr(key, ca_mod.spiffe_id(ca.trust_domain, ns, sa)), namespace=ns, service_account=sa
    )
    return WorkloadCertificate.from_chain(chain, key)


class Pair:
    def __init__(self, client: Sidecar, server: Sidecar, app: socket.socket) -> None:
        self.client = client
        self.server = server
        self.app = app

    def connect(self) -> tuple[socket.socket, socket.socket]:
        """(client's socket, the server app's accepted socket) through both sidecars.
        The client speaks first (opaque bytes: detection says TCP)."""
        client = socket.create_connection(("127.0.0.1", self.client.port), timeout=TIMEOUT)
        client.sendall(b"\x00hello\n")
        server, _ = self.app.accept()
        server.settimeout(TIMEOUT)
        assert _recv_exactly(server, 7) == b"\x00hello\n"
        return client, server


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    ca = ca_mod.CertificateAuthority.generate()
    bundle = ca.trust_bundle_pem()
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(16)
    app.settimeout(TIMEOUT)
    app_port = app.getsockname()[1]
    server_config = pc.ProxyConfig(
        version="1",
        inbound=pc.Inbound(peer_authentication=pc.PeerAuthentication(mode="STRICT")),
    )
    server = Sidecar(
        "db",
        Direction.INBOUND,
        app_port,
        TLSMaterial.build(_issue(ca, "db", "db"), bundle),
        server_config,
        request.param,
    )
    client_config = pc.ProxyConfig(
        version="1",
        services=(
            pc.Service(
                name="db",
                namespace="db",
                cluster_ips=("10.96.0.20",),
                ports=(
                    pc.ServicePort(
                        port=5000,
                        target_port=server.port,
                        endpoints=(
                            pc.Endpoint(
                                ip="127.0.0.1",
                                port=server.port,
                                identity=SERVER_ID,
                                meshed=True,
                                pod="db/db-0",
                            ),
                        ),
                    ),
                ),
            ),
        ),
    )
    client = Sidecar(
        "frontend",
        Direction.OUTBOUND,
        server.port,
        TLSMaterial.build(_issue(ca, "shop", "frontend"), bundle),
        client_config,
        request.param,
    )
    with app, server, client:
        yield Pair(client, server, app)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def _recv_to_eof(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 16):
        out += chunk
    return bytes(out)


def _payload(n: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * 64
    return (block * (n // len(block) + 1))[:n]


def _send_in_thread(s: socket.socket, data: bytes, then: Callable[[], None]) -> threading.Thread:
    """Send while the caller reads: big payloads would fill both directions' buffers."""

    def run() -> None:
        s.sendall(data)
        then()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _wait(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"not {what} within {timeout}s")


def test_a_client_half_close_reaches_the_server_which_answers_after_eof(pair: Pair) -> None:
    client, server = pair.connect()
    with client, server:
        request = _payload(1_000_000, b"request")
        sender = _send_in_thread(client, request, lambda: client.shutdown(socket.SHUT_WR))
        # The server reads to EOF (echo-until-EOF, `wc`): only the client's FIN,
        # carried as close_notify between the sidecars, ends this read.
        assert _recv_to_eof(server) == request
        sender.join(TIMEOUT)
        answer = _payload(2_000_000, hashlib.sha256(request).digest())
        server.sendall(answer)
        server.close()
        assert _recv_to_eof(client) == answer


def test_a_server_half_close_leaves_the_client_to_server_direction_open(pair: Pair) -> None:
    client, server = pair.connect()
    with client, server:
        server.sendall(b"greeting, then I stop talking\n")
        server.shutdown(socket.SHUT_WR)
        assert _recv_to_eof(client) == b"greeting, then I stop talking\n"
        # The client keeps sending after the server's FIN; all of it arrives.
        more = _payload(1_500_000, b"more")
        sender = _send_in_thread(client, more, lambda: client.shutdown(socket.SHUT_WR))
        assert _recv_to_eof(server) == more
        sender.join(TIMEOUT)


def test_a_server_reset_after_the_client_half_close_resets_the_client(pair: Pair) -> None:
    client, server = pair.connect()
    with client:
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert _recv_to_eof(server) == b"last words"
        _reset(server)
        with pytest.raises(ConnectionResetError):
            _recv_to_eof(client)


def test_a_client_reset_after_its_half_close_resets_the_server(pair: Pair) -> None:
    client, server = pair.connect()
    with server:
        client.shutdown(socket.SHUT_WR)
        assert _recv_to_eof(server) == b""
        _reset(client)
        # The server, still writing, sees the reset (bounded: about 8 s at most).
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(400):
                server.sendall(b"x" * 1024)
                time.sleep(0.02)


def test_the_connection_is_logged_by_both_sidecars_when_it_ends(pair: Pair) -> None:
    before = len(pair.client.tcp_lines()), len(pair.server.tcp_lines())
    client, server = pair.connect()
    with client, server:
        client.sendall(b"12345")
        client.shutdown(socket.SHUT_WR)
        assert _recv_to_eof(server) == b"12345"
        server.sendall(b"answer")
        server.close()
        assert _recv_to_eof(client) == b"answer"

    def logged() -> bool:
        return (len(pair.client.tcp_lines()), len(pair.server.tcp_lines())) == (
            before[0] + 1,
            before[1] + 1,
        )

    _wait(logged, "logged by both sidecars")
    out, into = pair.client.tcp_lines()[-1], pair.server.tcp_lines()[-1]
    sent = len(b"\x00hello\n12345")
    assert (out["bytes_received"], out["bytes_sent"]) == (sent, len(b"answer"))
    assert (into["bytes_received"], into["bytes_sent"]) == (sent, len(b"answer"))
    assert out["response_flags"] in ("", "-", None), out
    assert into["source_principal"] == CLIENT_ID, into
    assert into["connection_security_policy"] == "mutual_tls", into
