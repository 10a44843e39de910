"""A real synchro-proxy subscribed to a real synchro-controller, on loopback.

Without NAT the proxy's "original destination" is `--static-destination`: here a
ClusterIP that exists only in the controller's config, so every request that
arrives proves the proxy resolved ClusterIP:port -> service -> endpoint.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.controller_harness import run_controller
from tests.integration.proxy_harness import free_port, run_proxy

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"""


@contextmanager
def backend(host: str, name: str) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = name.encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port(host)
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def call(outbound: tuple[str, int]) -> str:
    conn = http.client.HTTPConnection(*outbound, timeout=5)
    try:
        conn.request("GET", "/", headers={"host": "web.default"})
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (resp.status, body)
        return body
    finally:
        conn.close()


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Converging (an endpoint not pushed yet may fail a request): retry until true."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            if pred():
                return
        except (OSError, AssertionError, http.client.HTTPException) as e:
            last = e
        assert time.monotonic() < deadline, f"timed out: {what} (last error: {last})"
        time.sleep(0.05)


def test_proxy_follows_endpoints_and_survives_a_controller_restart(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    (mesh / "web.yaml").write_text(SERVICE)
    with (
        backend("127.0.0.1", "A") as port_a,
        backend("127.0.0.2", "B") as port_b,
        run_controller(mesh, tmp_path) as ctl,
    ):
        ctl.request(
            "PUT",
            "/v1/pods/default/web-a",
            {"ip": "127.0.0.1", "labels": {"app": "web"}, "ports": {"http": port_a}},
        )
        env = {
            "SYNCHRO_CONTROLLER": ctl.url,
            "SYNCHRO_CONTROLLER_CA": str(ctl.cert),
            "POD_NAMESPACE": "default",
            "POD_NAME": "client-1",
        }
        # Ready only once the first config is in (the harness waits for /healthz/ready).
        with run_proxy(static_destination="10.96.0.10:80", env=env) as proxy:
            wait_until(lambda: call(proxy.outbound) == "A", "traffic to endpoint A")

            # Scaling the endpoints moves traffic.
            ctl.request(
                "PUT",
                "/v1/pods/default/web-b",
                {"ip": "127.0.0.2", "labels": {"app": "web"}, "ports": {"http": port_b}},
            )
            ctl.request("DELETE", "/v1/pods/default/web-a")
            wait_until(
                lambda: all(call(proxy.outbound) == "B" for _ in range(5)), "traffic moved to B"
            )
            version = proxy.admin_json("/config_dump")["version"]
            assert version

            # Controller down: the proxy keeps serving on its last config.
            ctl.kill()
            for _ in range(20):
                assert call(proxy.outbound) == "B"
                time.sleep(0.02)

            # Controller back: the proxy resubscribes; the controller learns its version.
            ctl.start()
            # The restarted controller has only the files; the runtime reports its Pods again.
            ctl.request(
                "PUT",
                "/v1/pods/default/web-b",
                {"ip": "127.0.0.2", "labels": {"app": "web"}, "ports": {"http": port_b}},
            )

            def synced() -> bool:
                rows = {r["proxy"]: r for r in ctl.get("/v1/proxies")["proxies"]}
                row = rows.get("client-1.default")
                return bool(row and row["synced"] and row["connected"])

            wait_until(synced, "proxy resynced after the restart")
            assert call(proxy.outbound) == "B"
            assert (
                proxy.admin_json("/config_dump")["version"]
                == ctl.get("/v1/proxies")["proxies"][0]["version"]
            )
