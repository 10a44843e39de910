"""Run `synchro-proxy` as a real subprocess on free loopback ports, for tests.

Use either the context manager::

    from tests.integration.proxy_harness import run_proxy

    with run_proxy(static_destination=f"127.0.0.1:{server_port}") as proxy:
        sock = socket.create_connection(proxy.outbound)

or the pytest fixture (import it into your test module so pytest sees it)::

    from tests.integration.proxy_harness import proxy_process  # noqa: F401

    def test_x(proxy_process):
        proxy = proxy_process(static_destination="127.0.0.1:8080")
        ...

Without NAT (loopback tests) there is no `SO_ORIGINAL_DST`, so the proxy sends
every connection of both listeners to `static_destination`. Each proxy gets its
own free ports for the outbound, inbound, status and admin listeners; the
process is stopped (SIGTERM, then SIGKILL) when the test ends, also on failure.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HostPort = tuple[str, int]
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel just handed out; racy in theory, fine on a test host."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def proxy_command() -> list[str]:
    script = Path(sys.executable).with_name("synchro-proxy")
    if script.exists():
        return [str(script)]
    found = shutil.which("synchro-proxy")
    return [found] if found else [sys.executable, "-m", "proxy.main"]


@dataclass
class RunningProxy:
    process: subprocess.Popen[bytes]
    outbound: HostPort
    inbound: HostPort
    status: HostPort
    admin: HostPort
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def request(
        self,
        method: str,
        path: str,
        *,
        on: str = "status",
        timeout: float = 10.0,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        """One HTTP request to the status or admin listener -> (status, body)."""
        host, port = self.admin if on == "admin" else self.status
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get(self, path: str, *, on: str = "status", timeout: float = 10.0) -> tuple[int, bytes]:
        return self.request("GET", path, on=on, timeout=timeout)

    def admin_json(self, path: str) -> Any:
        status, body = self.get(path, on="admin")
        assert status == 200, (status, body)
        return json.loads(body)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self._stopped:
            return self.process.returncode
        self._stopped = True
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        # Whatever is left of the process group (workers of --concurrency).
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with suppress(OSError):
            self.log_path.unlink()
        return self.process.returncode


def wait_ready(proxy: RunningProxy, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            raise RuntimeError(
                f"synchro-proxy exited with {proxy.process.returncode}:\n{proxy.log()[-4000:]}"
            )
        try:
            status, _ = proxy.get("/healthz/ready", timeout=1.0)
            if status == 200:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"synchro-proxy not ready after {timeout}s ({last}):\n{proxy.log()[-4000:]}")


def start_proxy(
    *,
    static_destination: str | None = None,
    concurrency: int = 1,
    drain_seconds: float | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_level: str = "info",
    ready_timeout: float = 20.0,
    wrapper: Sequence[str] = (),
) -> RunningProxy:
    """Start a proxy on free loopback ports and wait until /healthz/ready is 200.

    `extra_args` come last, so they override the listen flags if needed;
    `wrapper` prefixes the command (e.g. `setpriv --regid=1337 --clear-groups`).
    """
    ports = {name: free_port() for name in ("outbound", "inbound", "status", "admin")}
    args = [
        *wrapper,
        *proxy_command(),
        f"--outbound-listen={LOOPBACK}:{ports['outbound']}",
        f"--inbound-listen={LOOPBACK}:{ports['inbound']}",
        f"--status-listen={LOOPBACK}:{ports['status']}",
        f"--admin-listen={LOOPBACK}:{ports['admin']}",
        f"--concurrency={concurrency}",
        f"--log-level={log_level}",
    ]
    if static_destination:
        args.append(f"--static-destination={static_destination}")
    if drain_seconds is not None:
        args.append(f"--drain-seconds={drain_seconds}")
    args.extend(extra_args)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHRO_")}
    full_env.update(env or {})
    fd, log_name = tempfile.mkstemp(prefix="synchro-proxy-", suffix=".log")
    with os.fdopen(fd, "wb") as log_file:
        # Own process group so that stop() can also reap --concurrency workers.
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    proxy = RunningProxy(
        process=process,
        outbound=(LOOPBACK, ports["outbound"]),
        inbound=(LOOPBACK, ports["inbound"]),
        status=(LOOPBACK, ports["status"]),
        admin=(LOOPBACK, ports["admin"]),
        log_path=Path(log_name),
    )
    try:
        wait_ready(proxy, ready_timeout)
    except BaseException:
        proxy.stop(timeout=2)
        raise
    return proxy


@contextmanager
def run_proxy(**kwargs: Any) -> Iterator[RunningProxy]:
    """`start_proxy(**kwargs)` as a context manager that always stops it."""
    proxy = start_proxy(**kwargs)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def proxy_process() -> Iterator[Callable[..., RunningProxy]]:
    """A factory: `proxy_process(static_destination=..., ...)` -> RunningProxy.

    Every proxy it started is stopped at the end of the test.
    """
    started: list[RunningProxy] = []

    def start(**kwargs: Any) -> RunningProxy:
        proxy = start_proxy(**kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class BackgroundServer:
    """A real asyncio TCP server on a loopback port, on its own thread and loop.

    Upstreams for tests: `with BackgroundServer(handler) as server: server.port`.
    """

    def __init__(self, handler: StreamHandler, host: str = LOOPBACK) -> None:
        self.handler = handler
        self.host = host
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._server: asyncio.Server | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self.handler, self.host, 0, backlog=4096)
            self.port = int(self._server.sockets[0].getsockname()[1])

        try:
            self.loop.run_until_complete(start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        # Let handlers see their cancellation before the loop goes away.
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        def stop() -> None:
            if self._server is not None:
                self._server.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(10)


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
