"""The controller's dashboard against a live loopback mesh, rendered by Chromium.

Real parts: `synchro-controller` (API over HTTPS, `--metrics-listen`), two
`synchro-proxy` processes subscribed to it (`frontend-1` and `catalog-1`, each
with its own loopback IP as its Pod IP, their status ports on <pod IP>:15020
where the controller finds them), an app server behind catalog's inbound
listener, and traffic: frontend -> Service catalog through both proxies, with
a share of 503s, plus calls straight to catalog's inbound from outside the
mesh. Then `synchro top` reads the golden metrics, and Debian's headless
Chromium renders the page: a screenshot, and the graph read from the DOM.

Set SYNCHRO_DASHBOARD_PNG=docs/dashboard.png to keep the screenshot.
"""

from __future__ import annotations

import asyncio
import html.parser
import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from controlplane.certs import load_token_key
from controlplane.tokens import LocalTokens
from tests.integration.controller_harness import write_self_signed
from tests.integration.proxy_harness import (
    LOOPBACK,
    BackgroundServer,
    RunningProxy,
    free_port,
    proxy_command,
    run_proxy,
    wait_ready,
)

NS = "shop"
FROM_FRONTEND, FAILED, FROM_OUTSIDE = 40, 4, 10


def _loopback_net() -> str:
    """A 127.x.y prefix of our own, so parallel runs do not share :15020."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    return f"127.{rng.randrange(20, 250)}.{rng.randrange(1, 250)}"


NET = _loopback_net()
CLUSTER_IP, CATALOG_IP, FRONTEND_IP = f"{NET}.10", f"{NET}.11", f"{NET}.12"
CATALOG_PORT = 8080

SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: catalog, namespace: {NS}}}
spec:
  clusterIP: {CLUSTER_IP}
  selector: {{app: catalog}}
  ports: [{{name: http, port: 80, targetPort: {CATALOG_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: frontend, namespace: {NS}}}
spec:
  clusterIP: {NET}.20
  selector: {{app: frontend}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""


async def app_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 keep-alive: 503 for paths with "fail", else 200."""
    try:
        while line := await reader.readline():
            parts = line.split()
            path = parts[1] if len(parts) > 1 else b"/"
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            status = b"503 Service Unavailable" if b"fail" in path else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def eventually(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    """Wait for a condition (a bound for failure, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with suppress(OSError, ValueError, KeyError):
            last = pred()
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Controller:
    def __init__(self, workdir: Path, config_dir: Path) -> None:
        self.cert, self.key = write_self_signed(workdir)
        self.api_port, self.metrics_port = free_port(), free_port()
        self.log_path = workdir / "controller.log"
        self.ssl = ssl.create_default_context(cafile=str(self.cert))
        cmd = [
            sys.executable,
            "-m",
            "controlplane.main",
            "--no-webhook",
            "--config-dir",
            str(config_dir),
            "--api-listen",
            f"127.0.0.1:{self.api_port}",
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--scrape-interval",
            "0.5",
        ]
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def api(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            self.api + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, context=self.ssl, timeout=10) as resp:
            return json.loads(resp.read())

    def dash(self, path: str) -> Any:
        with urllib.request.urlopen(self.dashboard + path, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextmanager
def controller(workdir: Path, config_dir: Path) -> Iterator[Controller]:
    c = Controller(workdir, config_dir)
    try:
        eventually(
            lambda: c.process.poll() is None and c.call("GET", "/healthz/ready")["ready"],
            20,
            "controller ready",
        )
        yield c
    except BaseException:
        print(c.log()[-4000:])
        raise
    finally:
        c.stop()


def pod(c: Controller, name: str, ip: str, app: str) -> None:
    c.call(
        "PUT",
        f"/v1/pods/{NS}/{name}",
        {
            "ip": ip,
            "labels": {"app": app},
            "serviceAccount": app,
            "ready": True,
            "meshed": True,
            "ports": {"http": CATALOG_PORT},
        },
    )


@contextmanager
def meshed_proxy(
    c: Controller, name: str, ip: str, *, static_destination: str, inbound: str | None = None
) -> Iterator[RunningProxy]:
    """A proxy subscribed to the controller, its status port also on <pod IP>:15020
    (where the controller scrapes it) besides the harness' loopback port."""
    port = {k: free_port() for k in ("outbound", "inbound", "status", "admin")}
    inbound = inbound or f"{LOOPBACK}:{port['inbound']}"
    args = [
        *proxy_command(),
        f"--outbound-listen={LOOPBACK}:{port['outbound']}",
        f"--inbound-listen={inbound}",
        f"--status-listen={LOOPBACK}:{port['status']},{ip}:15020",
        f"--admin-listen={LOOPBACK}:{port['admin']}",
        f"--static-destination={static_destination}",
    ]
    account = name.rsplit("-", 1)[0]
    # A ServiceAccount token minted with the controller's local key, as `synchro up` does.
    token = c.log_path.with_name(f"{name}.token")
    token.write_text(
        LocalTokens(load_token_key(c.log_path.with_name("token-key.pem"))).mint(
            NS, account, pod=name
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHRO_")}
    env.update(
        POD_NAME=name,
        POD_NAMESPACE=NS,
        SERVICE_ACCOUNT=account,
        SYNCHRO_CONTROLLER=c.api,
        SYNCHRO_CONTROLLER_CA=str(c.cert),
        SYNCHRO_TOKEN_FILE=str(token),
    )
    log_path = c.log_path.with_name(f"{name}.log")
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    host, _, in_port = inbound.rpartition(":")
    proxy = RunningProxy(
        process=process,
        outbound=(LOOPBACK, port["outbound"]),
        inbound=(host, int(in_port)),
        status=(LOOPBACK, port["status"]),
        admin=(LOOPBACK, port["admin"]),
        log_path=log_path,
    )
    try:
        wait_ready(proxy, 20)
        yield proxy
    except BaseException:
        print(proxy.log()[-4000:])
        raise
    finally:
        proxy.stop()


def get(address: tuple[str, int], path: str, conn: http.client.HTTPConnection | None) -> int:
    conn = conn or http.client.HTTPConnection(*address, timeout=10)
    conn.request("GET", path, headers={"host": f"catalog.{NS}"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def send_traffic(frontend: RunningProxy) -> None:
    out = http.client.HTTPConnection(*frontend.outbound, timeout=10)
    statuses = [
        get(frontend.outbound, "/fail" if i < FAILED else f"/item/{i}", out)
        for i in range(FROM_FRONTEND)
    ]
    out.close()
    assert statuses.count(503) == FAILED and statuses.count(200) == FROM_FRONTEND - FAILED
    inside = http.client.HTTPConnection(CATALOG_IP, CATALOG_PORT, timeout=10)
    for i in range(FROM_OUTSIDE):
        assert get((CATALOG_IP, CATALOG_PORT), f"/direct/{i}", inside) == 200
    inside.close()


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def run_chromium(url: str, workdir: Path, *extra: str) -> str:
    profile = workdir / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--virtual-time-budget=5000",
        *extra,
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


class DomGraph(html.parser.HTMLParser):
    """The embedded graph data and the SVG the page's script drew."""

    def __init__(self) -> None:
        super().__init__()
        self.data = ""
        self._in_data = False
        self.nodes: set[str] = set()
        self.edges: set[tuple[str, str]] = set()
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("id") == "graph-data":
            self._in_data = True
        elif tag == "g" and "node" in (a.get("class") or "").split():
            self.nodes.add(a.get("data-id") or "")
        elif tag == "g" and "edge" in (a.get("class") or "").split():
            self.edges.add((a.get("data-source") or "", a.get("data-destination") or ""))

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False if tag == "script" else self._in_data

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data += data
        else:
            self.texts.append(data)


def _port_free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def test_dashboard_top_and_chromium_against_a_live_mesh(tmp_path: Path) -> None:
    if not (_port_free(CATALOG_IP, CATALOG_PORT) and _port_free(FRONTEND_IP, 15020)):
        pytest.skip(f"loopback addresses {NET}.x are busy")
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    (config_dir / "services.yaml").write_text(SERVICE)

    with ExitStack() as stack:
        c = stack.enter_context(controller(tmp_path, config_dir))
        pod(c, "catalog-1", CATALOG_IP, "catalog")
        pod(c, "frontend-1", FRONTEND_IP, "frontend")
        app = stack.enter_context(BackgroundServer(app_handler))
        stack.enter_context(
            meshed_proxy(
                c,
                "catalog-1",
                CATALOG_IP,
                static_destination=app.address,
                inbound=f"{CATALOG_IP}:{CATALOG_PORT}",
            )
        )
        frontend = stack.enter_context(
            meshed_proxy(c, "frontend-1", FRONTEND_IP, static_destination=f"{CLUSTER_IP}:80")
        )

        # Both proxies are found through the controller and scraped.
        def scraped() -> bool:
            rows = c.dash("/api/proxies")["proxies"]
            return all(
                (r := find(rows, proxy=f"{p}.{NS}")) is not None and r["scraped"]
                for p in ("catalog-1", "frontend-1")
            )

        eventually(scraped, 30, "both proxies scraped")
        eventually(lambda: c.dash("/api/graph")["ready"], 10, "two scrapes")
        send_traffic(frontend)

        def catalog_counted() -> dict[str, Any] | None:
            rows = c.dash("/api/services")["services"]
            row = find(rows, namespace=NS, name="catalog")
            return row if row and row["requests"] == FROM_FRONTEND + FROM_OUTSIDE else None

        catalog = eventually(catalog_counted, 20, "catalog's requests in the window")
        # Exact once catalog's proxy can tell its callers apart (the caller's
        # identity on its series); until then the outside callers' share gets
        # catalog's overall success rate (46/50), which is 0.904 here.
        assert catalog["success_rate"] == pytest.approx(
            1 - FAILED / (FROM_FRONTEND + FROM_OUTSIDE), abs=0.02
        )
        assert catalog["rps"] > 0 and catalog["p99_ms"] is not None

        graph = c.dash("/api/graph")
        edges = {(e["source"], e["destination"]): e for e in graph["edges"]}
        assert (f"{NS}/frontend", f"{NS}/catalog") in edges, json.dumps(graph)
        meshed = edges[(f"{NS}/frontend", f"{NS}/catalog")]
        assert meshed["requests"] == FROM_FRONTEND
        assert meshed["success_rate"] == pytest.approx(1 - FAILED / FROM_FRONTEND, abs=0.005)
        assert edges[("unknown", f"{NS}/catalog")]["requests"] == FROM_OUTSIDE

        # `synchro top` reads the same numbers from the controller API.
        top = subprocess.run(
            [
                *(sys.executable, "-m", "synchro.cli", "top", "--controller", c.api),
                *("--ca", str(c.cert), "-n", NS, "-o", "json"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert top.returncode == 0, top.stderr
        rows = json.loads(top.stdout)
        assert find(rows, name="catalog")["requests"] == FROM_FRONTEND + FROM_OUTSIDE  # type: ignore[index]
        table = subprocess.run(
            [sys.executable, "-m", "synchro.cli", "top", "--controller", c.dashboard, "--once"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 0, table.stderr
        assert table.stdout.split("\n")[0].split() == [
            "NAMESPACE",
            "SERVICE",
            "REQUESTS/S",
            "SUCCESS",
            "P50",
            "P99",
        ]
        assert any(line.split()[:2] == [NS, "catalog"] for line in table.stdout.splitlines())

        # Chromium: the page's script draws the graph; its data is in the DOM.
        screenshot = tmp_path / "dashboard.png"
        run_chromium(c.dashboard + "/", tmp_path, f"--screenshot={screenshot}")
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if keep := os.environ.get("SYNCHRO_DASHBOARD_PNG"):
            shutil.copyfile(screenshot, keep)
        dom = DomGraph()
        dom.feed(run_chromium(c.dashboard + "/", tmp_path, "--dump-dom"))
        data = json.loads(dom.data)
        assert {(e["source"], e["destination"]) for e in data["edges"]} >= {
            (f"{NS}/frontend", f"{NS}/catalog"),
            ("unknown", f"{NS}/catalog"),
        }
        assert {n["id"] for n in data["nodes"]} >= {
            f"{NS}/frontend",
            f"{NS}/catalog",
            "unknown",
        }
        # What the script drew: nodes and edges as SVG groups, and the tables.
        assert dom.edges >= {(f"{NS}/frontend", f"{NS}/catalog"), ("unknown", f"{NS}/catalog")}
        assert dom.nodes >= {f"{NS}/frontend", f"{NS}/catalog", "unknown"}
        text = " ".join(dom.texts)
        assert "catalog-1.shop" in text and "frontend-1.shop" in text and "SYNCED" in text


def test_golden_metrics_from_a_real_prometheus(tmp_path: Path) -> None:
    """`--prometheus-url`: the same figures from PromQL over a Prometheus that
    scrapes the proxy (Debian's `prometheus`, 1 s scrape interval)."""
    from tests.integration.test_prometheus_scrape import PROMETHEUS, prometheus, query

    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is missing (apt-get install prometheus)")
    window = 6.0
    env = {"POD_NAME": "web-1", "POD_NAMESPACE": NS}
    with ExitStack() as stack:
        app = stack.enter_context(BackgroundServer(app_handler))
        proxy = stack.enter_context(run_proxy(static_destination=app.address, env=env))
        prom = stack.enter_context(prometheus(f"{LOOPBACK}:{proxy.status[1]}"))
        port = free_port()
        log_path = tmp_path / "controller.log"
        with log_path.open("wb") as out:
            ctl = subprocess.Popen(
                [
                    *(sys.executable, "-m", "controlplane.main", "--no-webhook"),
                    *("--metrics-listen", f"{LOOPBACK}:{port}", "--prometheus-url", prom),
                    *("--metrics-window", str(window)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.callback(ctl.wait, 10)
        stack.callback(ctl.terminate)

        def dash(path: str) -> Any:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=10) as r:
                return json.loads(r.read())

        conn = http.client.HTTPConnection(*proxy.outbound, timeout=10)
        assert get(proxy.outbound, "/warm-up", conn) == 200  # the series exist before the window
        eventually(lambda: query(prom, "synchro_requests_total"), 40, "Prometheus scraped")
        time.sleep(window + 1.5)
        statuses = [get(proxy.outbound, "/fail" if i < 5 else "/ok", conn) for i in range(20)]
        conn.close()
        assert statuses.count(503) == 5

        def counted() -> dict[str, Any] | None:
            edges = dash("/api/graph")["edges"]
            edge = find(edges, source=f"{NS}/web")
            return edge if edge and edge["requests"] == 20 else None

        try:
            edge = eventually(counted, 30, "the 20 requests through Prometheus")
        except AssertionError:
            print(log_path.read_text(errors="replace")[-3000:])
            raise
        assert edge["success_rate"] == 0.75
        assert edge["rps"] == pytest.approx(20 / window, rel=0.01)
