"""`synchro up` / `down` / `exec` / `logs` end to end, as a user runs them.

The fixture directory (fixtures/up) has two namespaces: `alpha` is meshed
(Deployment `web` behind Service `web` port 80 -> named port `http`), `beta`
is labelled `synchro.dev/inject=disabled` (StatefulSet `api` behind Service
`api`). The apps answer `<namespace>/<pod> <x-request-id or ->`, so a reply
shows which Pod answered and whether a proxy carried the request.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from synchro.local import hosts, mesh, netns
from synchro.local.pod import resolve_command

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "up"
NAME_FORMS = ("{s}", "{s}.{ns}", "{s}.{ns}.svc", "{s}.{ns}.svc.cluster.local")


def synchro(
    *args: str, timeout: float = 120, user: int | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [resolve_command("synchro"), *args]
    if user is not None:
        argv = [
            shutil.which("setpriv") or "setpriv",
            f"--reuid={user}",
            f"--regid={user}",
            "--clear-groups",
            # Keep the interpreter readable if it lives under a 0700 /root.
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--",
            *argv,
        ]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
    )


def _skip_unless_netns() -> None:
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"network-namespace tests skipped: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def curl_host(url: str) -> subprocess.CompletedProcess[str]:
    """curl on the host itself (not in a Pod): what a user's browser would get."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@dataclass
class Up:
    name: str
    directory: Path
    output: str
    dashboard_port: int = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}/"

    @property
    def paths(self) -> mesh.MeshPaths:
        return mesh.MeshPaths(self.name)

    def status(self) -> dict[str, Any]:
        status = mesh.read_status(self.paths)
        assert status is not None
        return status

    def pod(self, ref: str) -> dict[str, Any]:
        return next(p for p in self.status()["pods"] if p["ref"] == ref)

    def exec(self, pod: str, *command: str) -> subprocess.CompletedProcess[str]:
        return synchro("exec", pod, "--mesh", self.name, "--", *command, timeout=30)

    def curl(self, pod: str, url: str) -> str:
        proc = self.exec(pod, "curl", "-sS", "--max-time", "5", url)
        assert proc.returncode == 0, f"curl {url} from {pod}: {proc.stderr}"
        return proc.stdout.strip()

    def owned(self) -> tuple[str, list[tuple[int, int | None]]]:
        """The netns prefix and every process (pid, start time) the mesh made."""
        info = mesh.read_info(self.paths)
        prefix = info["prefix"]
        state = netns.State.load(netns.STATE_DIR / f"{prefix}.json")
        pids = list(state.pids)
        pids.append((info["supervisor"]["pid"], info["supervisor"]["start"]))
        return prefix, pids


def leftovers(name: str, prefix: str, pids: list[tuple[int, int | None]]) -> list[str]:
    out = [f"netns {n}" for n in netns.list_netns() if n.startswith(prefix + "-")]
    out += [f"/etc/netns/{n}" for n in hosts.existing(prefix)]
    out += [f"pid {pid}" for pid, start in pids if mesh.pid_alive(pid, start)]
    if (mesh.RUN_ROOT / name).exists():
        out.append(str(mesh.RUN_ROOT / name))
    if (netns.STATE_DIR / f"{prefix}.json").exists():
        out.append(str(netns.STATE_DIR / f"{prefix}.json"))
    return out


