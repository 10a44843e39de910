"""`synchro check`, run as the real CLI against a FAKE Kubernetes API server (the one
in fake_apiserver.py, taught here the few extra calls `check` makes) and a REAL
`synchro-controller` behind it: the fake's service proxy forwards to the
controller over HTTPS, as the API server's `services/.../proxy` does; the
dry-run Pod create runs the real injection core, as the webhook would. The local
mode is run against the same controller directly.

The fake is not Kubernetes: it speaks just enough JSON for these calls.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from cryptography.hazmat.primitives import serialization
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from controlplane import ca
from synchro.commands import check
from tests.integration.controller_harness import ControllerProcess
from tests.integration.fake_apiserver import FakeAPIServer

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = "/apis/apps/v1/namespaces/synchro-system/deployments"
MWCS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
NAMESPACES = "/api/v1/namespaces"
TOKEN = "check-test-token"


def status(code: int, message: str, reason: str = "") -> JSONResponse:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    body.update(message=message, reason=reason)
    return JSONResponse(body, status_code=code)


@dataclass
class FakeCluster(FakeAPIServer):
    """FakeAPIServer plus /version, SelfSubjectAccessReview, single-object GETs,
    label-selected namespace lists, dry-run Pod creates and the service proxy."""

    version: dict[str, str] = field(
        default_factory=lambda: {"major": "1", "minor": "30", "gitVersion": "v1.30.2"}
    )
    denied: set[tuple[str, str, str, str]] = field(default_factory=set)
    webhook_up: bool = True
    controller_url: str = ""
    controller_ca: str = ""
    created_pods: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)

    async def _collection_endpoint(self, request: Request) -> Response:
        path = request.url.path
        self.auth_headers.append(request.headers.get("authorization", ""))
        if path == "/version":
            return JSONResponse(self.version)
        if path.endswith("/selfsubjectaccessreviews") and request.method == "POST":
            review = await request.json()
            a = review["spec"]["resourceAttributes"]
            key = (a["verb"], a.get("group", ""), a["resource"], a.get("namespace", ""))
            review["status"] = {"allowed": key not in self.denied}
            return JSONResponse(review, status_code=201)
        if path.startswith(check.SERVICE_PROXY):
            return await self._service_proxy(path[len(check.SERVICE_PROXY) :])
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path)
        if m and request.method == "POST":
            return await self._create_pod(request, m[1])
        if path == NAMESPACES and "labelSelector" in request.query_params:
            k, _, v = request.query_params["labelSelector"].partition("=")
            items = [
                o
                for o in self.objects.get(NAMESPACES, {}).values()
                if o["metadata"].get("labels", {}).get(k) == v
            ]
            return JSONResponse({"kind": "NamespaceList", "items": items})
        collection, _, name = path.rpartition("/")
        if request.method == "GET" and collection in (DEPLOYMENTS, MWCS):
            for (_, n), obj in self.objects.get(collection, {}).items():
                if n == name:
                    return JSONResponse(obj)
            return status(404, f'"{name}" not found', "NotFound")
        return await super()._collection_endpoint(request)

    async def _create_pod(self, request: Request, namespace: str) -> Response:
        from webhook.config import InjectorConfig
        from webhook.inject import Skip, apply, patch, plan

        pod = await request.json()
        if request.query_params.get("dryRun") != "All":
            # check must never create anything: make a real create fail loudly.
            self.created_pods.append(pod)
            return status(400, "this fake only takes dry-run creates", "BadRequest")
        if not self.webhook_up:
            return status(
                500,
                'Internal error occurred: failed calling webhook "object.inject.synchro.dev": '
                "no endpoints available for service synchro-controller",
                "InternalError",
            )
        decision = plan(pod, namespace, InjectorConfig())
        if not isinstance(decision, Skip):
            pod = apply(pod, patch(pod, decision))
        return JSONResponse(pod, status_code=201)

    async def _service_proxy(self, rest: str) -> Response:
        if not self.controller_url:
            return status(503, "no endpoints available for service synchro-controller")
        ctx = ssl.create_default_context(cafile=self.controller_ca)
        async with httpx.AsyncClient(verify=ctx) as client:
            resp = await client.get(self.controller_url + rest)
        return Response(resp.content, resp.status_code, media_type="application/json")


@contextmanager
def run_fake(fake: FakeCluster) -> Iterator[FakeCluster]:
    config = uvicorn.Config(
        fake.app(),
        host="127.0.0.1",
        port=fake.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-cluster", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "fake did not start"
            time.sleep(0.01)
        yield fake
    finally:
        server.should_exit = True
        server.force_exit = True
        fake._notify()
        thread.join(5)


def write_root(path: Path) -> None:
    """A CA root valid for years (the controller pushes it as the trust bundle)."""
    cert, _ = ca.new_root("cluster.local", dt.datetime.now(dt.UTC))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class CheckedController(ControllerProcess):
    """The harness's controller, started with a trust bundle."""

    def start(self, timeout: float = 20.0) -> None:
        bundle = self.workdir / "roots.pem"
        write_root(bundle)
        real_popen = subprocess.Popen

        def popen(cmd: list[str], *args: Any, **kw: Any) -> Any:
            return real_popen([*cmd, "--trust-bundle", str(bundle)], *args, **kw)

        subprocess.Popen = popen  # type: ignore[assignment,misc]
        try:
            super().start(timeout)
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    root = tmp_path_factory.mktemp("check-controller")
    config = root / "config"
    config.mkdir()
    (config / "svc.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
        "spec: {selector: {app: web}, ports: [{name: http, port: 80}]}\n"
    )
    ctl = CheckedController(config, root)
    try:
        ctl.start()
        yield ctl
    finally:
        ctl.stop()


