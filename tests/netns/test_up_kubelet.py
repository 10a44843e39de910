"""What the kubelet does for a container, in a `synchro up` mesh (fixtures/kubelet):
volumes at their mountPaths for the container's own program and for `synchro exec`,
a liveness probe acted on (restartPolicy Always restarts, Never leaves it down),
and `synchro explain` agreeing with traffic on a port that declares no protocol.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.test_up import Up, mesh_up, synchro

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kubelet"


@pytest.fixture(scope="module")
def kubelet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    directory = tmp_path_factory.mktemp("kubelet") / "manifests"
    shutil.copytree(FIXTURES, directory)
    with mesh_up(directory) as running:
        yield running


def app(up: Up, ref: str) -> dict[str, Any]:
    return next(c for c in up.pod(ref)["containers"] if c["name"] == "app")


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"not within {timeout}s: {what}")


def test_a_program_reads_its_configmap_at_its_own_path(kubelet: Up) -> None:
    # server.py opens /config/conf/app.yaml by itself: no command line names it.
    body = kubelet.curl("kubelet/once", "http://keeper/")
    assert "greeting: hello from a ConfigMap" in body and "starts 1" in body


def test_exec_sees_the_container_volumes_and_working_directory(kubelet: Up) -> None:
    proc = kubelet.exec(
        "kubelet/keeper", "sh", "-c", "pwd; cat /config/conf/app.yaml; cat /state/starts"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["/code", "greeting: hello from a ConfigMap", "1"]
    marker = f"/state/marker-{kubelet.name}"
    assert kubelet.exec("kubelet/keeper", "touch", marker).returncode == 0
    assert not Path(marker).exists() and not Path("/state").exists()  # not the host's
    # The container's own view has it: the same emptyDir.
    assert kubelet.exec("kubelet/keeper", "test", "-f", marker).returncode == 0
    # A readOnly mount is read-only.
    ro = kubelet.exec("kubelet/keeper", "touch", "/config/x")
    assert ro.returncode != 0 and "Read-only" in ro.stderr


def test_explain_follows_the_proxy_on_a_port_without_a_protocol(kubelet: Up) -> None:
    proc = synchro(
        "explain", "kubelet/once", "keeper", "/routed", "--mesh", kubelet.name, "-o", "json"
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["detection"] == "detected" and answer["route"] == "kubelet/keeper rule 0"
    assert answer["tcp_fallback"]["backends"][0]["service"] == "kubelet/keeper"
    headers = kubelet.exec(
        "kubelet/once", "curl", "-sS", "-D-", "-o/dev/null", "http://keeper/routed"
    )
    assert headers.returncode == 0, headers.stderr
    assert "x-route: keeper-routed" in headers.stdout.lower()


def test_a_failing_liveness_probe_restarts_the_container(kubelet: Up) -> None:
    assert app(kubelet, "kubelet/keeper")["restarts"] == 0
    assert kubelet.exec("kubelet/keeper", "touch", "/state/sick").returncode == 0
    wait_for(
        "keeper's app restarted and ready again",
        lambda: (
            app(kubelet, "kubelet/keeper")["restarts"] >= 1
            and kubelet.pod("kubelet/keeper")["phase"] == "Ready"
        ),
    )
    container = app(kubelet, "kubelet/keeper")
    assert container["running"] and "liveness probe" in container["last_kill_reason"]
    # A new process (it counted its start in the emptyDir, which outlives it).
    assert "starts 2" in kubelet.curl("kubelet/once", "http://keeper/")
    logs = synchro("logs", "kubelet/keeper", "-c", "app", "--mesh", kubelet.name)
    assert "liveness probe" in logs.stdout and "killing the container" in logs.stdout


def test_restart_policy_never_leaves_a_dead_container_down(kubelet: Up) -> None:
    assert kubelet.exec("kubelet/once", "touch", "/state/sick").returncode == 0
    wait_for("once failed", lambda: kubelet.pod("kubelet/once")["phase"] == "Failed")
    container = app(kubelet, "kubelet/once")
    assert container["restarts"] == 0 and not container["running"]
    assert "liveness probe (exec" in container["last_kill_reason"]
