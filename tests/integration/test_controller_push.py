"""The controller with real config clients on loopback, over HTTPS.

The controller is the real `synchro-controller` process (`--config-dir`,
`--api-listen`); the subscribers are `proxy.config_client.ConfigClient`, the
proxy's own client, running in this process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, ProxyConfig
from proxy.config_client import ConfigClient
from proxy.registry import Passthrough, ToService
from tests.integration.controller_harness import ControllerProcess, run_controller

SERVICE_A = """
apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: a}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""

SERVICE_B = """
apiVersion: v1
kind: Service
metadata: {name: b, namespace: default}
spec:
  clusterIP: 10.96.0.11
  selector: {app: b}
  ports: [{name: tcp-db, port: 5432}]
"""

POD_A1 = {"ip": "10.1.0.1", "labels": {"app": "a"}, "serviceAccount": "a", "ready": True}


async def eventually(pred: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Wait for a condition (a bound for failure, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


def client(ctl: ControllerProcess, pod: str, **kw: Any) -> ConfigClient:
    return ConfigClient(
        ctl.url,
        namespace="default",
        pod=pod,
        ca_file=str(ctl.cert),
        backoff_base=0.05,
        backoff_cap=0.3,
        poll_wait=5.0,
        **kw,
    )


def synchro_status(ctl: ControllerProcess, *extra: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from synchro.commands import status; import argparse; "
            "p = argparse.ArgumentParser(); sp = p.add_subparsers(); status.register(sp); "
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))",
            "status",
            "--controller",
            ctl.url,
            "--cacert",
            str(ctl.cert),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def service_names(c: ConfigClient) -> set[str]:
    return {s.name for s in c.current.config.services} if c.current else set()


async def proxies(ctl: ControllerProcess) -> dict[str, dict[str, Any]]:
    rows = (await asyncio.to_thread(ctl.get, "/v1/proxies"))["proxies"]
    return {r["proxy"]: r for r in rows}


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())  # type: ignore[arg-type]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mesh"
    d.mkdir()
    return d


def test_file_change_reaches_every_subscriber_and_is_acked(
    config_dir: Path, tmp_path: Path
) -> None:
    (config_dir / "a.yaml").write_text(SERVICE_A)

    async def scenario() -> None:
        with run_controller(config_dir, tmp_path) as ctl:
            await asyncio.to_thread(ctl.request, "PUT", "/v1/pods/default/a-1", POD_A1)
            clients = [client(ctl, f"p{i}") for i in range(3)]
            for c in clients:
                c.start()
            try:
                for c in clients:
                    assert await c.wait_ready(10), "no first config"
                # The Pod reported through the API is service a's endpoint.
                await eventually(
                    lambda: all(
                        c.current and c.current.registry.pick("default/a", 80) for c in clients
                    ),
                    what="endpoint of a",
                )
                res = clients[0].current.registry.resolve("10.96.0.10", 80)  # type: ignore[union-attr]
                assert isinstance(res, ToService) and res.service.name == "a"
                ep = clients[0].current.registry.pick("default/a", 80)  # type: ignore[union-attr]
                assert ep is not None and (ep.ip, ep.port) == ("10.1.0.1", 8080)
                assert ep.identity == "spiffe://cluster.local/ns/default/sa/a"
                old = {c.version for c in clients}
                assert len(old) == 1  # same workload, same content, same version

                (config_dir / "b.yaml").write_text(SERVICE_B)
                await eventually(
                    lambda: all("b" in service_names(c) for c in clients),
                    what="service b everywhere",
                )
                new = {c.version for c in clients}
                assert len(new) == 1 and new != old
                b = clients[1].current.registry.resolve("10.96.0.11", 5432)  # type: ignore[union-attr]
                assert isinstance(b, ToService) and b.port.protocol == "tcp"

                async def all_acked() -> bool:
                    rows = await proxies(ctl)
                    return all(
                        rows.get(f"p{i}.default", {}).get("synced")
                        and rows[f"p{i}.default"]["version"] == next(iter(new))
                        for i in range(3)
                    )

                deadline = time.monotonic() + 10
                while not await all_acked():
                    assert time.monotonic() < deadline, await proxies(ctl)
                    await asyncio.sleep(0.05)
                row = (await proxies(ctl))["p0.default"]
                assert row["connected"] and row["state"] == "SYNCED" and row["last_nack"] is None

                # `synchro status` shows the same as a table and as JSON.
                table = await asyncio.to_thread(synchro_status, ctl)
                lines = table.splitlines()
                assert lines[0].split() == [
                    "NAME",
                    "WORKLOAD",
                    "STATE",
                    "VERSION",
                    "CONNECTED",
                    "LAST",
                    "NACK",
                ]
                assert [ln.split()[:5] for ln in lines[1:]] == [
                    [f"p{i}.default", "-", "SYNCED", next(iter(new)), "yes"] for i in range(3)
                ]
                as_json = json.loads(await asyncio.to_thread(synchro_status, ctl, "-o", "json"))
                assert [r["proxy"] for r in as_json] == ["p0.default", "p1.default", "p2.default"]
            finally:
                for c in clients:
                    await c.stop()

    run(scenario)


BROKEN = """
apiVersion: v1
kind: Service
metadata: {name: c, namespace: default}
spec:
  clusterIP: 10.96.0.12
  ports: [{name: http, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: c, port: 80}]
  rules:
    - matches: [{path: {type: Exact, value: "no-leading-slash"}}]
      backendRefs: [{name: c, port: 80}]
"""