def installed(fake: FakeCluster, *, ready: int = 2, ca_bundle: str = "Y2E=") -> None:
    fake.put(
        DEPLOYMENTS,
        {
            "metadata": {"name": "synchro-controller", "namespace": "synchro-system"},
            "spec": {"replicas": 2},
            "status": {"readyReplicas": ready},
        },
    )
    hook = {"clientConfig": {"caBundle": ca_bundle}}
    fake.put(
        MWCS,
        {
            "metadata": {"name": "synchro-injector"},
            "webhooks": [
                {"name": "namespace.inject.synchro.dev", **hook},
                {"name": "object.inject.synchro.dev", **hook},
            ],
        },
    )
    fake.put(
        NAMESPACES, {"metadata": {"name": "shop", "labels": {"synchro.dev/inject": "enabled"}}}
    )
    fake.put(NAMESPACES, {"metadata": {"name": "default"}})


def kubeconfig(tmp_path: Path, fake: FakeCluster) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                "users": [{"name": "me", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                "current-context": "fake",
            }
        )
    )
    return path


def synchro(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCHRO_", "KUBERNETES_"))}
    return subprocess.run(
        [sys.executable, "-m", "synchro.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=REPO,
    )


def lines(out: str) -> dict[str, str]:
    """{check name: its line} from the table output."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"^([\u2714\u2718]) ([^:]+): ", line)
        if m:
            found[m[2]] = line
    return found


# --- before install ---------------------------------------------------------------------------


def test_pre_all_good(tmp_path: Path) -> None:
    with run_fake(FakeCluster()) as fake:
        done = synchro("check", "--pre", "--kubeconfig", str(kubeconfig(tmp_path, fake)))
        assert done.returncode == 0, done.stdout + done.stderr
        got = lines(done.stdout)
        assert got["Kubernetes version"].startswith("\u2714")
        assert "v1.30.2" in got["Kubernetes version"]
        assert got["permissions to install"].startswith("\u2714")
        assert "all checks passed" in done.stdout
        assert set(fake.auth_headers) == {f"Bearer {TOKEN}"}
        assert fake.created_pods == []


def test_pre_old_cluster_and_missing_permission(tmp_path: Path) -> None:
    fake = FakeCluster(
        version={"major": "1", "minor": "28", "gitVersion": "v1.28.9"},
        denied={("create", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "")},
    )
    with run_fake(fake):
        done = synchro("check", "--pre", "--kubeconfig", str(kubeconfig(tmp_path, fake)))
    assert done.returncode == 1
    got = lines(done.stdout)
    assert got["Kubernetes version"].startswith("\u2718")
    assert "native sidecars need >= 1.29" in got["Kubernetes version"]
    assert "--set nativeSidecar=false" in done.stdout
    assert got["permissions to install"].startswith("\u2718")
    assert (
        "create mutatingwebhookconfigurations.admissionregistration.k8s.io cluster-wide"
        in done.stdout
    )
    assert "2 of 2 checks failed" in done.stdout


def test_permissions_asked_are_what_install_creates() -> None:
    from synchro.commands import install

    asked = check.needed_permissions(install.render())
    assert ("create", "apps", "deployments", "synchro-system") in asked
    assert ("create", "apiextensions.k8s.io", "customresourcedefinitions", "") in asked
    assert ("create", "", "namespaces", "") in asked
    assert ("patch", "rbac.authorization.k8s.io", "clusterroles", "") in asked


# --- after install ------------------------------------------------------------------------------


def test_post_all_good(tmp_path: Path, controller: ControllerProcess) -> None:
    fake = FakeCluster(controller_url=controller.url, controller_ca=str(controller.cert))
    with run_fake(fake):
        installed(fake)
        done = synchro("check", "--kubeconfig", str(kubeconfig(tmp_path, fake)), "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert set(rows) == {
        "controller Deployment",
        "webhook caBundle",
        "webhook answers",
        "controller API",
        "CA roots",
    }
    assert all(r["ok"] for r in rows.values()), rows
    assert "injected" in rows["webhook answers"]["detail"]
    assert "in shop" in rows["webhook answers"]["detail"]  # the labelled namespace
    assert "1 valid" in rows["CA roots"]["detail"]
    assert fake.created_pods == []


def test_post_broken_install(tmp_path: Path) -> None:
    fake = FakeCluster(webhook_up=False)  # and no controller behind the Service
    with run_fake(fake):
        installed(fake, ready=0, ca_bundle="")
        done = synchro("check", "--kubeconfig", str(kubeconfig(tmp_path, fake)))
    assert done.returncode == 1
    got = lines(done.stdout)
    for name in ("controller Deployment", "webhook caBundle", "webhook answers", "controller API"):
        assert got[name].startswith("\u2718"), got
    assert "0/2 replicas ready" in got["controller Deployment"]
    assert "failed calling webhook" in got["webhook answers"]
    assert "hint: kubectl -n synchro-system describe deployment synchro-controller" in done.stdout


def test_post_nothing_installed(tmp_path: Path) -> None:
    with run_fake(FakeCluster()) as fake:
        done = synchro("check", "--kubeconfig", str(kubeconfig(tmp_path, fake)))
    assert done.returncode == 1
    assert "no Deployment synchro-system/synchro-controller" in done.stdout
    assert "no MutatingWebhookConfiguration synchro-injector" in done.stdout


def test_unreachable_cluster_is_a_failed_check_not_a_crash(tmp_path: Path) -> None:
    fake = FakeCluster()  # never started: nothing listens on its port
    done = synchro("check", "--pre", "--kubeconfig", str(kubeconfig(tmp_path, fake)))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert lines(done.stdout)["Kubernetes API"].startswith("\u2718")


def test_no_kubeconfig(tmp_path: Path) -> None:
    done = synchro("check", "--kubeconfig", str(tmp_path / "missing"))
    assert done.returncode == 1
    assert done.stderr.startswith("synchro: no Kubernetes credentials")


# --- a local controller -------------------------------------------------------------------------


def test_local_controller(controller: ControllerProcess) -> None:
    args = ("check", "--local", "--controller", controller.url, "--cacert", str(controller.cert))
    done = synchro(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    got = lines(done.stdout)
    assert set(got) == {"controller API", "CA roots", "resources", "proxies"}
    # An invalid resource in the directory: reported with its file, as the controller does.
    (controller.config_dir / "bad.yaml").write_text(
        "apiVersion: synchro.dev/v1alpha1\nkind: PeerAuthentication\n"
        "metadata: {name: bad, namespace: default}\nspec: {mtls: {mode: SOMETIMES}}\n"
    )
    deadline = time.monotonic() + 20
    while True:
        done = synchro(*args)
        if done.returncode == 1:
            break
        assert time.monotonic() < deadline, done.stdout
        time.sleep(0.2)
    got = lines(done.stdout)
    assert got["resources"].startswith("\u2718")
    assert "bad.yaml" in got["resources"] and "SOMETIMES" in got["resources"]
    (controller.config_dir / "bad.yaml").unlink()


def test_local_unreachable_controller() -> None:
    done = synchro("check", "--local", "--controller", "https://127.0.0.1:9")
    assert done.returncode == 1
    assert lines(done.stdout)["controller API"].startswith("\u2718")


# --- the pure judgements --------------------------------------------------------------------------


def test_ca_result_judges_expiry_and_kind() -> None:
    now = dt.datetime.now(dt.UTC)
    root, _ = ca.new_root("cluster.local", now)
    pem = root.public_bytes(serialization.Encoding.PEM).decode()
    assert check.ca_result([pem], now).ok
    late = now + dt.timedelta(days=3650 - 10)
    assert "expires in" in check.ca_result([pem], late).detail
    assert not check.ca_result([pem], now + dt.timedelta(days=4000)).ok
    assert not check.ca_result([], now).ok
    assert not check.ca_result(
        ["-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"], now
    ).ok


def test_version_parsing() -> None:
    assert check.parse_version({"major": "1", "minor": "29+"}) == (1, 29)
    assert check.parse_version({"gitVersion": "v1.31.0-eks-1"}) == (1, 31)
    assert check.parse_version({}) is None
    assert not check.version_result({}).ok
