"""Helpers for the traffic tests: real HTTP/1.1 upstreams, a fast keep-alive
client, and a ProxyConfig written to a file the proxy reads (`--config-file`).

Loopback has no `SO_ORIGINAL_DST`, so the proxy sees every outbound connection
going to its `--static-destination`; the config makes that address a Service's
ClusterIP:port, and the Service's endpoints are the real upstreams. Tests in
network namespaces use the same upstream and client with real ClusterIPs.

    with Upstream(name="a") as a, Upstream(name="b") as b:
        cfg = ConfigWriter(tmp_path / "proxy.json")
        vip = cfg.vip_port()
        cfg.write([service("default/web", vip, [a, b])])
        with run_proxy(static_destination=f"127.0.0.1:{vip}",
                       extra_args=[f"--config-file={cfg.path}"]) as proxy:
            with Client(proxy.outbound) as c:
                status, headers, body = c.get("/")
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

from proxy import config as pc
from tests.integration.proxy_harness import BackgroundServer, RunningProxy, free_port, start_proxy

# --- upstream -----------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Behaviour:
    """How an upstream answers. `fail_ratio` of requests get `fail_status`."""

    status: int = 200
    delay: float = 0.0
    fail_ratio: float = 0.0
    fail_status: int = 500
    seed: int = 0


class _Parser:
    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Upstream:
    """A real asyncio HTTP/1.1 server (keep-alive) on its own thread.

    Answers `<name> <path>` with the `Behaviour`'s status after its delay; the
    response carries `x-upstream: <name>`. `hits` counts requests by upstream,
    `seen` keeps the last 1000 requests."""

    def __init__(
        self, name: str = "up", behaviour: Behaviour | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.name = name
        self.behaviour = behaviour or Behaviour()
        self.hits = 0
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self._rng = random.Random(self.behaviour.seed)
        self.server = BackgroundServer(self._handle, host=host)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def host(self) -> str:
        return self.server.host

    def __enter__(self) -> Upstream:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()

    def reset(self) -> None:
        with self.lock:
            self.hits = 0
            self.seen.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                p = _Parser()
                while not p.done:
                    data = await reader.read(65536)
                    if not data:
                        return
                    p.parser.feed_data(data)
                b = self.behaviour
                with self.lock:
                    self.hits += 1
                    self.seen.append(
                        Seen(
                            p.parser.get_method().decode(), p.url.decode(), p.headers, bytes(p.body)
                        )
                    )
                    if len(self.seen) > 1000:
                        del self.seen[:500]
                    failing = b.fail_ratio > 0 and self._rng.random() < b.fail_ratio
                if b.delay:
                    await asyncio.sleep(b.delay)
                status = b.fail_status if failing else b.status
                body = f"{self.name} {p.url.decode()}\n".encode()
                writer.write(
                    b"HTTP/1.1 %d X\r\nx-upstream: %s\r\nContent-Length: %d\r\n\r\n%s"
                    % (status, self.name.encode(), len(body), body)
                )
                await writer.drain()
        except (ConnectionError, httptools.HttpParserError, asyncio.CancelledError):
            # (A cancelled handler must end normally: Python 3.11's stream callback
            # logs a spurious error otherwise.)
            pass
        finally:
            writer.close()


# --- client ---------------------------------------------------------------------------


class _Resp:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Client:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(
        self,
        address: tuple[str, int],
        timeout: float = 10.0,
        connect: Callable[[tuple[str, int]], socket.socket] | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        # How to open the connection; netns tests pass one that dials from a Pod.
        self.connect = connect
        self.sock: socket.socket | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> tuple[int, dict[str, str], bytes]:
        if self.sock is None:
            if self.connect is not None:
                self.sock = self.connect(self.address)
                self.sock.settimeout(self.timeout)
            else:
                self.sock = socket.create_connection(self.address, timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lines = [f"{method} {path} HTTP/1.1", "Host: web"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        resp = _Resp()
        parser = httptools.HttpResponseParser(resp)
        while not resp.done:
            data = self.sock.recv(65536)
            if not data:
                self.close()
                raise ConnectionError("proxy closed the connection before a full answer")
            parser.feed_data(data)
        status = parser.get_status_code()
        if not parser.should_keep_alive():
            self.close()
        return status, resp.headers, bytes(resp.body)

    def get(
        self, path: str = "/", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, headers)


def load(
    address: tuple[str, int],
    n: int,
    *,
    concurrency: int = 8,
    path: str = "/",
    headers: dict[str, str] | None = None,
    method: str = "GET",
    on_result: Callable[[int, dict[str, str], float], None] | None = None,
    connect: Callable[[tuple[str, int]], socket.socket] | None = None,
) -> list[tuple[int, str]]:
    """`n` requests over `concurrency` keep-alive connections -> [(status, x-upstream)].
    A connection error counts as status 0."""
    out: list[tuple[int, str]] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        with Client(address, connect=connect) as c:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    status, hdrs, _ = c.request(method, path, headers)
                except OSError:
                    c.close()
                    status, hdrs = 0, {}
                if on_result is not None:
                    on_result(status, hdrs, time.perf_counter() - t0)
                with lock:
                    out.append((status, hdrs.get("x-upstream", "")))

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return out


def share(results: Iterable[tuple[int, str]]) -> Counter[str]:
    return Counter(name for _, name in results)


# --- config ---------------------------------------------------------------------------


def endpoint(up: Upstream | tuple[str, int], **kw: Any) -> pc.Endpoint:
    host, port = (up.host, up.port) if isinstance(up, Upstream) else up
    return pc.Endpoint(ip=host, port=port, **kw)


def service(
    key: str,
    port: int,
    endpoints: Sequence[Upstream | tuple[str, int] | pc.Endpoint],
    *,
    cluster_ip: str = "127.0.0.1",
    protocol: str = "http",
    routes: Sequence[pc.Route] = (),
    policy: pc.TrafficPolicy | None = None,
    cluster_ips: Sequence[str] | None = None,
) -> pc.Service:
    ns, name = key.split("/")
    eps = tuple(e if isinstance(e, pc.Endpoint) else endpoint(e) for e in endpoints)
    return pc.Service(
        name=name,
        namespace=ns,
        cluster_ips=tuple(cluster_ips) if cluster_ips is not None else (cluster_ip,),
        ports=(pc.ServicePort(port=port, protocol=protocol, endpoints=eps),),
        routes=tuple(routes),
        policy=policy,
    )


def http_route(
    parent: str,
    backends: Sequence[tuple[str, int, int]],
    *,
    name: str = "r",
    match: pc.RouteMatch | None = None,
    filters: Sequence[pc.Filter] = (),
    timeouts: pc.RouteTimeouts | None = None,
    retry: pc.RouteRetry | None = None,
    kind: str = "http",
) -> pc.Route:
    ns = parent.split("/")[0]
    return pc.Route(
        kind=kind,
        name=f"{ns}/{name}",
        rule=0,
        match=match or pc.RouteMatch(),
        backends=tuple(pc.WeightedBackend(s, p, w) for s, p, w in backends),
        filters=tuple(filters),
        timeouts=timeouts,
        retry=retry,
    )


@dataclass
class ConfigWriter:
    """Writes ProxyConfig JSON atomically (rename) for `--config-file`."""

    path: Path
    outbound_policy: str = "ALLOW_ANY"
    inbound_services: tuple[str, ...] = ()
    count: int = field(default=0)

    def write(self, services: Sequence[pc.Service]) -> str:
        self.count += 1
        version = f"v{self.count}-{time.monotonic_ns()}"
        cfg = pc.ProxyConfig(
            version=version,
            mesh=pc.MeshSettings(outbound_policy=self.outbound_policy),
            services=tuple(services),
            inbound=pc.Inbound(services=self.inbound_services),
        )
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg.to_dict()))
        tmp.replace(self.path)
        return version

    @staticmethod
    def vip_port() -> int:
        return free_port()


def wait_version(proxy: Any, version: str, timeout: float = 5.0) -> None:
    """Until the proxy's /config_dump shows `version`."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = proxy.admin_json("/config_dump").get("version")
        if seen == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"proxy still on config {seen!r}, expected {version!r}")


class ConfiguredProxy:
    """A synchro-proxy whose static destination is 127.0.0.1:`vip` (a service's
    ClusterIP:port), configured through `--config-file`, access log in JSON.
    Started by the first `apply`; `close` stops it."""

    def __init__(self, tmp: Path) -> None:
        self.cfg = ConfigWriter(tmp / "proxy.json")
        self.vip = ConfigWriter.vip_port()
        self.proxy: RunningProxy | None = None

    def apply(self, services: Sequence[pc.Service]) -> None:
        """Write `services` as the proxy's config and wait until it runs on it."""
        version = self.cfg.write(services)
        if self.proxy is None:
            self.proxy = start_proxy(
                static_destination=f"127.0.0.1:{self.vip}",
                extra_args=[f"--config-file={self.cfg.path}", "--access-log=json"],
            )
        wait_version(self.proxy, version)

    @property
    def address(self) -> tuple[str, int]:
        assert self.proxy is not None
        return self.proxy.outbound

    def access_log(self) -> list[dict[str, Any]]:
        assert self.proxy is not None
        return [json.loads(line) for line in self.proxy.log().splitlines() if line.startswith("{")]

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