def test_broken_resource_is_reported_and_the_rest_applies(config_dir: Path, tmp_path: Path) -> None:
    (config_dir / "a.yaml").write_text(SERVICE_A)
    (config_dir / "bad.yaml").write_text(BROKEN)

    async def scenario() -> None:
        with run_controller(config_dir, tmp_path) as ctl:
            c = client(ctl, "p0")
            c.start()
            try:
                assert await c.wait_ready(10)
                # The valid document of the same file applies; the route is left out.
                assert service_names(c) == {"a", "c"}
                svc_c = c.current.registry.service("default/c")  # type: ignore[union-attr]
                assert svc_c is not None and svc_c.routes == ()
                problems = (await asyncio.to_thread(ctl.get, "/v1/problems"))["problems"]
                assert len(problems) == 1
                p = problems[0]
                assert p["origin"].endswith("bad.yaml") and p["document"] == 1
                assert p["kind"] == "HTTPRoute" and p["name"] == "broken"
                assert p["field"] == "spec.rules[0].matches[0].path.value"
                # One error line in the controller's log names file, document and field.
                await eventually(
                    lambda: "spec.rules[0].matches[0].path.value" in ctl.log(), what="error line"
                )
                lines = [ln for ln in ctl.log().splitlines() if "invalid resource" in ln]
                assert len(lines) == 1
                assert "bad.yaml document 2" in lines[0] and "HTTPRoute default/broken" in lines[0]

                # Fixing the document clears the problem and the route applies.
                (config_dir / "bad.yaml").write_text(BROKEN.replace("no-leading-slash", "/fixed"))
                await eventually(
                    lambda: (
                        c.current is not None
                        and (s := c.current.registry.service("default/c")) is not None
                        and len(s.routes) == 1
                    ),
                    what="route applied",
                )
                assert (await asyncio.to_thread(ctl.get, "/v1/problems"))["problems"] == []
            finally:
                await c.stop()

    run(scenario)


def refuse_poison(config: ProxyConfig) -> None:
    """A proxy-side check the schema cannot know about (say, a feature this proxy lacks)."""
    if any(s.name == "poison" for s in config.services):
        raise ConfigError("services: 'poison' is not supported by this proxy")


def test_broken_config_is_nacked_and_the_old_one_stays(config_dir: Path, tmp_path: Path) -> None:
    (config_dir / "a.yaml").write_text(SERVICE_A)

    async def scenario() -> None:
        with run_controller(config_dir, tmp_path) as ctl:
            applied: list[str] = []
            c = client(ctl, "p0", validators=(refuse_poison,))
            c.on_update(lambda snap: applied.append(snap.version))
            c.start()
            try:
                assert await c.wait_ready(10)
                good = c.version
                (config_dir / "poison.yaml").write_text(
                    SERVICE_B.replace("name: b", "name: poison")
                )

                async def nacked() -> dict[str, Any] | None:
                    row = (await proxies(ctl)).get("p0.default")
                    return row if row and row["last_nack"] else None

                deadline = time.monotonic() + 10
                while (row := await nacked()) is None:
                    assert time.monotonic() < deadline, "no NACK recorded"
                    await asyncio.sleep(0.05)
                assert "poison" in row["last_nack"]["error"]
                assert row["state"] == "NACKED" and not row["synced"]
                assert row["version"] == good
                # The proxy keeps the config it had, registry included.
                assert c.version == good and "poison" not in service_names(c)
                assert isinstance(c.current.registry.resolve("10.96.0.10", 80), ToService)  # type: ignore[union-attr]
                # And the controller does not resend the refused version in a loop.
                sent_before = c._nacked
                await asyncio.sleep(1.0)
                assert c._nacked == sent_before and applied == [good]

                # The next change that makes it acceptable again is applied and ACKed.
                (config_dir / "poison.yaml").unlink()
                (config_dir / "b.yaml").write_text(SERVICE_B)
                await eventually(lambda: "b" in service_names(c), what="recovered config")
                deadline = time.monotonic() + 10
                while not (await proxies(ctl))["p0.default"]["synced"]:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            finally:
                await c.stop()

    run(scenario)


def test_controller_restart_clients_keep_config_and_resubscribe(
    config_dir: Path, tmp_path: Path
) -> None:
    (config_dir / "a.yaml").write_text(SERVICE_A)

    async def scenario() -> None:
        with run_controller(config_dir, tmp_path) as ctl:
            clients = [client(ctl, f"p{i}") for i in range(2)]
            for c in clients:
                c.start()
            try:
                for c in clients:
                    assert await c.wait_ready(10)
                version = clients[0].version

                ctl.kill()
                # Down: every client keeps serving on its last config, and notices.
                await eventually(
                    lambda: all(not c.connected for c in clients), what="clients see the outage"
                )
                for c in clients:
                    assert c.version == version
                    assert isinstance(c.current.registry.resolve("10.96.0.10", 80), ToService)  # type: ignore[union-attr]
                    assert isinstance(c.current.registry.resolve("192.0.2.1", 443), Passthrough)  # type: ignore[union-attr]
                await asyncio.sleep(0.5)  # a few failed attempts with backoff
                assert all(c.version == version for c in clients)

                # Back: clients resubscribe, and the controller learns what they run
                # from their polls alone, without any new config.
                await asyncio.to_thread(ctl.start)
                await eventually(lambda: all(c.connected for c in clients), what="resubscribed")
                deadline = time.monotonic() + 10
                while True:
                    rows = await proxies(ctl)
                    if all(rows.get(f"p{i}.default", {}).get("synced") for i in range(2)):
                        break
                    assert time.monotonic() < deadline, rows
                    await asyncio.sleep(0.05)
                assert all(c.version == version for c in clients)

                # And changes flow again.
                (config_dir / "b.yaml").write_text(SERVICE_B)
                await eventually(
                    lambda: all("b" in service_names(c) for c in clients),
                    what="change after restart",
                )
            finally:
                for c in clients:
                    await c.stop()

    run(scenario)
