"""In-process sidecars for security tests: the proxy's real listeners, handlers,
enrollment client and config client, each proxy on its own event loop thread,
talking to a real `synchro-controller` process over HTTPS.

    proxy = MeshProxy(controller, tokens, namespace="shop", service_account="frontend",
                      outbound={"web": inbound_port_of_server}, app_port=None)
    with proxy:                       # enrolls, subscribes, listens
        proxy.outbound_port("web")    # a client connects here to reach the server's sidecar

An outbound listener has a static destination (no iptables on loopback): the
other sidecar's inbound port, which the controller knows as a meshed Pod's
endpoint (ip 127.0.0.1, the Service's targetPort), so `proxy.upstream` speaks
mTLS to it exactly as it would to a Pod IP.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import uvloop

from controlplane.tokens import LocalTokens
from proxy import listener as listener_mod
from proxy.config_client import ConfigClient
from proxy.conn import Address, Direction, ProxyContext
from proxy.listener import Listener, ListenerSettings
from proxy.security.enroll import Enrollment, EnrollSettings
from proxy.security.runtime import MeshSecurity, attach
from tests.integration.controller_harness import ControllerProcess
from tests.integration.proxy_harness import free_port


class MeshProxy:
    def __init__(
        self,
        controller: ControllerProcess,
        tokens: LocalTokens,
        workdir: Path,
        *,
        namespace: str,
        service_account: str,
        labels: dict[str, str],
        app_port: int | None = None,
        outbound: dict[str, int] | None = None,
        pod: str | None = None,
    ) -> None:
        self.controller = controller
        self.namespace = namespace
        self.service_account = service_account
        self.labels = labels
        self.pod = pod or f"{labels.get('app', service_account)}-0"
        self.app_port = app_port
        self.inbound_port = free_port() if app_port is not None else 0
        self.outbound_ports = {name: free_port() for name in outbound or {}}
        self.outbound_targets = dict(outbound or {})
        self.token_file = workdir / f"token-{namespace}-{self.pod}"
        self.token_file.write_text(tokens.mint(namespace, service_account, pod=self.pod))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.ctx: ProxyContext | None = None
        self.security: MeshSecurity | None = None
        self.config_client: ConfigClient | None = None
        self.listeners: list[Listener] = []
        self._stop: asyncio.Event | None = None

    # --- lifecycle ----------------------------------------------------------------

    def register(self) -> None:
        """Report the Pod to the controller, as the local runtime does."""
        self.controller.request(
            "PUT",
            f"/v1/pods/{self.namespace}/{self.pod}",
            {
                "ip": "127.0.0.1",
                "labels": self.labels,
                "serviceAccount": self.service_account,
                "ready": True,
                "meshed": True,
            },
        )

    def __enter__(self) -> MeshProxy:
        self.register()
        started: Future[None] = Future()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.result(timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.loop is not None and self._stop is not None and self.thread is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(10)
        self.loop = None

    def _run(self, started: Future[None]) -> None:
        try:
            uvloop.run(self._main(started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)

    async def _main(self, started: Future[None]) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ctx = self.ctx = ProxyContext(connect_timeout=3.0, header_timeout=10.0, idle_timeout=60.0)
        settings = EnrollSettings(
            controller=self.controller.url,
            namespace=self.namespace,
            service_account=self.service_account,
            token_file=self.token_file,
            controller_ca=str(self.controller.cert),
            backoff_base=0.1,
            backoff_cap=0.5,
        )
        enrollment = Enrollment(settings)
        security = self.security = MeshSecurity(enrollment)
        attach(ctx, security)
        client = self.config_client = ConfigClient(
            self.controller.url,
            namespace=self.namespace,
            pod=self.pod,
            service_account=self.service_account,
            labels=self.labels,
            ca_file=str(self.controller.cert),
            poll_wait=5.0,
            backoff_cap=0.3,
        )
        client.on_update(security.on_config)
        enrollment.start()
        client.start()
        handlers = listener_mod.load_handlers()
        specs = []
        if self.app_port is not None:
            specs.append(
                ("inbound", Direction.INBOUND, self.inbound_port, self.app_port),
            )
        for name, port in self.outbound_ports.items():
            specs.append(
                (f"outbound-{name}", Direction.OUTBOUND, port, self.outbound_targets[name])
            )
        for name, direction, port, target in specs:
            item = Listener(
                ListenerSettings(
                    name=name,
                    direction=direction,
                    addresses=(Address("127.0.0.1", port),),
                    static_destination=Address("127.0.0.1", target),
                ),
                ctx,
                handlers,
            )
            await item.start()
            self.listeners.append(item)
        started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            for item in self.listeners:
                item.stop_accepting()
            listener_mod.cancel_connections(self.listeners)
            await listener_mod.wait_connections(self.listeners, 2.0)
            await client.stop()
            await enrollment.stop()

    # --- helpers for tests --------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the proxy's loop thread and return its result."""
        assert self.loop is not None
        fut: Future[Any] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(10)

    def outbound_port(self, name: str) -> int:
        return self.outbound_ports[name]

    def wait_ready(
        self, predicate: Callable[[MeshProxy], bool], what: str, timeout: float = 15
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call(lambda: predicate(self)):
                return
            time.sleep(0.05)
        status = self.call(lambda: json.dumps(self.security.status() if self.security else {}))
        raise AssertionError(f"{self.pod}: not {what} within {timeout}s: {status}")

    @property
    def enrollment(self) -> Enrollment:
        assert self.security is not None and self.security.enrollment is not None
        return self.security.enrollment


def has_cert(p: MeshProxy) -> bool:
    return p.security is not None and p.security.material is not None


def config_version(p: MeshProxy) -> str:
    return p.config_client.version if p.config_client else ""


def knows_meshed_endpoint(port: int) -> Callable[[MeshProxy], bool]:
    def check(p: MeshProxy) -> bool:
        registry = p.security.registry if p.security else None
        if registry is None:
            return False
        from proxy.registry import ToEndpoint

        hit = registry.resolve("127.0.0.1", port)
        return isinstance(hit, ToEndpoint) and hit.endpoint.meshed

    return check


def mode_is(port: int, mode: str) -> Callable[[MeshProxy], bool]:
    def check(p: MeshProxy) -> bool:
        return (
            p.security is not None
            and p.security.config is not None
            and (p.security.mode_for(port) == mode)
        )

    return check
