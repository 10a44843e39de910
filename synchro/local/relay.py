"""A TCP relay from the host into a network namespace: the local mesh's dashboard.

The controller of a `synchro up` mesh listens inside the mesh's node namespace
(nothing of the mesh is added to the host's namespace). To let a browser on the
host open its dashboard, the supervisor runs this relay: an asyncio server on
127.0.0.1:PORT in the host namespace that, per accepted connection, opens a
socket inside the node namespace and pipes bytes both ways.

Why a socket made by a short-lived thread that enters the namespace
(`netns.netns_socket`) rather than a forked helper or `setns` in the relay's own
thread: a network namespace is per thread, and a socket keeps the namespace it
was created in for life. So one helper thread per connection enters the node
namespace, creates the socket and exits; the event loop thread, the listening
socket and the supervisor's other threads all stay in the host namespace. No
extra process exists, so there is nothing more for `synchro down` to find and
stop, and a relay that dies dies with its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CONNECT_SECONDS = 5.0

SocketFactory = Callable[[], socket.socket]


class RelayError(Exception):
    """The relay could not start; the message says why (e.g. the port is taken)."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    make_socket: SocketFactory  # an unconnected socket where `host` is reachable


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        # Half-close: an HTTP client may still be reading the answer.
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _connect(
    target: Target,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    # netns_socket starts and joins a thread: keep that off the event loop.
    sock = await loop.run_in_executor(None, target.make_socket)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (target.host, target.port)), CONNECT_SECONDS)
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def _handle(
    target: Target, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
) -> None:
    try:
        up_r, up_w = await _connect(target)
    except Exception as exc:  # refused, timed out, no namespace: the client gets a close
        log.warning("dashboard relay: cannot reach %s:%d: %s", target.host, target.port, exc)
        client_w.close()
        return
    try:
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
    finally:
        for w in (up_w, client_w):
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()


class Relay:
    """`listen` (host, port) in this namespace -> `target`, on a thread of its own."""

    def __init__(self, listen: tuple[str, int], target: Target) -> None:
        self.listen = listen
        self.target = target
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/"

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind now (so a taken port is known at once), then serve in a thread."""
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(
                    lambda r, w: _handle(self.target, r, w),
                    *self.listen,
                    reuse_address=True,
                )
            )
        except OSError as exc:
            self._loop.close()
            host, port = self.listen
            if exc.errno == errno.EADDRINUSE:
                raise RelayError(f"{host}:{port} is already in use") from exc
            raise RelayError(f"cannot listen on {host}:{port}: {exc}") from exc
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dashboard-relay", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return

        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            # Let the handlers' `finally` close both sockets of every relayed connection.
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        self._thread = None
