"""Issue 4 in network namespaces: Services by ClusterIP, and edits in the files
reaching the traffic, through `synchro up` (module-scoped mesh).

Namespace `cp` is meshed: Deployment `web` (1 replica, label app=web) and
Deployment `other` (app=other), both examples/apps/catalog answering
`{"pod": ...}`; Service `web` selects app=web; Pod `client` calls the Service
by its ClusterIP from inside its namespace (through its proxy).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.test_up import Up, mesh_up
from tests.netns.watch_split import watch

RELOAD_SECONDS = 2.0

APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: cp}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
        - name: app
          command: [python3, -m, examples.apps.catalog]
          env: [{{name: PORT, value: "8080"}}]
          ports: [{{name: http, containerPort: 8080}}]
          readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 1}}
"""
MANIFESTS = {
    "00-namespace.yaml": "apiVersion: v1\nkind: Namespace\n"
    "metadata: {name: cp, labels: {synchro.dev/inject: enabled}}\n",
    "10-web.yaml": APP.format(name="web"),
    "20-other.yaml": APP.format(name="other"),
    "30-service.yaml": """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: cp}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
""",
    "40-client.yaml": """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: cp}
spec:
  containers:
    - name: client
      command: [python3, -m, http.server, "9000"]
      readinessProbe: {tcpSocket: {port: 9000}}
""",
}


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    directory = tmp_path_factory.mktemp("controlplane") / "manifests"
    directory.mkdir()
    for name, text in MANIFESTS.items():
        (directory / name).write_text(text)
    with mesh_up(directory) as running:
        yield running


def cluster_ip(up: Up) -> str:
    proc = up.exec("cp/client", "getent", "hosts", "web.cp.svc.cluster.local")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


def client(up: Up) -> list[str]:
    return ["synchro", "exec", "cp/client", "--mesh", up.name, "--"]


def ready_pods(up: Up, prefix: str) -> set[str]:
    return {
        p["ref"].split("/")[1]
        for p in up.status()["pods"]
        if p["ref"].startswith(f"cp/{prefix}-") and p["phase"] == "Ready"
    }


def edit(path: Path, old: str, new: str) -> float:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return time.time()


def test_a_client_reaches_the_endpoints_by_cluster_ip(cp: Up) -> None:
    ip = cluster_ip(cp)
    pod_ips = {p["ip"] for p in cp.status()["pods"]}
    assert ip not in pod_ips  # a virtual address, not a Pod's
    w = watch(client(cp), f"http://{ip}/", time.time, key="pod", want="web-0", stable=10)
    assert w.done and set(w.values()) == {"web-0"}, w.values()


def test_scaling_a_deployment_in_the_file_moves_traffic_within_two_seconds(cp: Up) -> None:
    ip = cluster_ip(cp)
    path = cp.directory / "10-web.yaml"

    def scale() -> float:
        edit(path, "replicas: 1", "replicas: 3")
        deadline = time.monotonic() + 30
        while ready_pods(cp, "web") != {"web-0", "web-1", "web-2"}:
            assert time.monotonic() < deadline, cp.status()["pods"]
            time.sleep(0.05)
        return time.time()  # measured from the moment the new Pods are ready

    w = watch(
        client(cp), f"http://{ip}/", scale,
        key="pod", want="web-0,web-1,web-2", until="all-seen", seconds=20,
    )  # fmt: skip
    assert w.done, f"not every replica answered: {sorted(set(w.values()))}"
    elapsed = max(w.first_seen(p) for p in ("web-1", "web-2")) - w.changed_at
    assert elapsed <= RELOAD_SECONDS, f"the new replicas got traffic {elapsed:.2f} s after ready"
    assert all(v.startswith("web-") for v in w.values()), set(w.values())


def test_changing_a_service_selector_moves_traffic_within_two_seconds(cp: Up) -> None:
    ip = cluster_ip(cp)
    assert ready_pods(cp, "other") == {"other-0"}
    w = watch(
        client(cp), f"http://{ip}/",
        lambda: edit(cp.directory / "30-service.yaml", "selector: {app: web}",
                     "selector: {app: other}"),
        key="pod", want="other-0", until="only", stable=20, seconds=15,
    )  # fmt: skip
    assert w.done, f"traffic did not move to other-0: {w.values()[-30:]}"
    elapsed = w.switched_at() - w.changed_at
    assert elapsed <= RELOAD_SECONDS, f"the selector change took {elapsed:.2f} s"
    assert cluster_ip(cp) == ip  # same Service, same address