def start(directory: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return synchro("up", str(directory), "--mesh", name, "--timeout", "30", *extra)


@contextlib.contextmanager
def mesh_up(directory: Path) -> Iterator[Up]:
    """`synchro up DIR` under a fresh mesh name; always `synchro down` after.
    The dashboard gets a free port of its own: meshes of other tests may be up."""
    _skip_unless_netns()
    name = f"synt-{secrets.token_hex(3)}"
    port = free_port()
    proc = start(directory, name, "--dashboard-port", str(port))
    try:
        if proc.returncode != 0:
            log = mesh.MeshPaths(name).supervisor_log
            extra = log.read_text() if log.exists() else ""
            pytest.fail(f"synchro up failed:\n{proc.stdout}\n{proc.stderr}\n{extra}")
        yield Up(name, directory, proc.stdout, port)
    finally:
        synchro("down", "--mesh", name)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    directory = tmp_path_factory.mktemp("up") / "manifests"
    shutil.copytree(FIXTURES, directory)
    with mesh_up(directory) as running:
        yield running


def test_up_prints_a_summary_of_ready_pods(up: Up) -> None:
    assert "alpha" in up.output and "web-0" in up.output and "Ready" in up.output
    pods = {p["ref"]: p for p in up.status()["pods"]}
    assert set(pods) == {"alpha/web-0", "beta/api-0"}
    assert all(p["phase"] == "Ready" for p in pods.values())
    assert pods["alpha/web-0"]["meshed"] and not pods["beta/api-0"]["meshed"]
    names = [c["name"] for c in pods["alpha/web-0"]["containers"]]
    assert names == ["synchro-init", "synchro-proxy", "app"]


def test_the_dashboard_is_open_on_the_host(up: Up) -> None:
    # The controller listens inside the mesh's node namespace; the supervisor's
    # relay makes it reachable from the host's 127.0.0.1, as `synchro up` says.
    assert f"dashboard: {up.dashboard}" in up.output
    assert up.status()["dashboard"] == {"url": up.dashboard, "error": ""}
    page = curl_host(up.dashboard)
    assert page.returncode == 0, page.stderr
    assert "<title>Synchro</title>" in page.stdout
    metrics = curl_host(up.dashboard + "metrics")
    assert metrics.returncode == 0, metrics.stderr
    assert "synchro_controller_pushes_total" in metrics.stdout
    services = curl_host(up.dashboard + "api/services")
    assert isinstance(json.loads(services.stdout)["services"], list)


@pytest.mark.parametrize("form", NAME_FORMS)
def test_a_meshed_pod_reaches_services_by_name_through_its_proxy(up: Up, form: str) -> None:
    # alpha/web-0 calling its own Service: the node DNATs the ClusterIP back to it.
    host = form.format(s="web", ns="alpha")
    answer = up.curl("alpha/web-0", f"http://{host}/")
    pod, request_id = answer.split()
    assert pod == "alpha/web-0"
    assert request_id != "-", "the request did not pass a proxy"


def test_a_meshed_pod_reaches_an_unmeshed_service(up: Up) -> None:
    pod, request_id = up.curl("alpha/web-0", "http://api.beta:9090/").split()
    assert pod == "beta/api-0"
    assert request_id != "-"  # alpha's outbound proxy carried it


def test_an_unmeshed_pod_reaches_services_through_the_node(up: Up) -> None:
    pod, request_id = up.curl("beta/api-0", "http://web.alpha.svc.cluster.local/").split()
    assert pod == "alpha/web-0"
    assert request_id != "-"  # web-0's inbound proxy saw it
    assert up.curl("beta/api-0", "http://api:9090/") == "beta/api-0 -"


def test_hosts_files_resolve_all_four_forms_and_the_pod_itself(up: Up) -> None:
    web = up.pod("alpha/web-0")
    text = (hosts.ETC_NETNS / web["netns"] / "hosts").read_text()
    forms = [f.format(s="web", ns="alpha") for f in NAME_FORMS]
    out = up.exec("alpha/web-0", "getent", "hosts", *forms, "web-0")
    assert out.returncode == 0, out.stderr
    resolved = dict(line.split(None, 1) for line in out.stdout.splitlines())
    cluster_ips = {ip for ip, names in resolved.items() if "web-0" not in names.split()}
    assert len(cluster_ips) == 1 and cluster_ips.pop() in text
    assert resolved[web["ip"]].split() == ["web-0"]
    # A short name means the Pod's own namespace only.
    other = up.exec("beta/api-0", "getent", "hosts", "web")
    assert other.returncode != 0
    assert up.exec("beta/api-0", "getent", "hosts", "web.alpha").returncode == 0


def test_exec_runs_with_the_container_environment_and_status(up: Up) -> None:
    env = up.exec("alpha/web-0", "env").stdout.splitlines()
    assert "POD_NAME=web-0" in env and "POD_NAMESPACE=alpha" in env
    as_proxy = synchro(
        "exec", "alpha/web-0", "-c", "synchro-proxy", "--mesh", up.name, "--", "id", "-u"
    )
    assert as_proxy.stdout.strip() == "1337"
    assert up.exec("alpha/web-0", "sh", "-c", "exit 7").returncode == 7
    missing = up.exec("nope", "true")
    assert missing.returncode == 1 and "no Pod default/nope" in missing.stderr


def test_logs_per_container(up: Up) -> None:
    proxy = synchro("logs", "alpha/web-0", "-c", "synchro-proxy", "--mesh", up.name)
    assert proxy.returncode == 0 and "synchro-proxy" in proxy.stdout
    controller = synchro("logs", "synchro-system/synchro-controller", "--mesh", up.name)
    assert "configuration generation" in controller.stdout
    bad = synchro("logs", "alpha/web-0", "-c", "nope", "--mesh", up.name)
    assert bad.returncode == 1 and "no container 'nope'" in bad.stderr


def test_a_replica_change_in_a_file_adds_a_pod(up: Up) -> None:
    path = up.directory / "alpha.yaml"
    path.write_text(path.read_text().replace("replicas: 1", "replicas: 2", 1))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pods = {p["ref"]: p for p in up.status()["pods"]}
        if pods.get("alpha/web-1", {}).get("phase") == "Ready":
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"alpha/web-1 is not ready: {json.dumps(up.status()['pods'], indent=1)}")
    seen = {up.curl("beta/api-0", "http://web.alpha/").split()[0] for _ in range(30)}
    assert seen == {"alpha/web-0", "alpha/web-1"}
    assert up.curl("alpha/web-1", "http://api.beta:9090/").startswith("beta/api-0 ")


