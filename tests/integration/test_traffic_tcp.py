"""Opaque TCP to a service's ClusterIP through a real `synchro-proxy`: an
endpoint picked per connection, a refused connect retried on another one, and
REGISTRY_ONLY refusing unknown destinations with a reset."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from proxy import config as pc
from tests.integration.proxy_harness import BackgroundServer, free_port, run_proxy
from tests.integration.traffic_harness import ConfigWriter, service, wait_version

pytestmark = pytest.mark.timeout(60)


def named_server(name: bytes) -> BackgroundServer:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)  # closing with unread bytes would reset the client
        writer.write(name)
        await writer.drain()
        writer.close()

    return BackgroundServer(handler)


def ask(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(b"hello")  # client-first, so detection finishes at once
        data = b""
        while chunk := s.recv(100):
            data += chunk
        return data


def test_tcp_balanced_per_connection_and_connect_failure_retried(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there
    with named_server(b"a") as a, named_server(b"b") as b:
        cfg = ConfigWriter(tmp_path / "proxy.json")
        vip = ConfigWriter.vip_port()
        policy = pc.TrafficPolicy(load_balancer=pc.LoadBalancer("round_robin"))
        version = cfg.write(
            [
                service(
                    "shop/db",
                    vip,
                    [("127.0.0.1", a.port), ("127.0.0.1", b.port), ("127.0.0.1", dead)],
                    protocol="tcp",
                    policy=policy,
                )
            ]
        )
        with run_proxy(
            static_destination=f"127.0.0.1:{vip}",
            extra_args=[f"--config-file={cfg.path}", "--detect-timeout=0.05"],
        ) as proxy:
            wait_version(proxy, version)
            answers = Counter(ask(proxy.outbound) for _ in range(30))
    # Every connection reached a live endpoint; the dead one's turns were retried.
    assert set(answers) == {b"a", b"b"}, answers
    assert sum(answers.values()) == 30
    assert min(answers.values()) >= 5


def test_registry_only_resets_unknown_tcp_destinations(tmp_path: Path) -> None:
    with named_server(b"x") as x:
        cfg = ConfigWriter(tmp_path / "proxy.json", outbound_policy="REGISTRY_ONLY")
        version = cfg.write([])
        with run_proxy(
            static_destination=f"127.0.0.1:{x.port}",
            extra_args=[f"--config-file={cfg.path}", "--detect-timeout=0.05"],
        ) as proxy:
            wait_version(proxy, version)
            with pytest.raises(ConnectionResetError):
                ask(proxy.outbound)
            time.sleep(0.1)
            assert "REGISTRY_ONLY" in proxy.log()
