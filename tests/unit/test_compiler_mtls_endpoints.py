"""Which endpoints callers speak mTLS to: meshed Pods whose sidecar takes it."""

from __future__ import annotations

from typing import Any

import yaml

from controlplane import compiler
from controlplane.validation import SourceDoc, build

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: monitor, namespace: clinic}
spec:
  selector: {app: monitor}
  ports:
    - {name: http-metrics, port: 9100, targetPort: 9100}
    - {name: http, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: lab, namespace: clinic}
spec:
  selector: {app: lab}
  ports: [{name: http, port: 80, targetPort: 5000}]
"""


def pod(name: str, ip: str, app: str, *, meshed: bool) -> dict[str, Any]:
    containers = [{"name": "app"}]
    if meshed:
        containers.append({"name": "synchro-proxy"})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "clinic", "labels": {"app": app}},
        "spec": {"containers": containers},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def endpoints(*policies: str) -> dict[tuple[str, int], bool]:
    docs = [*yaml.safe_load_all(MANIFESTS), *(yaml.safe_load(p) for p in policies)]
    docs += [pod("monitor-0", "10.0.0.2", "monitor", meshed=True)]
    docs += [pod("lab", "10.0.0.3", "lab", meshed=False)]
    resources, problems = build([SourceDoc(d) for d in docs])
    assert problems == []
    return {
        (s.name, p.port): e.meshed
        for s in compiler.shared(resources).services
        for p in s.ports
        for e in p.endpoints
    }


def pa(spec: str, namespace: str = "clinic", name: str = "pa") -> str:
    return (
        "apiVersion: synchro.dev/v1alpha1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )


def test_a_pod_without_a_sidecar_is_never_an_mtls_endpoint() -> None:
    assert endpoints() == {("monitor", 9100): True, ("monitor", 80): True, ("lab", 80): False}


def test_a_workload_with_mtls_disabled_is_called_in_plaintext() -> None:
    disabled = pa("{selector: {matchLabels: {app: monitor}}, mtls: {mode: DISABLE}}")
    assert endpoints(disabled)[("monitor", 9100)] is False
    assert endpoints(disabled)[("monitor", 80)] is False


def test_port_level_disable_applies_to_the_container_port_only() -> None:
    port = pa(
        "{selector: {matchLabels: {app: monitor}}, mtls: {mode: STRICT},"
        " portLevelMtls: {9100: {mode: DISABLE}}}"
    )
    got = endpoints(port)
    assert got[("monitor", 9100)] is False and got[("monitor", 80)] is True


def test_namespace_and_mesh_wide_disable_and_a_workload_override() -> None:
    assert endpoints(pa("{mtls: {mode: DISABLE}}"))[("monitor", 80)] is False
    mesh_wide = pa("{mtls: {mode: DISABLE}}", namespace="synchro-system")
    assert endpoints(mesh_wide)[("monitor", 80)] is False
    back_on = pa("{selector: {matchLabels: {app: monitor}}, mtls: {mode: PERMISSIVE}}", name="w")
    assert endpoints(pa("{mtls: {mode: DISABLE}}"), back_on)[("monitor", 80)] is True