def test_down_removes_everything(up: Up) -> None:
    prefix, pids = up.owned()
    assert leftovers(up.name, prefix, pids)  # the check sees a running mesh
    proc = synchro("down", "--mesh", up.name)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(up.name, prefix, pids) == []
    assert curl_host(up.dashboard).returncode != 0, "the dashboard relay outlived the mesh"
    again = synchro("down", "--mesh", up.name)
    assert again.returncode == 1 and "no mesh named" in again.stderr


def _tiny(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: solo, namespace: tiny}\n"
        "spec:\n  containers:\n    - name: app\n"
        "      command: [python, -m, http.server, '8080']\n"
        "      readinessProbe: {tcpSocket: {port: 8080}}\n"
    )
    return directory


def test_down_cleans_up_after_a_killed_supervisor(tmp_path: Path) -> None:
    _skip_unless_netns()
    name = f"synt-{secrets.token_hex(3)}"
    proc = start(_tiny(tmp_path / "tiny"), name)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        u = Up(name, tmp_path, proc.stdout)
        prefix, pids = u.owned()
        supervisor = mesh.read_info(u.paths)["supervisor"]["pid"]
        os.kill(supervisor, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (
            mesh.pid_alive(supervisor, mesh.proc_start_time(supervisor))
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert any(n.startswith(prefix) for n in netns.list_netns())  # the Pods outlived it
        assert u.curl("tiny/solo", "http://127.0.0.1:8080/") != ""
        down = synchro("down", "--mesh", name)
        assert down.returncode == 0, down.stderr
        assert leftovers(name, prefix, pids) == []
    finally:
        synchro("down", "--mesh", name)


def test_a_taken_dashboard_port_is_reported_and_up_goes_on(tmp_path: Path) -> None:
    # Also the machine-readable summary: `-o yaml` prints only the data on stdout.
    _skip_unless_netns()
    name = f"synt-{secrets.token_hex(3)}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            proc = start(
                _tiny(tmp_path / "tiny"), name, "--dashboard-port", str(port), "-o", "yaml"
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            state = yaml.safe_load(proc.stdout)
            assert state["phase"] == "ready"
            assert [p["ref"] for p in state["pods"]] == ["tiny/solo"]
            assert state["dashboard"]["url"] == ""
            assert f"127.0.0.1:{port} is already in use" in state["dashboard"]["error"]
            assert "dashboard: not exposed on this host" in proc.stderr
            assert "tiny/solo" in proc.stderr  # the table went to people, on stderr
        finally:
            synchro("down", "--mesh", name)


def test_a_failing_container_is_named(tmp_path: Path) -> None:
    _skip_unless_netns()
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "broken.yaml").write_text(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken, namespace: gamma}
spec:
  template:
    metadata: {labels: {app: broken}}
    spec:
      containers:
        - name: sidekick
          command: [python, -m, http.server, "9000"]
        - name: crasher
          command: [python, -c, "import sys; print('cannot open the database'); sys.exit(3)"]
          readinessProbe: {httpGet: {port: 8081, path: /}}
"""
    )
    name = f"synt-{secrets.token_hex(3)}"
    try:
        proc = start(directory, name)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Pod gamma/broken-0, container crasher failed" in proc.stderr
        assert "exited 3" in proc.stderr and "cannot open the database" in proc.stderr
        logs = synchro("logs", "gamma/broken-0", "-c", "crasher", "--mesh", name)
        assert "cannot open the database" in logs.stdout
    finally:
        synchro("down", "--mesh", name)


def test_up_without_root_says_so(tmp_path: Path) -> None:
    _skip_unless_netns()  # as root, drop to nobody; as non-root this is the plain case
    proc = synchro("up", str(FIXTURES), "--mesh", "synt-noroot", user=65534)
    assert proc.returncode == 1
    assert "needs root" in proc.stderr
    assert not (mesh.RUN_ROOT / "synt-noroot").exists()
