"""Telemetry of a `synchro up` mesh, seen from outside as an operator would:
a real Prometheus scrapes the proxies, an OTLP receiver takes the traces, and
the proxies' access logs are read from their log files.

fixtures/telemetry: in namespace `tel`, `client` and `intruder` call `server`
(HTTP on :80, gRPC on :50051, a one-shot TCP echo on :9000) over mTLS; an
AuthorizationPolicy denies `intruder`; `outside/plain` has no sidecar. Its
`synchro-config` turns on JSON access logs (text for `intruder`), 100 % trace
sampling, and names a collector on the node's bridge address.

Prometheus (Debian's package) and the OTLP receiver run inside the node's
network namespace, the only place from which the Pods' IPs are reachable: the
receiver's socket is made there by this process (`netns_socket`), Prometheus is
started with `ip netns exec`, and its HTTP API is queried from there too. Both
are stopped before `synchro down`, also when a test fails.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from synchro.local import mesh, netns
from tests.integration.prometheus_support import PROMETHEUS, RunningPrometheus, run_prometheus
from tests.netns.test_up import Up, mesh_up

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "telemetry"
# fixtures/telemetry/tel.yaml names the collector at the default subnet's gateway.
GATEWAY = str(ipaddress.ip_network(mesh.DEFAULT_SUBNET)[1])
OTLP_PORT = 4318
PROM_PORT = 9090
WAIT = 30.0

SPIFFE = "spiffe://cluster.local/ns/tel/sa/"
CLIENT, SERVER, INTRUDER = SPIFFE + "client", SPIFFE + "server", SPIFFE + "intruder"
TCP_PROBE = (
    "import socket, sys; s = socket.create_connection(('server.tel', 9000), timeout=5); "
    "s.sendall(b'\\x00ping'); print(s.recv(100)); s.close()"
)


# --- the receiver and Prometheus, in the node namespace ---------------------------------


class Receiver:
    """OTLP/HTTP traces endpoint at GATEWAY:4318 in the node namespace."""

    def __init__(self, node_ns: str) -> None:
        self.spans: list[tuple[str, Span]] = []  # (service.name, span)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for rs in request.resource_spans:
                        attrs = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            receiver.spans += [(attrs["service.name"], s) for s in ss.spans]
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer((GATEWAY, OTLP_PORT), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = netns.netns_socket(node_ns)
        server.daemon_threads = True
        try:
            server.server_bind()
            server.server_activate()
        except OSError:
            server.server_close()
            raise
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: str, n: int) -> list[tuple[str, Span]]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with self.lock:
                found = [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= n:
                return found
            time.sleep(0.2)
        raise AssertionError(f"trace {trace_id}: {len(found)} spans after {WAIT}s, expected {n}")


@dataclass
class Tel:
    up: Up
    node_ns: str
    receiver: Receiver
    prometheus: RunningPrometheus
    offsets: dict[str, int] = field(default_factory=dict)

    # -- Prometheus --------------------------------------------------------------

    def query(self, promql: str) -> list[dict[str, Any]]:
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, raw = mesh.netns_request(self.node_ns, "GET", "127.0.0.1", PROM_PORT, path)
        body = json.loads(raw)
        assert status == 200 and body["status"] == "success", raw[:500]
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(
        self, promql: str, check: Callable[[list[dict[str, Any]]], bool]
    ) -> list[dict[str, Any]]:
        """Poll `promql` until `check` accepts the answer (bounded by WAIT)."""
        deadline = time.monotonic() + WAIT
        last: object = "no answer"
        while time.monotonic() < deadline:
            self.prometheus.check_alive()
            try:
                result = self.query(promql)
            except (OSError, ValueError) as exc:  # still starting
                last = exc
            else:
                if check(result):
                    return result
                last = result
            time.sleep(0.5)
        raise AssertionError(f"{promql}\nnot as expected after {WAIT}s; last answer: {last}")

    # -- Pods ---------------------------------------------------------------------

    def exec(self, pod: str, *command: str) -> subprocess.CompletedProcess[str]:
        return self.up.exec(pod, *command)

    def proxy_log(self, pod: str) -> Path:
        namespace, name = pod.split("/")
        return self.up.paths.logs / namespace / name / "synchro-proxy.log"

    def mark(self, pod: str) -> None:
        """Later `access_lines` calls see only what `pod`'s proxy logs from now on."""
        path = self.proxy_log(pod)
        self.offsets[pod] = path.stat().st_size if path.exists() else 0

    def access_lines(self, pod: str, match: Callable[[str], bool], n: int = 1) -> list[str]:
        """`n` access log lines (JSON or text) of `pod`'s proxy since `mark`."""
        deadline = time.monotonic() + 10
        while True:
            with self.proxy_log(pod).open("rb") as f:
                f.seek(self.offsets.get(pod, 0))
                lines = [
                    line
                    for line in f.read().decode(errors="replace").splitlines()
                    if line.startswith(("{", "[")) and match(line)
                ]
            if len(lines) >= n or time.monotonic() > deadline:
                assert len(lines) >= n, f"{pod}: {len(lines)} access lines, expected {n}"
                return lines
            time.sleep(0.1)

    def json_lines(self, pod: str, n: int = 1, **fields: object) -> list[dict[str, Any]]:
        def match(line: str) -> bool:
            if not line.startswith("{"):
                return False
            data = json.loads(line)
            return all(data.get(k) == v for k, v in fields.items())

        return [json.loads(line) for line in self.access_lines(pod, match, n)]


