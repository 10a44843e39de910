"""A Pod reported by the local runtime replaces the same Pod read from a file."""

from __future__ import annotations

from controlplane import compiler
from controlplane.server import Controller
from controlplane.validation import SourceDoc

SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "lab", "namespace": "clinic"},
    "spec": {"selector": {"app": "lab"}, "ports": [{"port": 80, "targetPort": 5000}]},
}
# As a user writes it in the directory: no status, no IP.
BARE_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "lab", "namespace": "clinic", "labels": {"app": "lab"}},
    "spec": {"containers": [{"name": "analyser", "command": ["python3"]}]},
}


def test_a_reported_bare_pod_becomes_an_endpoint_without_a_duplicate_problem() -> None:
    controller = Controller()
    controller.publish(
        "files", [SourceDoc(SERVICE, "dir/lab.yaml", 0), SourceDoc(BARE_POD, "dir/lab.yaml", 1)], []
    )
    controller.put_pod(
        "clinic",
        "lab",
        {
            **BARE_POD,
            "status": {"podIP": "10.213.0.9", "conditions": [{"type": "Ready", "status": "True"}]},
        },
    )
    snapshot = controller.rebuild_now()
    assert snapshot.problems == ()
    (svc,) = compiler.shared(snapshot.resources).services
    (endpoint,) = svc.ports[0].endpoints
    assert (endpoint.ip, endpoint.port, endpoint.ready) == ("10.213.0.9", 5000, True)
    # Gone from the runtime: the file's Pod (no IP, no endpoint) is back.
    assert controller.delete_pod("clinic", "lab")
    again = controller.rebuild_now()
    assert compiler.shared(again.resources).services[0].ports[0].endpoints == ()
    assert again.resources.pod("clinic", "lab") is not None
