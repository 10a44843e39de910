"""The status port (readiness, rewritten kubelet probes against real apps) and
the admin port, on a real synchro-proxy process."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proxy.main import SettingsError, build_parser, parse_settings
from tests.integration.proxy_harness import RunningProxy, free_port, proxy_command, run_proxy


class _App(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        status = {
            "/ok": 200,
            "/redirect": 302,
            "/fail": 500,
            "/slow": 200,
        }.get(self.path, 404)
        if self.path == "/needs-header":
            status = 200 if self.headers.get("X-Probe") == "yes" else 401
        body = b"app\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_app() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    server.daemon_threads = True
    # The probe of /slow gives up before the app answers; that is the point, not noise.
    server.handle_error = lambda *args: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def https_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The same app over HTTPS with a self-signed certificate (kubelet does not verify)."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("https-app")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def grpc_app() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("up", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("down", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


@pytest.fixture(scope="module")
def proxy(http_app: int, https_app: int, grpc_app: int) -> Iterator[RunningProxy]:
    closed = free_port()

    def http(path: str, **extra: Any) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": http_app, "scheme": "HTTP", **extra},
            "timeoutSeconds": 1,
        }

    # The shape webhook/inject.py writes: {container: {livez|readyz|startupz: probe}}.
    probes = {
        "web": {
            "livez": http("/ok"),
            "readyz": http("/fail"),
            "startupz": http("/redirect"),
        },
        "headers": {
            "livez": http("/needs-header", httpHeaders=[{"name": "X-Probe", "value": "yes"}]),
            "readyz": http("/needs-header"),
        },
        "slow": {"livez": http("/slow")},
        "tls": {
            "livez": {"httpGet": {"path": "/ok", "port": https_app, "scheme": "HTTPS"}},
            "readyz": {"httpGet": {"path": "/fail", "port": https_app, "scheme": "HTTPS"}},
            "startupz": {"httpGet": {"path": "/ok", "port": https_app, "scheme": "HTTP"}},
        },
        "tcp": {
            "livez": {"tcpSocket": {"port": http_app}, "timeoutSeconds": 1},
            "readyz": {"tcpSocket": {"port": closed}, "timeoutSeconds": 1},
        },
        "grpc": {
            "livez": {"grpc": {"port": grpc_app}, "timeoutSeconds": 2},
            "readyz": {"grpc": {"port": grpc_app, "service": "up"}, "timeoutSeconds": 2},
            "startupz": {"grpc": {"port": grpc_app, "service": "down"}, "timeoutSeconds": 2},
        },
        "grpc-missing": {
            "livez": {"grpc": {"port": grpc_app, "service": "nope"}, "timeoutSeconds": 2},
            "readyz": {"grpc": {"port": http_app}, "timeoutSeconds": 1},
        },
    }
    with run_proxy(env={"SYNCHRO_APP_PROBES": json.dumps(probes)}) as running:
        yield running
        assert "Traceback" not in running.log(), running.log()[-4000:]


def test_ready(proxy: RunningProxy) -> None:
    assert proxy.get("/healthz/ready") == (200, b"ready\n")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/app-health/web/livez", 200),
        ("/app-health/web/readyz", 503),  # the app answers 500
        ("/app-health/web/startupz", 200),  # 3xx passes, as for the kubelet
        ("/app-health/headers/livez", 200),  # the probe's httpHeaders are sent
        ("/app-health/headers/readyz", 503),
        ("/app-health/tls/livez", 200),
        ("/app-health/tls/readyz", 503),
        ("/app-health/tls/startupz", 503),  # plain HTTP to a TLS port
        ("/app-health/tcp/livez", 200),
        ("/app-health/tcp/readyz", 503),
        ("/app-health/grpc/livez", 200),
        ("/app-health/grpc/readyz", 200),
        ("/app-health/grpc/startupz", 503),  # NOT_SERVING
        ("/app-health/grpc-missing/livez", 503),  # NOT_FOUND from the health service
        ("/app-health/grpc-missing/readyz", 503),  # not a gRPC server at all
        ("/app-health/nobody/livez", 404),
        ("/app-health/web/nonsense", 404),
        ("/nope", 404),
    ],
)
def test_app_health(proxy: RunningProxy, path: str, status: int) -> None:
    assert proxy.get(path)[0] == status


def test_probe_timeout(proxy: RunningProxy) -> None:
    status, body = proxy.get("/app-health/slow/livez")
    assert status == 503
    assert b"timed out" in body


def test_status_rejects_bad_requests_and_keeps_serving(proxy: RunningProxy) -> None:
    assert proxy.request("POST", "/healthz/ready")[0] == 405
    for garbage in (b"\x00\x01\x02garbage\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        with socket.create_connection(proxy.status, timeout=10) as sock:
            sock.sendall(garbage)
            assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(proxy.status, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(proxy.status, timeout=10) as sock:
        sock.sendall(b"GET /healthz/ready HTTP/1.1\r\n")
        sock.close()
    assert proxy.get("/healthz/ready")[0] == 200


def test_config_dump(proxy: RunningProxy) -> None:
    dump = proxy.admin_json("/config_dump")
    settings = dump["settings"]
    assert settings["outbound_listen"] == [f"{proxy.outbound[0]}:{proxy.outbound[1]}"]
    assert settings["admin_listen"] == [f"{proxy.admin[0]}:{proxy.admin[1]}"]
    assert settings["concurrency"] == 1
    assert 6379 in settings["opaque_ports"]
    assert dump["pid"] == proxy.pid


def test_listeners(proxy: RunningProxy) -> None:
    listeners = proxy.admin_json("/listeners")
    assert [item["name"] for item in listeners] == ["outbound", "inbound"]
    assert listeners[0]["addresses"] == [f"{proxy.outbound[0]}:{proxy.outbound[1]}"]
    assert all(item["accepting"] for item in listeners)


def test_admin_errors_and_log_level(proxy: RunningProxy) -> None:
    assert proxy.request("GET", "/drain", on="admin")[0] == 405
    assert proxy.request("GET", "/nope", on="admin")[0] == 404
    assert proxy.request("POST", "/logging/loud", on="admin")[0] == 400
    assert proxy.request("POST", "/logging/debug", on="admin")[0] == 200
    assert proxy.request("POST", "/logging/info", on="admin")[0] == 200
    assert proxy.alive()


def test_bad_app_probes_env_does_not_stop_the_proxy() -> None:
    with run_proxy(env={"SYNCHRO_APP_PROBES": '{"web": {"livez": {"exec": {}}}}'}) as proxy:
        assert proxy.get("/healthz/ready")[0] == 200
        assert proxy.get("/app-health/web/livez")[0] == 404
        assert "SYNCHRO_APP_PROBES" in proxy.log()


def test_quitquitquit_exits_now() -> None:
    with run_proxy(drain_seconds=60) as proxy, socket.create_connection(proxy.outbound) as held:
        assert proxy.request("POST", "/quitquitquit", on="admin")[0] == 200
        # Exits despite an open connection and a long drain time.
        assert proxy.wait_exit(timeout=10) == 0
        held.close()


def test_admin_drain_and_the_lifecycle_subcommands() -> None:
    with run_proxy(drain_seconds=60) as proxy:
        status = f"{proxy.status[0]}:{proxy.status[1]}"
        admin = f"{proxy.admin[0]}:{proxy.admin[1]}"
        ready = subprocess.run(
            [*proxy_command(), "wait-ready", "--timeout=10", f"--status={status}"], timeout=30
        )
        assert ready.returncode == 0
        drained = subprocess.run(
            [*proxy_command(), "drain", f"--admin={admin}", "--seconds=0"], timeout=30
        )
        assert drained.returncode == 0
        assert proxy.wait_exit(timeout=10) == 0
        # With the proxy gone, wait-ready says so instead of hanging.
        gone = subprocess.run(
            [*proxy_command(), "wait-ready", "--timeout=0.3", f"--status={status}"],
            timeout=30,
            capture_output=True,
            text=True,
        )
        assert gone.returncode == 1
        assert "not ready" in gone.stderr


def test_settings_defaults_env_and_flags() -> None:
    parser = build_parser()
    defaults = parse_settings(parser.parse_args([]), {})
    assert [str(a) for a in defaults.admin_listen] == ["127.0.0.1:15000"]
    assert [str(a) for a in defaults.outbound_listen] == ["0.0.0.0:15001", "[::]:15001"]
    assert (defaults.concurrency, defaults.drain_seconds, defaults.log_level) == (1, 5.0, "info")
    env = {
        "SYNCHRO_CONCURRENCY": "3",
        "SYNCHRO_DRAIN_SECONDS": "7",
        "SYNCHRO_LOG_LEVEL": "debug",
        "SYNCHRO_OPAQUE_PORTS": "9000,9001",
    }
    from_env = parse_settings(parser.parse_args([]), env)
    assert (from_env.concurrency, from_env.drain_seconds, from_env.log_level) == (3, 7.0, "debug")
    assert {9000, 9001, 3306} <= from_env.opaque_ports
    flags = parse_settings(parser.parse_args(["--concurrency=2", "--admin-listen="]), env)
    assert flags.concurrency == 2
    assert flags.admin_listen == ()
    for bad in ({"SYNCHRO_CONCURRENCY": "many"}, {"SYNCHRO_OPAQUE_PORTS": "80,http"}):
        with pytest.raises(SettingsError):
            parse_settings(parser.parse_args([]), bad)


def test_bad_flags_exit_with_a_message() -> None:
    out = subprocess.run(
        [*proxy_command(), "--static-destination=nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "HOST:PORT" in out.stderr
