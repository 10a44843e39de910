"""The proxy's data path between two meshed Pods, with real clients.

Pod `a` (client: `sleep`) and Pod `b` (server: tests.netns.datapath_apps) are
injected by the webhook core and started as the kubelet would: synchro-init's
rules, synchro-proxy as uid 1337, the apps. `a` calls `b` by Pod IP, so the
call passes `a`'s outbound listener and `b`'s inbound listener (passthrough to
the original destination). Both Pods list 9100 (a server-first protocol) in
`synchro.dev/opaque-ports`; `a` excludes outbound port 9200.

Two test knobs on the injected proxy container (args, as a Pod author could
add): `--detect-timeout=30`, so a server-first protocol would stall for 30 s
unless the opaque-ports list skips detection; and on `a`, `--header-timeout=2`,
so a slowloris client gets its 408 within the test's time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.conn import Protocol
from synchro.local.netns import Node, base_env
from synchro.local.pod import Pod, start_pod
from tests.netns import datapath_apps as apps

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
H1, H2C, TCP = Protocol.HTTP1.value, Protocol.HTTP2.value, Protocol.TCP.value


def _manifest(name: str, command: list[str], annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}, "annotations": annotations},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "example/datapath",
                    "command": command,
                    "workingDir": str(REPO),
                    "env": [{"name": "PYTHONPATH", "value": str(REPO)}],
                }
            ]
        },
    }


def _inject(manifest: dict[str, Any], proxy_args: list[str]) -> dict[str, Any]:
    from webhook.config import InjectorConfig
    from webhook.inject import inject_pod

    spec = inject_pod(manifest, "default", InjectorConfig(controller_address=""))
    containers = spec["spec"]["initContainers"] + spec["spec"]["containers"]
    proxy = next(c for c in containers if c["name"] == "synchro-proxy")
    proxy["args"] = [*proxy.get("args", []), *proxy_args]
    return dict(spec)


@dataclass
class Pods:
    a: Pod
    b: Pod

    def curl(self, *args: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {"timeout": 60}
        if uid is not None:
            kwargs.update(uid=uid, gid=uid)
        return self.a.exec(["curl", "-sS", "--max-time", "30", *args], **kwargs)

    def url(self, path: str, port: int = apps.HTTP) -> str:
        return f"http://{self.b.ip}:{port}{path}"

    def listener(self, pod: Pod, name: str) -> dict[str, Any]:
        done = pod.exec(["curl", "-sS", "http://127.0.0.1:15000/listeners"], timeout=10)
        assert done.returncode == 0, done.stderr
        found: dict[str, Any] = next(i for i in json.loads(done.stdout) if i["name"] == name)
        return found

    def a_out(self) -> dict[str, Any]:
        return self.listener(self.a, "outbound")

    def b_in(self) -> dict[str, Any]:
        return self.listener(self.b, "inbound")

    def serves(self) -> None:
        """The mesh still answers an ordinary request, and both proxies are alive."""
        done = self.curl(self.url("/headers"))
        assert done.returncode == 0, done.stderr
        assert "x-request-id" in json.loads(done.stdout)["headers"]
        for pod in (self.a, self.b):
            assert pod.process("synchro-proxy").alive(), pod.log("synchro-proxy")[-3000:]


@pytest.fixture(scope="module")
def pods(module_node: Node) -> Iterator[Pods]:
    b = start_pod(
        module_node,
        _inject(
            _manifest(
                "b",
                [sys.executable, "-m", "tests.netns.datapath_apps", "serve"],
                {"synchro.dev/opaque-ports": str(apps.BANNER_PORT)},
            ),
            ["--detect-timeout=30"],
        ),
    )
    a = start_pod(
        module_node,
        _inject(
            _manifest(
                "a",
                ["sleep", "3600"],
                {
                    "synchro.dev/opaque-ports": str(apps.BANNER_PORT),
                    "synchro.dev/exclude-outbound-ports": str(apps.EXCLUDED),
                },
            ),
            ["--detect-timeout=30", "--header-timeout=2"],
        ),
    )
    try:
        for port in (apps.HTTP, apps.WS, apps.GRPC, apps.ECHO, apps.BANNER_PORT, apps.EXCLUDED):
            b.net.wait_for_port(port, timeout=20)
        yield Pods(a, b)
    finally:
        for pod in (a, b):
            pod.stop(grace=1.0)


def _echo_round(pods: Pods, port: int, payload: bytes) -> bytes:
    """Send `payload`, half-close, read to EOF (a thread writes while this one reads)."""
    with pods.a.connect(pods.b.ip, port, timeout=10) as sock:

        def write() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        writer.start()
        got = bytearray()
        while chunk := sock.recv(apps.CHUNK):
            got += chunk
        writer.join(10)
    return bytes(got)


# HTTP/1.1 ---------------------------------------------------------------------------


def test_keep_alive_two_requests_one_connection_through_both_listeners(pods: Pods) -> None:
    before = pods.a_out()
    done = pods.curl("-v", pods.url("/headers"), pods.url("/headers?second"))
    assert done.returncode == 0, done.stderr
    assert "Re-using" in done.stderr, done.stderr
    answers = [json.loads(line) for line in done.stdout.replace("}{", "}\n{").splitlines()]
    assert len(answers) == 2
    ids = [answer["headers"].get("x-request-id") for answer in answers]
    assert all(ids) and ids[0] != ids[1]  # added per request by the mesh
    # b's app was called by b's inbound listener over loopback, not by a's address.
    assert {answer["client"] for answer in answers} == {"127.0.0.1"}
    after = pods.a_out()
    assert after["accepted"] == before["accepted"] + 1  # one client connection
    assert after["protocols"].get(H1, 0) == before["protocols"].get(H1, 0) + 1
    assert pods.b_in()["accepted"] >= 1


def test_10_mib_chunked_upload_and_download_keep_their_checksums(
    pods: Pods, tmp_path: Path
) -> None:
    data = os.urandom(10 * MIB)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(data)
    done = pods.curl(
        "-X", "POST", "-H", "Transfer-Encoding: chunked", "-H", "Expect:",
        "--data-binary", f"@{upload}", pods.url("/upload"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["size"] == len(data)
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()

    download, head = tmp_path / "download.bin", tmp_path / "head.txt"
    size = 10 * MIB + 7
    done = pods.curl("-o", str(download), "-D", str(head), pods.url(f"/download?size={size}"))
    assert done.returncode == 0, done.stderr
    assert "transfer-encoding: chunked" in head.read_text().lower()
    got = download.read_bytes()
    assert len(got) == size
    assert hashlib.sha256(got).digest() == hashlib.sha256(apps.pattern(size)).digest()


def test_head_has_no_body_and_the_connection_goes_on(pods: Pods) -> None:
    done = pods.curl(
        "-v", "--head", pods.url("/download?size=100000"), "--next", pods.url("/headers")
    )
    assert done.returncode == 0, done.stderr
    head, _, rest = done.stdout.partition("\n\n")  # text mode: CRLF reads as LF
    assert head.startswith("HTTP/1.1 200"), done.stdout
    assert "Re-using" in done.stderr, done.stderr
    # Right after the head comes the second answer, not the download's bytes.
    assert "x-request-id" in json.loads(rest)["headers"]


def test_expect_100_continue(pods: Pods) -> None:
    done = pods.curl(
        "-v", "-H", "Expect: 100-continue", "--data-binary", "x" * 5000, pods.url("/upload")
    )
    assert done.returncode == 0, done.stderr
    assert "HTTP/1.1 100 Continue" in done.stderr, done.stderr
    assert json.loads(done.stdout)["size"] == 5000


# Other protocols ----------------------------------------------------------------------


def test_websocket_echo(pods: Pods) -> None:
    from websockets.sync.client import connect

    before = pods.a_out()
    sock = pods.a.connect(pods.b.ip, apps.WS, timeout=10)
    with connect(f"ws://{pods.b.ip}:{apps.WS}/", sock=sock, max_size=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        blob = os.urandom(MIB)
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
    after = pods.a_out()
    assert after["accepted"] == before["accepted"] + 1
    assert after["protocols"].get(H1, 0) == before["protocols"].get(H1, 0) + 1


def test_grpc_unary_and_bidirectional_stream_over_h2c(pods: Pods) -> None:
    before = pods.a_out()
    done = pods.a.exec(
        [sys.executable, "-m", "tests.netns.datapath_apps", "grpc-client",
         "--target", f"{pods.b.ip}:{apps.GRPC}"],
        env={**base_env(), "PYTHONPATH": str(REPO)}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["unary"] == "ping"
    assert answer["chat"] == ["re:one", "re:two", "re:three"]
    assert answer["seen_request_id"]
    after = pods.a_out()
    assert after["protocols"].get(H2C, 0) == before["protocols"].get(H2C, 0) + 1


def test_tcp_echo_with_half_close_through_both_listeners(pods: Pods) -> None:
    a_before, b_before = pods.a_out(), pods.b_in()
    payload = os.urandom(2 * MIB)
    got = _echo_round(pods, apps.ECHO, payload)
    assert got == payload + b"bye %d\n" % len(payload)
    a_after, b_after = pods.a_out(), pods.b_in()
    assert a_after["accepted"] == a_before["accepted"] + 1
    assert a_after["protocols"].get(TCP, 0) == a_before["protocols"].get(TCP, 0) + 1
    assert b_after["accepted"] == b_before["accepted"] + 1


def test_server_first_protocol_on_an_opaque_port(pods: Pods) -> None:
    before = pods.a_out()
    with pods.a.connect(pods.b.ip, apps.BANNER_PORT, timeout=10) as sock:
        # The client says nothing: with 30 s of detection, only opaque-ports lets this through.
        sock.settimeout(8)
        got = b""
        while not got.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
        assert got == apps.BANNER
        sock.sendall(b"hello\n")
        assert sock.recv(4096) == b"echo hello\n"
    assert pods.a_out()["accepted"] == before["accepted"] + 1


# Interception boundaries ----------------------------------------------------------------


def test_an_excluded_outbound_port_bypasses_the_proxy(pods: Pods) -> None:
    a_before, b_before = pods.a_out(), pods.b_in()
    assert _echo_round(pods, apps.EXCLUDED, b"direct") == b"directbye 6\n"
    assert pods.a_out()["accepted"] == a_before["accepted"]
    # Excluded on a's way out only: b's inbound side still carries it.
    assert pods.b_in()["accepted"] == b_before["accepted"] + 1


def test_the_proxys_own_connections_are_not_captured(pods: Pods) -> None:
    before = pods.a_out()
    done = pods.curl(pods.url("/headers"), uid=1337)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["client"] == "127.0.0.1"  # b's inbound still applies
    after = pods.a_out()
    assert after["accepted"] == before["accepted"]
    assert after["active_connections"] == before["active_connections"]


# Bad input ------------------------------------------------------------------------------


def _read_all(sock: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_garbage_on_an_http_port_leaves_the_proxy_serving(pods: Pods) -> None:
    with pods.a.connect(pods.b.ip, apps.HTTP, timeout=10) as sock:
        sock.sendall(b"GET /headers HTTP/1.1\r\nHost: b\r\nthis is no header\r\n\r\n")
        answer = _read_all(sock)  # 400, then the proxy closes
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    with pods.a.connect(pods.b.ip, apps.HTTP, timeout=10) as sock:
        sock.sendall(b"GET /\x00\xff\xfe HTTP/1.1\r\n\x01\x02\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 400")
    with pods.a.connect(pods.b.ip, apps.HTTP, timeout=10) as sock:
        # A client that vanishes mid-body.
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: 1000000\r\n\r\nabc")
    pods.serves()


def test_slowloris_clients_get_408_and_others_are_served(pods: Pods) -> None:
    socks = [pods.a.connect(pods.b.ip, apps.HTTP, timeout=10) for _ in range(5)]
    stop = threading.Event()

    def trickle() -> None:
        for sock in socks:
            sock.sendall(b"GET /headers HTTP/1.1\r\nHost: b\r\n")
        while not stop.wait(0.2):
            for sock in socks:
                with contextlib.suppress(OSError):  # closed by the 408
                    sock.sendall(b"x")

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(0.3)
        for _ in range(3):
            pods.serves()
        answers = []
        for sock in socks:
            sock.settimeout(10)
            answers.append(_read_all(sock))
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:80] for a in answers]
    pods.serves()
