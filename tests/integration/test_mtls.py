"""Mutual TLS between sidecars on loopback, with certificates issued by the real
CA through the real controller endpoint (`POST /v1/certificates`).

Layout (all on 127.0.0.1): a real `synchro-controller` process; sidecars in this
process (tests/integration/mesh_harness.py) with the proxy's real listeners and
handlers: `frontend` (ns shop) and `intruder` (ns shop, another ServiceAccount)
call `web` in namespace `secure` (PeerAuthentication STRICT, an ALLOW policy for
frontend only) and `web` in namespace `open` (the mesh default, PERMISSIVE).
Clients are curl, openssl s_client and Python's ssl module.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane import ca as ca_mod
from controlplane.certs import load_token_key
from controlplane.tokens import LocalTokens
from proxy.security import tls
from proxy.security.identity import WorkloadCertificate, make_csr, new_key
from tests.integration.controller_harness import ControllerProcess
from tests.integration.grpc_support.h2server import TinyH2Server
from tests.integration.mesh_harness import (
    MeshProxy,
    has_cert,
    knows_meshed_endpoint,
    mode_is,
)
from tests.integration.proxy_harness import free_port

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
SECURE_WEB = "spiffe://cluster.local/ns/secure/sa/web"
OPEN_WEB = "spiffe://cluster.local/ns/open/sa/web"
LIFETIME = 4  # seconds: every sidecar renews about every 2 s during these tests


class App(BaseHTTPRequestHandler):
    """The application behind a sidecar: echoes its request headers; /stream
    sends numbered chunks for ?seconds=N."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/stream"):
            seconds = float(self.path.partition("seconds=")[2] or "1")
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                chunk = f"chunk {i}\n".encode()
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
                i += 1
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
            return
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def apps() -> Iterator[dict[str, int]]:
    servers = {}
    for name in ("secure", "open"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), App)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield {name: s.server_address[1] for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


def _resources(secure_port: int, open_port: int, h2_port: int) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: h2web, namespace: secure}}
spec:
  clusterIP: 10.96.7.3
  selector: {{app: h2web}}
  ports: [{{name: http2, port: 80, targetPort: {h2_port}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: secure}}
spec:
  clusterIP: 10.96.7.1
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {secure_port}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: open}}
spec:
  clusterIP: 10.96.7.2
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {open_port}}}]
---
apiVersion: synchro.dev/v1alpha1
kind: PeerAuthentication
metadata: {{name: default, namespace: secure}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: synchro.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: frontend-only, namespace: secure}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/frontend"]}}}}]
    to: [{{operation: {{methods: ["GET"]}}}}]
