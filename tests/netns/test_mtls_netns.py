"""Mutual TLS between Pods as network namespaces, through `synchro up`.

The whole path is real: the controller's CA (its files under the mesh's state
directory) signs each injected proxy's CSR, authenticated by the token the local
runtime minted for the Pod's ServiceAccount; the init container's iptables
rules send traffic through the proxies; curl runs inside the Pods (`synchro
exec`). fixtures/mtls: `secure/web` (PeerAuthentication STRICT) and `open/web`
(the PERMISSIVE default) answer with the x-forwarded-client-cert they received;
`shop/frontend` is meshed, `outside/plain` is not.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from synchro.local import mesh
from tests.netns.test_up import Up, mesh_up

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "mtls"
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    directory = tmp_path_factory.mktemp("mtls") / "manifests"
    shutil.copytree(FIXTURES, directory)
    with mesh_up(directory) as running:
        yield running


def curl(up: Up, pod: str, url: str) -> tuple[int, str]:
    proc = up.exec(pod, "curl", "-sS", "--max-time", "5", url)
    return proc.returncode, proc.stdout.strip() + proc.stderr.strip()


def eventually_ok(up: Up, pod: str, url: str, timeout: float = 20.0) -> str:
    """The first good answer: a fresh mesh's proxies may still be enrolling."""
    deadline = time.monotonic() + timeout
    while True:
        code, out = curl(up, pod, url)
        if code == 0 or time.monotonic() > deadline:
            assert code == 0, f"curl {url} from {pod}: {out}"
            return out
        time.sleep(0.5)


def test_every_meshed_pod_is_ready_with_a_certificate(up: Up) -> None:
    pods = {p["ref"]: p for p in up.status()["pods"]}
    assert {"secure/web-0", "open/web-0", "shop/frontend-0", "outside/plain-0"} <= set(pods)
    assert all(p["phase"] == "Ready" for p in pods.values())
    # The CA lives in the mesh's state directory with a private root key.
    key = mesh.MeshPaths(up.name).tls / "root-key.pem"
    assert key.exists() and key.stat().st_mode & 0o077 == 0


def test_meshed_to_meshed_is_mtls_and_the_server_sees_the_client_identity(up: Up) -> None:
    xfcc = eventually_ok(up, "shop/frontend-0", "http://web.secure/")
    assert f"URI={FRONTEND}" in xfcc and "By=spiffe://cluster.local/ns/secure/sa/web" in xfcc
    xfcc = eventually_ok(up, "shop/frontend-0", "http://web.open/")
    assert f"URI={FRONTEND}" in xfcc and "By=spiffe://cluster.local/ns/open/sa/web" in xfcc


def test_a_pod_without_a_sidecar_is_refused_under_strict(up: Up) -> None:
    code, out = curl(up, "outside/plain-0", "http://web.secure/")
    assert code in (52, 56), (code, out)  # reset or empty reply: no HTTP answer
    log = mesh.MeshPaths(up.name).logs / "secure" / "web-0" / "synchro-proxy.log"
    deadline = time.monotonic() + 5
    while "plaintext to a STRICT mTLS port" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_a_pod_without_a_sidecar_is_served_under_permissive(up: Up) -> None:
    assert eventually_ok(up, "outside/plain-0", "http://web.open/") == "-"  # no identity


# The client: a request, then its FIN (`nc -N`), then the answer until EOF.
HALF_CLOSE_CLIENT = """
import hashlib, socket, sys
data = bytes(range(256)) * 4000
s = socket.create_connection(("wc.secure", 7000), timeout=10)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
answer = b""
while chunk := s.recv(65536):
    answer += chunk
print(answer.decode().strip(), "|", len(data), hashlib.sha256(data).hexdigest())
"""


def test_a_half_close_crosses_mtls_to_a_server_that_answers_at_eof(up: Up) -> None:
    eventually_ok(up, "shop/frontend-0", "http://web.secure/")  # the client's proxy is enrolled
    deadline = time.monotonic() + 20
    while True:
        proc = up.exec("shop/frontend-0", "python", "-c", HALF_CLOSE_CLIENT)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the server may not listen yet (no readiness probe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, _, expected = proc.stdout.strip().partition(" | ")
    assert got == expected, proc.stdout
