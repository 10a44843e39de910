"""The webhook as the API server sees it: `synchro-controller` serving HTTPS on
127.0.0.1, called with AdmissionReview v1 bodies by a client that verifies the
server certificate. Every bad-input case of issue 2."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest
import yaml

from controlplane import webhook_tls
from webhook.inject import uninject_pod

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/synchro:itest"


@dataclass(frozen=True)
class WebhookPKI:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


@dataclass(frozen=True)
class WebhookServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def webhook_pki(tmp_path_factory: pytest.TempPathFactory) -> WebhookPKI:
    directory = tmp_path_factory.mktemp("webhook-pki")
    now = dt.datetime.now(dt.UTC)
    serving = webhook_tls.self_signed(["localhost", "127.0.0.1"], now)
    other, _ = webhook_tls.make_ca("someone else", now)
    paths = WebhookPKI(
        ca=directory / "ca.crt",
        cert=directory / "tls.crt",
        key=directory / "tls.key",
        other_ca=directory / "other-ca.crt",
    )
    paths.ca.write_bytes(serving.ca_pem)
    paths.cert.write_bytes(serving.cert_pem)
    paths.key.write_bytes(serving.key_pem)
    paths.other_ca.write_bytes(other)
    return paths


@pytest.fixture(scope="module")
def webhook_server(
    webhook_pki: WebhookPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebhookServer]:
    directory = tmp_path_factory.mktemp("webhook-server")
    mesh = directory / "mesh.yaml"
    mesh.write_text(f"proxyImage: {IMAGE}\nnativeSidecar: true\n")
    log = directory / "controller.log"
    port = _free_port()
    command = [
        sys.executable, "-m", "controlplane.main",
        "--webhook-listen", f"127.0.0.1:{port}",
        "--tls-cert", str(webhook_pki.cert),
        "--tls-key", str(webhook_pki.key),
        "--mesh-config", str(mesh),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = WebhookServer(f"https://127.0.0.1:{port}", process, log)
    try:
        _wait_healthy(server, webhook_pki)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Bad input is answered, never crashed on.
    assert "Traceback" not in log.read_text(), log.read_text()


def _wait_healthy(server: WebhookServer, pki: WebhookPKI) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(verify=_context(pki.ca), timeout=2) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                pytest.fail(
                    f"controller exited {server.process.returncode}:\n{server.log.read_text()}"
                )
            try:
                if client.get(server.url + "/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    pytest.fail(f"controller not healthy in time:\n{server.log.read_text()}")


def _context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


@pytest.fixture
def webhook_client(
    webhook_pki: WebhookPKI, webhook_server: WebhookServer
) -> Iterator[httpx.Client]:
    # Verifies the certificate and the name 127.0.0.1, as the API server does.
    with httpx.Client(
        base_url=webhook_server.url, verify=_context(webhook_pki.ca), timeout=10
    ) as c:
        yield c
    assert webhook_server.process.poll() is None, "the webhook must keep serving"


# --- helpers --------------------------------------------------------------------------------


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "web-1", "namespace": "shop"}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "nginx",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}},
                    "readinessProbe": {"exec": {"command": ["true"]}},
                }
            ],
            **spec,
        },
    }


_uid = 0


def review(obj: Any, *, namespace: str = "shop", operation: str = "CREATE", kind: str = "Pod",
           group: str = "", resource: str = "pods") -> dict[str, Any]:  # fmt: skip
    global _uid
    _uid += 1
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": f"uid-{_uid}",
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": resource},
            "requestKind": {"group": group, "version": "v1", "kind": kind},
            "requestResource": {"group": group, "version": "v1", "resource": resource},
            "name": (obj or {}).get("metadata", {}).get("name"),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def send(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """POST a review; check the answer is a well-formed AdmissionReview for it."""
    answer = client.post("/mutate", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    data = answer.json()
    assert data["apiVersion"] == "admission.k8s.io/v1"
    assert data["kind"] == "AdmissionReview"
    response = data["response"]
    assert response["uid"] == body["request"]["uid"]
    assert isinstance(response["allowed"], bool)
    return response


def applied(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    return jsonpatch.apply_patch(obj, ops)


def unchanged(response: dict[str, Any]) -> None:
    assert response["allowed"] is True
    assert "patch" not in response and "patchType" not in response


# --- the happy path ---------------------------------------------------------------------------


def test_health(webhook_client: httpx.Client) -> None:
    assert webhook_client.get("/healthz").json() == {"status": "ok"}
    assert webhook_client.get("/readyz").status_code == 200


def test_injects_a_pod(webhook_client: httpx.Client) -> None:
    original = pod()
    injected = applied(original, send(webhook_client, review(original)))
    kubernetes_validate.validate(injected, "1.30", strict=True)
    inits = [c["name"] for c in injected["spec"]["initContainers"]]
    assert inits == ["synchro-init", "synchro-proxy"]
    assert injected["spec"]["initContainers"][1]["image"] == IMAGE  # --mesh-config applies
    live = injected["spec"]["containers"][0]["livenessProbe"]
    assert live["httpGet"] == {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"}
    assert uninject_pod(injected) == original
    # Re-invocation (reinvocationPolicy: IfNeeded) sees the injected Pod: no-op.
    unchanged(send(webhook_client, review(injected)))


def test_injects_the_example_workloads(webhook_client: httpx.Client) -> None:
    templates = [
        d["spec"]["template"]
        for path in sorted((ROOT / "examples" / "shop").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if isinstance(d, dict) and d.get("kind") == "Deployment"
    ]
    if not templates:
        pytest.skip("no example Deployments")
    for template in templates:
        obj = {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(template)}
        injected = applied(obj, send(webhook_client, review(obj)))
        kubernetes_validate.validate(injected, "1.30", strict=True)
        assert uninject_pod(injected) == obj


def test_server_certificate_is_verified(
    webhook_pki: WebhookPKI, webhook_server: WebhookServer
) -> None:
    with (
        httpx.Client(verify=_context(webhook_pki.other_ca), timeout=5) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(webhook_server.url + "/healthz")


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "form"),
    [
        ("synchro.dev/proxy-cpu-request", "lots", "quantity"),
        ("synchro.dev/exclude-outbound-ports", "80,abc", "ports 1-65535"),
        ("synchro.dev/exclude-outbound-ip-ranges", "10.0.0.0/99", "CIDRs"),
        ("synchro.dev/include-inbound-ports", "8080,70000", "ports 1-65535"),
        ("synchro.dev/access-log", "xml", "off, json, text"),
    ],
)
def test_malformed_value_is_denied(
    webhook_client: httpx.Client, key: str, value: str, form: str
) -> None:
    response = send(webhook_client, review(pod({key: value})))
    assert response["allowed"] is False
    assert "patch" not in response
    message = response["status"]["message"]
    assert key in message and repr(value) in message and form in message
    assert response["status"]["code"] == 400


def test_unknown_annotation_is_allowed_with_a_warning(webhook_client: httpx.Client) -> None:
    original = pod({"synchro.dev/proxy-cpu-requests": "100m"})
    response = send(webhook_client, review(original))
    assert any("synchro.dev/proxy-cpu-requests" in w for w in response["warnings"])
    applied(original, response)


@pytest.mark.parametrize(
    "body",
    [
        b"this is not json",
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": ',
        b"[]",
        b"{}",
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}',
        b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}',
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "x"}}',
        b"\xff\xfe\x00garbage",
        b"",
    ],
)
def test_malformed_body_is_400_json_and_server_goes_on(
    webhook_client: httpx.Client, body: bytes
) -> None:
    answer = webhook_client.post(
        "/mutate", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("application/json")
    assert "error" in answer.json()
    # Still serving, and still injecting.
    assert webhook_client.get("/healthz").status_code == 200
    applied(pod(), send(webhook_client, review(pod())))


def test_oversized_body_is_refused(webhook_client: httpx.Client) -> None:
    answer = webhook_client.post("/mutate", content=b"x" * (9 * 1024 * 1024))
    assert answer.status_code == 413
    assert "error" in answer.json()


def test_broken_connection_mid_request_does_not_hurt(
    webhook_pki: WebhookPKI, webhook_server: WebhookServer, webhook_client: httpx.Client
) -> None:
    host, port = webhook_server.url.removeprefix("https://").split(":")
    raw = socket.create_connection((host, int(port)))
    with _context(webhook_pki.ca).wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    applied(pod(), send(webhook_client, review(pod())))


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CONNECT"])
def test_other_operations_are_allowed_unchanged(
    webhook_client: httpx.Client, operation: str
) -> None:
    unchanged(send(webhook_client, review(pod(), operation=operation)))


def test_other_kinds_are_allowed_unchanged(webhook_client: httpx.Client) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"template": {"spec": pod()["spec"]}},
    }
    unchanged(
        send(
            webhook_client,
            review(deployment, kind="Deployment", group="apps", resource="deployments"),
        )
    )
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {}}
    unchanged(send(webhook_client, review(service, kind="Service", resource="services")))


@pytest.mark.parametrize(
    "namespace", ["kube-system", "kube-public", "kube-node-lease", "synchro-system"]
)
def test_system_namespaces_are_skipped(webhook_client: httpx.Client, namespace: str) -> None:
    unchanged(send(webhook_client, review(pod(), namespace=namespace)))


def test_host_network_is_skipped(webhook_client: httpx.Client) -> None:
    unchanged(send(webhook_client, review(pod(hostNetwork=True))))


def test_disabled_pod_is_skipped(webhook_client: httpx.Client) -> None:
    unchanged(send(webhook_client, review(pod({"synchro.dev/inject": "disabled"}))))


def test_already_injected_is_skipped(webhook_client: httpx.Client) -> None:
    by_hand = pod()
    by_hand["spec"]["containers"].append({"name": "synchro-proxy", "image": "x"})
    unchanged(send(webhook_client, review(by_hand)))
    status_only = pod({"synchro.dev/status": "{}"})
    unchanged(send(webhook_client, review(status_only)))


def test_pod_without_optional_fields(webhook_client: httpx.Client) -> None:
    bare = {
        "apiVersion": "v1",
        "kind": "Pod",
        "spec": {"containers": [{"name": "a", "image": "b"}]},
    }
    injected = applied(bare, send(webhook_client, review(bare)))
    kubernetes_validate.validate(injected, "1.30", strict=True)
    assert uninject_pod(injected) == bare


def test_malformed_pod_is_denied_not_crashed(webhook_client: httpx.Client) -> None:
    broken = {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": 7}]}}
    response = send(webhook_client, review(broken))
    assert response["allowed"] is False
    assert "spec.containers[0].name" in response["status"]["message"]
