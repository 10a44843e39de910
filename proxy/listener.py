"""The outbound (15001) and inbound (15006) capture listeners.

Each accepted connection: find where it was going (`SO_ORIGINAL_DST`, or the
static destination when nothing was redirected), detect the protocol from its
first bytes (skipped for server-first ports; opaque TCP after a short timeout),
and hand a `Downstream` to that protocol's handler, which owns it from then on.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy import detect, origdst, tcp
from proxy.conn import Address, Direction, Downstream, Handler, Protocol, ProxyContext
from proxy.security import inbound

log = logging.getLogger(__name__)

DETECT_READ = 64 * 1024
BACKLOG = 4096

# Handlers written in their own modules; missing or broken ones fall back to TCP
# so that the proxy keeps carrying the bytes.
_HANDLER_MODULES = {Protocol.HTTP1: "proxy.http1", Protocol.HTTP2: "proxy.http2"}


def load_handlers() -> dict[Protocol, Handler]:
    handlers: dict[Protocol, Handler] = {Protocol.TCP: tcp.serve, Protocol.TLS: tcp.serve}
    for protocol, module_name in _HANDLER_MODULES.items():
        try:
            handlers[protocol] = importlib.import_module(module_name).serve
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                log.exception(
                    "%s does not import; %s goes as opaque TCP", module_name, protocol.value
                )
            else:
                log.warning("%s is missing; %s goes as opaque TCP", module_name, protocol.value)
            handlers[protocol] = tcp.serve
        except Exception:
            log.exception("%s does not import; %s goes as opaque TCP", module_name, protocol.value)
            handlers[protocol] = tcp.serve
    return handlers


@dataclass(frozen=True)
class ListenerSettings:
    name: str
    direction: Direction
    addresses: tuple[Address, ...]
    static_destination: Address | None = None
    # Server-first protocols: the client waits for the server, so detection would stall.
    opaque_ports: frozenset[int] = frozenset()
    detect_timeout: float = 0.3
    reuse_port: bool = False


def _address(sockaddr: object) -> Address:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return Address(str(sockaddr[0]), int(sockaddr[1]))
    return Address("?", 0)


@dataclass
class ListenerStats:
    accepted: int = 0
    refused: int = 0
    aborted: int = 0
    errors: int = 0
    protocols: Counter[str] = field(default_factory=Counter)


class Listener:
    """One capture listener: an asyncio server per address and its connections."""

    def __init__(
        self,
        settings: ListenerSettings,
        ctx: ProxyContext,
        handlers: dict[Protocol, Handler],
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.handlers = handlers
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()
        self.stats = ListenerStats()

    async def start(self) -> None:
        for address in self.settings.addresses:
            server = await asyncio.start_server(
                self._on_connect,
                address.host,
                address.port,
                reuse_port=self.settings.reuse_port or None,
                backlog=BACKLOG,
                limit=tcp.STREAM_LIMIT,
            )
            self.servers.append(server)
            log.info("%s listener on %s", self.settings.name, address)

    def bound(self) -> list[Address]:
        return [_address(s.getsockname()) for server in self.servers for s in server.sockets]

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    def describe(self) -> dict[str, object]:
        return {
            "name": self.settings.name,
            "direction": self.settings.direction.value,
            "addresses": [str(a) for a in self.bound()],
            "static_destination": str(self.settings.static_destination or "") or None,
            "accepting": any(s.is_serving() for s in self.servers),
            "active_connections": len(self.connections),
            "accepted": self.stats.accepted,
            "refused": self.stats.refused,
            "aborted": self.stats.aborted,
            "errors": self.stats.errors,
            "protocols": dict(self.stats.protocols),
        }

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)  # type: ignore[arg-type]
        self.stats.accepted += 1
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            tcp.reset(writer)
            raise
        except (ConnectionError, TimeoutError) as exc:
            # Clients vanish, mid-detection too: routine, not an error of the proxy.
            self.stats.aborted += 1
            log.debug("%s: connection aborted: %r", self.settings.name, exc)
            tcp.reset(writer)
        except Exception:
            self.stats.errors += 1
            log.exception("%s: connection failed", self.settings.name)
            tcp.reset(writer)
        finally:
            self.connections.discard(task)  # type: ignore[arg-type]
            if not writer.is_closing():
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        settings = self.settings
        sock = writer.get_extra_info("socket")
        peer = _address(writer.get_extra_info("peername"))
        local = _address(writer.get_extra_info("sockname"))
        original = origdst.redirected(
            origdst.original_dst(sock) if sock is not None else None, local
        )
        upstream = origdst.upstream_for(settings.direction, original, settings.static_destination)
        if upstream is None:
            self.stats.refused += 1
            log.warning(
                "%s: refusing %s: no original destination (connection not redirected) "
                "and no --static-destination",
                settings.name,
                peer,
            )
            tcp.reset(writer)
            return
        target = original or upstream
        inbound_mtls = settings.direction is Direction.INBOUND and inbound.detects_tls(
            self.ctx, target.port
        )
        if target.port in settings.opaque_ports and not inbound_mtls:
            protocol, preread = Protocol.TCP, b""
        else:
            # Inbound with mTLS: a sidecar speaks first even to server-first ports.
            protocol, preread = await self._detect(reader)
        downstream = Downstream(
            reader=reader,
            writer=writer,
            preread=preread,
            direction=settings.direction,
            protocol=protocol,
            original_dst=target,
            peer=peer,
            upstream=upstream,
        )
        if settings.direction is Direction.INBOUND:
            admitted = await inbound.admit(
                downstream, self.ctx, detect_timeout=settings.detect_timeout
            )
            if admitted is None or not inbound.tcp_allowed(self.ctx, admitted):
                self.stats.refused += 1
                return
            downstream = admitted
        self.stats.protocols[downstream.protocol.value] += 1
        await self.handlers[downstream.protocol](downstream, self.ctx)

    async def _detect(self, reader: asyncio.StreamReader) -> tuple[Protocol, bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.detect_timeout
        data = b""
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await reader.read(DETECT_READ)
            except TimeoutError:
                chunk = b""
            if not chunk:
                # Timeout or the client half-closed: decide with what we have.
                result = detect.detect(data, final=True)
                assert isinstance(result, detect.Detected)
                return result.protocol, data
            data += chunk
            result = detect.detect(data)
            if isinstance(result, detect.Detected):
                return result.protocol, data


async def wait_connections(listeners: Iterable[Listener], timeout: float) -> bool:
    """Wait until every connection of `listeners` finished; False on timeout."""
    tasks = {t for listener in listeners for t in listener.connections}
    if not tasks:
        return True
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    return not pending


def cancel_connections(listeners: Iterable[Listener]) -> None:
    for listener in listeners:
        for task in list(listener.connections):
            task.cancel()


def parse_listen(text: str) -> tuple[Address, ...]:
    """`"0.0.0.0:15001,[::]:15001"` -> addresses; empty -> () (listener disabled)."""
    out: list[Address] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        out.append(parse_host_port(item))
    return tuple(out)


def parse_host_port(text: str) -> Address:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Address(host, int(port))


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