@pytest.fixture(scope="module")
def tel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tel]:
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is missing (apt-get install prometheus)")
    directory = tmp_path_factory.mktemp("telemetry") / "manifests"
    shutil.copytree(FIXTURES, directory)
    with mesh_up(directory) as up, tempfile.TemporaryDirectory(prefix="synchro-prom-") as tmp:
        info = mesh.read_info(up.paths)
        assert info["gateway"] == GATEWAY, "tel.yaml's tracingEndpoint assumes the default subnet"
        node_ns = info["node_netns"]
        pods = up.status()["pods"]
        targets = [f"{p['ip']}:15020" for p in pods if p["meshed"]]
        receiver = Receiver(node_ns)
        try:
            with run_prometheus(targets, Path(tmp), port=PROM_PORT, netns=node_ns) as prometheus:
                yield Tel(up, node_ns, receiver, prometheus)
        finally:
            receiver.close()


def curl(t: Tel, pod: str, url: str, *headers: str) -> tuple[int, str]:
    """`curl` inside `pod`: (HTTP status, body)."""
    argv = ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}"]
    for h in headers:
        argv += ["-H", h]
    proc = t.exec(pod, *argv, url)
    assert proc.returncode == 0, proc.stderr
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), body


def statuses(t: Tel, pod: str, url: str, n: int) -> list[str]:
    """`n` GETs of `url` from `pod` (one process, a connection per request)."""
    script = f'for i in $(seq {n}); do curl -s -o /dev/null -w "%{{http_code}}\\n" {url}; done'
    proc = t.exec(pod, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


# --- (1) Prometheus counts what the traffic did -------------------------------------------

OK, FAILED = 15, 5


def by_code(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["response_code"]: float(r["value"][1]) for r in result}


def test_prometheus_counts_requests_and_errors_with_source_and_destination_labels(
    tel: Tel,
) -> None:
    # 200 and 500 are this test's own codes: other tests' requests answer others.
    assert statuses(tel, "tel/client-0", "http://server.tel/status/200", OK) == ["200"] * OK
    assert statuses(tel, "tel/client-0", "http://server.tel/status/500", FAILED) == ["500"] * FAILED
    edge = (
        f'source_workload="client",source_namespace="tel",source_principal="{CLIENT}",'
        'destination_service="tel/server",destination_workload="server",'
        f'destination_namespace="tel",destination_principal="{SERVER}",response_code=~"200|500"'
    )
    expected = {"200": OK, "500": FAILED}
    for reporter, extra in (
        ("source", ""),
        # The callee's sidecar saw the caller's verified identity over mTLS.
        ("destination", ',connection_security_policy="mutual_tls"'),
    ):
        promql = f'sum by (response_code) (synchro_requests_total{{reporter="{reporter}",{edge}{extra}}})'
        tel.wait_for(promql, lambda r: by_code(r) == expected)
    for reporter in ("source", "destination"):
        selector = f'reporter="{reporter}",{edge}'
        rate = (
            f'sum(synchro_requests_total{{{selector},response_code=~"5.."}}) '
            f"/ sum(synchro_requests_total{{{selector}}})"
        )
        (answer,) = tel.wait_for(rate, lambda r: len(r) == 1)
        assert float(answer["value"][1]) == pytest.approx(FAILED / (OK + FAILED))
    # Latency was recorded for the same edge: one histogram count per request.
    count = f'sum(synchro_request_duration_seconds_count{{reporter="destination",{edge}}})'
    tel.wait_for(count, lambda r: len(r) == 1 and float(r[0]["value"][1]) == OK + FAILED)


def test_prometheus_sees_every_proxy_and_its_certificate_expiry(tel: Tel) -> None:
    meshed = [p for p in tel.up.status()["pods"] if p["meshed"]]
    tel.wait_for('up{job="synchro-proxies"} == 1', lambda r: len(r) == len(meshed))
    expiry = "synchro_certificate_expiry_timestamp_seconds - time()"
    answer = tel.wait_for(expiry, lambda r: len(r) == len(meshed))
    for series in answer:
        left = float(series["value"][1])
        assert 0 < left <= 25 * 3600, series  # a fresh 24 h workload certificate


# --- (2) traces go where synchro-config says ---------------------------------------------


def test_a_request_makes_a_client_and_a_server_span_at_the_configured_collector(
    tel: Tel,
) -> None:
    trace_id, caller = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    code, _ = curl(
        tel,
        "tel/client-0",
        "http://server.tel/status/202",
        f"traceparent: 00-{trace_id}-{caller}-01",
    )
    assert code == 202
    spans = dict(tel.receiver.trace(trace_id, 2))
    client, server = spans["client"], spans["server"]
    assert client.kind == Span.SPAN_KIND_CLIENT and server.kind == Span.SPAN_KIND_SERVER
    assert client.parent_span_id.hex() == caller  # the app's traceparent is continued
    assert server.parent_span_id == client.span_id
    attrs = {kv.key: kv.value for kv in server.attributes}
    assert attrs["http.response.status_code"].int_value == 202
    assert attrs["synchro.source.principal"].string_value == CLIENT


# --- (3) access logs -----------------------------------------------------------------------

# Every field the issue lists, by its JSON name.
FIELDS = (
    "time", "method", "authority", "path", "protocol", "status", "response_flags",
    "bytes_received", "bytes_sent", "duration_ms", "upstream_host", "route",
    "source_principal", "destination_principal", "request_id", "trace_id",
)  # fmt: skip


def check_common(line: dict[str, Any], reporter: str) -> None:
    assert set(FIELDS) <= set(line), set(FIELDS) - set(line)
    assert line["reporter"] == reporter
    logged = dt.datetime.fromisoformat(line["time"])  # ISO 8601, UTC ("Z")
    assert logged.tzinfo == dt.UTC and abs(time.time() - logged.timestamp()) < 120
    assert line["duration_ms"] > 0


def test_access_log_of_an_http_request(tel: Tel) -> None:
    rid = str(uuid.uuid4())
    code, body = curl(tel, "tel/client-0", "http://server.tel/status/201", f"x-request-id: {rid}")
    assert code == 201
    (out,) = tel.json_lines("tel/client-0", request_id=rid)
    (inn,) = tel.json_lines("tel/server-0", request_id=rid)
    for line, reporter in ((out, "source"), (inn, "destination")):
        check_common(line, reporter)
        assert (line["method"], line["authority"], line["path"]) == (
            "GET",
            "server.tel",
            "/status/201",
        )
        assert (line["protocol"], line["http_version"], line["status"]) == ("http", "1.1", 201)
        assert line["response_flags"] == "-"
        assert line["bytes_sent"] >= len(body) and line["bytes_received"] == 0
        assert (line["source_principal"], line["destination_principal"]) == (CLIENT, SERVER)
        assert (line["source_workload"], line["destination_workload"]) == ("client", "server")
        assert line["destination_service"] == "tel/server"
        assert len(line["trace_id"]) == 32 and line["trace_id"] == out["trace_id"]
    server_ip = tel.up.pod("tel/server-0")["ip"]
    assert out["upstream_host"] == f"{server_ip}:8080" and out["route"] == "tel/server-http"
    assert inn["upstream_host"].endswith(":8080")  # the app, behind the inbound side
    assert inn["connection_security_policy"] == "mutual_tls"


def test_access_log_of_a_grpc_call(tel: Tel) -> None:
    for pod in ("tel/client-0", "tel/server-0"):
        tel.mark(pod)
    proc = tel.exec("tel/client-0", "python3", "-m", "examples.pay", "server.tel:50051")
    assert json.loads(proc.stdout)["status"] == "OK", proc.stdout + proc.stderr
    path = "/shop.Payments/Charge"
    (out,) = tel.json_lines("tel/client-0", path=path)
    (inn,) = tel.json_lines("tel/server-0", path=path, request_id=out["request_id"])
    for line, reporter in ((out, "source"), (inn, "destination")):
        check_common(line, reporter)
        assert (line["method"], line["authority"]) == ("POST", "server.tel:50051")
        assert (line["protocol"], line["http_version"]) == ("grpc", "2")
        assert (line["status"], line["grpc_status"], line["response_flags"]) == (200, "0", "-")
        assert line["bytes_received"] > 0 and line["bytes_sent"] > 0  # the messages, framed
        assert (line["source_principal"], line["destination_principal"]) == (CLIENT, SERVER)
        assert line["trace_id"] == out["trace_id"] and len(line["request_id"]) == 36
    assert out["route"] == "tel/server-grpc" and out["upstream_host"].endswith(":50051")


def test_access_log_of_a_tcp_connection(tel: Tel) -> None:
    for pod in ("tel/client-0", "tel/server-0"):
        tel.mark(pod)
    proc = tel.exec("tel/client-0", "python3", "-c", TCP_PROBE)
    assert proc.stdout.strip() == "b'\\x00ping'", proc.stderr
    (out,) = tel.json_lines("tel/client-0", protocol="tcp")
    (inn,) = tel.json_lines("tel/server-0", protocol="tcp")
    for line, reporter in ((out, "source"), (inn, "destination")):
        check_common(line, reporter)
        # 5 bytes each way; no HTTP fields on a TCP line.
        assert (line["bytes_received"], line["bytes_sent"]) == (5, 5)
        assert line["method"] is line["path"] is line["status"] is line["request_id"] is None
        assert line["response_flags"] == "-" and line["destination_service"] == "tel/server"
        assert line["source_principal"] == CLIENT
    assert out["upstream_host"] == f"{tel.up.pod('tel/server-0')['ip']}:9000"
    assert inn["destination_principal"] == SERVER
    assert inn["connection_security_policy"] == "mutual_tls"


def test_access_log_of_denied_requests_json_at_the_server_text_at_the_caller(tel: Tel) -> None:
    for pod in ("tel/intruder-0", "tel/server-0"):
        tel.mark(pod)
    code, body = curl(tel, "tel/intruder-0", "http://server.tel/status/200")
    assert code == 403 and "RBAC: access denied" in body
    proc = tel.exec("tel/intruder-0", "python3", "-m", "examples.pay", "server.tel:50051")
    assert json.loads(proc.stdout)["status"] == "PERMISSION_DENIED"
    proc = tel.exec("tel/intruder-0", "python3", "-c", TCP_PROBE)
    assert proc.returncode != 0 and "reset" in proc.stderr.lower(), proc.stderr

    http, grpc = (
        tel.json_lines("tel/server-0", protocol=p, source_principal=INTRUDER)[0]
        for p in ("http", "grpc")
    )
    (tcp,) = tel.json_lines("tel/server-0", protocol="tcp", source_principal=INTRUDER)
    for line in (http, grpc, tcp):
        check_common(line, "destination")
        assert line["response_flags"] == "UAEX"  # denied by authorization
        assert line["destination_principal"] == SERVER
    assert (http["method"], http["path"], http["status"]) == ("GET", "/status/200", 403)
    assert (grpc["path"], grpc["grpc_status"]) == ("/shop.Payments/Charge", "7")
    assert tcp["bytes_sent"] == 0  # reset before anything reached the app

    # The intruder's own proxy logs text (synchro.dev/access-log: text).
    (text,) = tel.access_lines(
        "tel/intruder-0", lambda line: line.startswith("[") and "/status/200" in line
    )
    head, quoted = text.split('"', 1)
    assert head.startswith("[") and head.rstrip().endswith("Z]")
    request, rest = quoted.split('"', 1)
    assert request == "GET /status/200 HTTP/1.1"
    status, grpc_status, flags, received, sent, duration, more = rest.split(None, 6)
    assert (status, grpc_status, flags, received) == ("403", "-", "-", "0")
    assert int(sent) > 0 and int(duration) >= 0
    authority, upstream, route, peer, request_id, trace_id = more.split('" "')
    assert authority == '"server.tel' and upstream.endswith(":8080")
    assert route == "tel/server-http" and peer == SERVER  # the callee, seen from the caller
    assert request_id == http["request_id"] and trace_id == http["trace_id"] + '"'


# --- (4) the caller's workload: only from a verified peer ---------------------------------


def test_source_workload_is_never_taken_from_plaintext_or_from_the_app(tel: Tel) -> None:
    forged = "x-synchro-peer-workload: payments"
    for pod, expected_principal, expected_workload in (
        ("outside/plain-0", None, None),
        ("tel/client-0", CLIENT, "client"),
    ):
        rid = str(uuid.uuid4())
        code, body = curl(tel, pod, "http://server.tel/headers", forged, f"x-request-id: {rid}")
        assert code == 200
        seen = json.loads(body)
        assert "x-synchro-peer-workload" not in seen  # stripped before the app
        (line,) = tel.json_lines("tel/server-0", request_id=rid)
        assert line["source_principal"] == expected_principal
        # Plaintext: not believed. From the meshed client: its sidecar drops the
        # app's copy and names the real workload.
        assert line["source_workload"] == expected_workload