"""


class Mesh:
    def __init__(
        self, controller: ControllerProcess, tokens: LocalTokens, work: Path, h2_app: TinyH2Server
    ) -> None:
        self.h2_app = h2_app
        self.controller = controller
        self.tokens = tokens
        self.work = work
        self.proxies: dict[str, MeshProxy] = {}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, apps: dict[str, int]) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("mtls")
    config = work / "config"
    config.mkdir()
    secure_port, open_port, h2_port = free_port(), free_port(), free_port()
    (config / "mesh.yaml").write_text(_resources(secure_port, open_port, h2_port))
    h2_app = TinyH2Server().__enter__()
    old = os.environ.get("SYNCHRO_CERT_LIFETIME")
    os.environ["SYNCHRO_CERT_LIFETIME"] = str(LIFETIME)
    controller = ControllerProcess(config, work)
    stack: list[MeshProxy] = []
    try:
        controller.start()
        tokens = LocalTokens(load_token_key(work / "token-key.pem"))
        m = Mesh(controller, tokens, work, h2_app)
        for name, ns, port, app, app_port in (
            ("secure", "secure", secure_port, "web", apps["secure"]),
            ("open", "open", open_port, "web", apps["open"]),
            ("h2", "secure", h2_port, "h2web", h2_app.port),
        ):
            p = MeshProxy(
                controller,
                tokens,
                work,
                namespace=ns,
                service_account="web",
                labels={"app": app},
                app_port=app_port,
            )
            p.inbound_port = port
            stack.append(p.__enter__())
            m.proxies[name] = p
        for name, sa in (("frontend", "frontend"), ("intruder", "intruder")):
            p = MeshProxy(
                controller,
                tokens,
                work,
                namespace="shop",
                service_account=sa,
                labels={"app": name},
                outbound={"secure": secure_port, "open": open_port, "h2": h2_port},
            )
            stack.append(p.__enter__())
            m.proxies[name] = p
        for p in stack:
            p.wait_ready(has_cert, "enrolled")
        for name in ("frontend", "intruder"):
            m.proxies[name].wait_ready(knows_meshed_endpoint(secure_port), "configured")
            m.proxies[name].wait_ready(knows_meshed_endpoint(open_port), "configured")
            m.proxies[name].wait_ready(knows_meshed_endpoint(h2_port), "configured")
        m.proxies["secure"].wait_ready(mode_is(apps["secure"], "STRICT"), "STRICT")
        m.proxies["open"].wait_ready(mode_is(apps["open"], "PERMISSIVE"), "PERMISSIVE")
        m.proxies["h2"].wait_ready(mode_is(h2_app.port, "STRICT"), "STRICT")
        yield m
    finally:
        for p in reversed(stack):
            p.close()
        controller.stop()
        h2_app.__exit__(None, None, None)
        if old is None:
            os.environ.pop("SYNCHRO_CERT_LIFETIME", None)
        else:
            os.environ["SYNCHRO_CERT_LIFETIME"] = old


def curl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def get_json(port: int, path: str = "/", headers: dict[str, str] | None = None) -> Any:
    args = [f"http://127.0.0.1:{port}{path}"]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    out = curl("-f", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_meshed_to_meshed_is_mtls_and_the_app_sees_the_client_identity(mesh: Mesh) -> None:
    front = mesh.proxies["frontend"]
    seen = get_json(
        front.outbound_port("secure"),
        headers={
            "x-forwarded-client-cert": "By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin"
        },
    )
    xfcc = seen["x-forwarded-client-cert"]
    assert f"URI={FRONTEND}" in xfcc and f"By={SECURE_WEB}" in xfcc and "Hash=" in xfcc
    assert "kube-system" not in xfcc  # the client's own claim was dropped
    # The same through the PERMISSIVE workload: a meshed client still uses mTLS.
    seen = get_json(front.outbound_port("open"))
    assert f"URI={FRONTEND}" in seen["x-forwarded-client-cert"]
    assert f"By={OPEN_WEB}" in seen["x-forwarded-client-cert"]


def test_http2_between_sidecars_is_mtls_too(mesh: Mesh) -> None:
    front = mesh.proxies["frontend"]
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-i",
            "--http2-prior-knowledge",
            "-H",
            "x-forwarded-client-cert: URI=forged",
            f"http://127.0.0.1:{front.outbound_port('h2')}/hello",
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert out.stdout.startswith(b"HTTP/2 200"), out
    seen = mesh.h2_app.requests[-1]
    assert f"URI={FRONTEND}" in seen["x-forwarded-client-cert"], seen
    assert "forged" not in seen["x-forwarded-client-cert"]
    # The intruder is denied by the same policy over HTTP/2.
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-i",
            "--http2-prior-knowledge",
            f"http://127.0.0.1:{mesh.proxies['intruder'].outbound_port('h2')}/hello",
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert out.stdout.startswith(b"HTTP/2 403"), out


def _raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def test_opaque_tcp_between_sidecars_is_mtls_and_authorized_per_connection(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "proxy.security.inbound")
    front = mesh.proxies["frontend"]
    # Not HTTP: the sidecars carry it as opaque TCP (ALPN synchro-tcp); the
    # app behind the PERMISSIVE workload answers its parser's 400 page and closes.
    answer = _raw_exchange(front.outbound_port("open"), b"\x00\x01 not http\r\n\r\n")
    assert b"400 - Bad request" in answer, answer
    # Namespace secure only allows GET from frontend: an L7 rule never matches
    # plain TCP, so the connection is closed without reaching the app.
    assert _raw_exchange(front.outbound_port("secure"), b"\x00\x01 not http\r\n\r\n") == b""
    _wait_log(caplog, f"denied TCP connection from {FRONTEND}")


def test_strict_refuses_plaintext_curl(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "proxy.security.inbound")
    out = curl(f"http://127.0.0.1:{mesh.proxies['secure'].inbound_port}/")
    assert out.returncode in (52, 56), (out.returncode, out.stdout, out.stderr)
    assert out.stdout == ""
    _wait_log(caplog, "plaintext to a STRICT mTLS port")


def test_permissive_serves_plaintext_curl_without_an_identity(mesh: Mesh) -> None:
    seen = get_json(
        mesh.proxies["open"].inbound_port,
        headers={"x-forwarded-client-cert": f"URI={FRONTEND}"},
    )
    assert "x-forwarded-client-cert" not in seen  # a plaintext client cannot claim one


def test_authorization_allows_frontend_and_denies_the_intruder(mesh: Mesh) -> None:
    out = curl("-i", f"http://127.0.0.1:{mesh.proxies['intruder'].outbound_port('secure')}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 403"), out.stdout
    assert "RBAC: access denied" in out.stdout
    # The policy allows GET only: a DELETE from frontend is denied too.
    out = curl(
        "-i",
        "-X",
        "DELETE",
        f"http://127.0.0.1:{mesh.proxies['frontend'].outbound_port('secure')}/",
    )
    assert out.stdout.startswith("HTTP/1.1 403"), out.stdout
    assert get_json(mesh.proxies["frontend"].outbound_port("secure"))
    # No policy in namespace open: the intruder is served there.
    assert get_json(mesh.proxies["intruder"].outbound_port("open"))


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_openssl_finds_old_tls_versions_refused(
    mesh: Mesh, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "proxy.security.inbound")
    port = mesh.proxies["secure"].inbound_port
    out = subprocess.run(
        # SECLEVEL=0 so that OpenSSL itself is willing to offer the old version:
        # the refusal must come from the proxy.
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            version,
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-alpn",
            "synchro-http/1.1",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out.returncode != 0, out.stdout
    assert "Cipher is (NONE)" in out.stdout or "Cipher    : 0000" in out.stdout, out.stdout
    _wait_log(caplog, "UNSUPPORTED_PROTOCOL")


def _client_tls(cert: WorkloadCertificate, bundle: list[str]) -> ssl.SSLContext:
    return tls.client_context(cert, bundle, ["synchro-http/1.1"])


def _request_over(ctx: ssl.SSLContext, port: int) -> bytes:
    """A GET over TLS with `ctx`; what came back (b"" when refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=None) as s:
                s.sendall(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return data
        except (ssl.SSLError, ConnectionError, OSError):
            return b""


def _root(work: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    root = x509.load_pem_x509_certificate((work / "root.pem").read_bytes())
    key = serialization.load_pem_private_key((work / "root-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return root, key


def _issue(ca: ca_mod.CertificateAuthority, ns: str, sa: str, **kw: Any) -> WorkloadCertificate:
    key = new_key()
    chain = ca.sign_csr(
        make_csr(key, ca_mod.spiffe_id(ca.trust_domain, ns, sa)),
        namespace=ns,
        service_account=sa,
        **kw,
    )
    return WorkloadCertificate.from_chain(chain, key)


def _self_signed(spiffe_id: str) -> WorkloadCertificate:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "synchro")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return WorkloadCertificate.from_chain(
        [cert.public_bytes(serialization.Encoding.PEM).decode()], key
    )


def test_forged_expired_and_foreign_certificates_are_refused(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "proxy.security.inbound")
    port = mesh.proxies["secure"].inbound_port
    root, root_key = _root(mesh.controller.workdir)
    bundle = [root.public_bytes(serialization.Encoding.PEM).decode()]
    real = ca_mod.CertificateAuthority.from_root("cluster.local", root, root_key)
    # Control: a certificate from the real CA works with the same client code.
    good = _issue(real, "shop", "frontend")
    assert _request_over(_client_tls(good, bundle), port).startswith(b"HTTP/1.1 200")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = _issue(
        ca_mod.CertificateAuthority.from_root("cluster.local", root, root_key, now=long_ago),
        "shop",
        "frontend",
        now=long_ago,
        lifetime=dt.timedelta(hours=1),
    )
    foreign = _issue(ca_mod.CertificateAuthority.generate("evil.example"), "shop", "frontend")
    cases = {
        "self-signed": (_self_signed(FRONTEND), "client certificate rejected"),
        "expired": (expired, "certificate has expired"),
        "foreign": (foreign, "client certificate rejected"),
    }
    for what, (cert, reason) in cases.items():
        caplog.clear()
        assert _request_over(_client_tls(cert, bundle), port) == b"", what
        _wait_log(caplog, reason)


def test_a_long_stream_survives_certificate_renewal(mesh: Mesh) -> None:
    front, web = mesh.proxies["frontend"], mesh.proxies["secure"]
    before = (front.enrollment.renewals, web.enrollment.renewals)
    seconds = LIFETIME * 1.5
    conn = http.client.HTTPConnection("127.0.0.1", front.outbound_port("secure"), timeout=10)
    conn.request("GET", f"/stream?seconds={seconds}")
    resp = conn.getresponse()
    assert resp.status == 200
    body = resp.read().decode()
    conn.close()
    lines = body.splitlines()
    assert lines == [f"chunk {i}" for i in range(len(lines))] and len(lines) > seconds * 5
    # Both ends renewed (with fresh keys) while the stream was running.
    assert front.enrollment.renewals > before[0] and web.enrollment.renewals > before[1]


def test_a_root_rotation_with_two_roots_in_the_bundle_drops_no_request(mesh: Mesh) -> None:
    """Rotation as an operator does it: (1) trust the new root next to the old
    one, (2) sign with the new root, old one still trusted; the controller
    restarts for each step. Requests flow throughout and none fails."""
    work, controller = mesh.controller.workdir, mesh.controller
    front = mesh.proxies["frontend"]
    old_root, _ = _root(work)
    new_root, new_key = ca_mod.new_root("cluster.local", dt.datetime.now(dt.UTC))
    pem = serialization.Encoding.PEM
    stop = threading.Event()
    results: list[int | str] = []

    def load() -> None:
        conn: http.client.HTTPConnection | None = None
        while not stop.is_set():
            try:
                conn = conn or http.client.HTTPConnection(
                    "127.0.0.1", front.outbound_port("secure"), timeout=10
                )
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                results.append(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                results.append(repr(exc))
                conn = None
            time.sleep(0.01)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        # Step 1: both roots trusted, the old one still signs.
        (work / "extra-roots.pem").write_bytes(new_root.public_bytes(pem))
        controller.stop()
        controller.start()
        _wait_bundle(mesh, 2)
        # Step 2: the new root signs; the old one stays trusted for certificates in use.
        (work / "root.pem").write_bytes(new_root.public_bytes(pem))
        (work / "root-key.pem").write_bytes(
            new_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (work / "extra-roots.pem").write_bytes(old_root.public_bytes(pem))
        controller.stop()
        controller.start()
        # Every sidecar ends up with a certificate from the new root.
        for p in mesh.proxies.values():
            p.wait_ready(_issued_by(new_root), "renewed under the new root", timeout=20)
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(15)
    failures = [r for r in results if r != 200]
    assert len(results) > 50 and not failures, failures[:5]


def _issued_by(root: x509.Certificate) -> Any:
    def check(p: MeshProxy) -> bool:
        m = p.security.material if p.security else None
        if m is None:
            return False
        inter = x509.load_pem_x509_certificate(m.cert.chain_pem[1].encode())
        return (
            inter.issuer == root.subject
            and inter.signature_algorithm_oid is not None
            and (_signed_by(inter, root))
        )

    return check


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, Exception):
        return False


def _wait_bundle(mesh: Mesh, roots: int, timeout: float = 20) -> None:
    for p in mesh.proxies.values():
        p.wait_ready(
            lambda q: (
                q.security is not None
                and q.security.material is not None
                and len(q.security.material.trust_bundle) == roots
            ),
            f"holding {roots} roots",
            timeout=timeout,
        )


def _wait_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in r.getMessage() for r in caplog.records):
            return
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r}: {[r.getMessage() for r in caplog.records]}")
