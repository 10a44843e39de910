"""Synchro on a real cluster, driven with kubectl the way a user would.

Needs `make kind-up` (cluster, image, deploy/ applied) and SYNCHRO_KIND=1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kind.kube import (
    INJECT,
    Kubectl,
    KubectlError,
    eventually,
    get_json,
    injected,
    ready_containers,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def curl_echo(kubectl: Kubectl, namespace: str) -> dict[str, str]:
    out = kubectl(
        "-n", namespace, "exec", "deploy/client", "-c", "client", "--",
        "curl", "-sS", "--fail", "--max-time", "5", f"http://echo.{namespace}.svc.cluster.local/",
        timeout=30,
    )  # fmt: skip
    return json.loads(out)


def test_meshed_deployment_runs_2_of_2_and_serves_through_the_mesh(
    kubectl: Kubectl, meshed_namespace: str
) -> None:
    ns = meshed_namespace
    kubectl("-n", ns, "apply", "-f", str(HERE / "manifests.yaml"))
    for name in ("echo", "client"):
        kubectl("-n", ns, "rollout", "status", f"deployment/{name}", "--timeout=180s")

    for app in ("echo", "client"):
        (pod,) = get_json(kubectl, "-n", ns, "pods", "-l", f"app={app}")["items"]
        assert injected(pod), f"{app} was not injected"
        assert ready_containers(pod) == (2, 2), f"{app}: {ready_containers(pod)}"

    headers = eventually(lambda: curl_echo(kubectl, ns), within=60, what="echo answering")
    assert headers["host"].startswith("echo.")


def test_meshed_pods_talk_mutual_tls(kubectl: Kubectl, meshed_namespace: str) -> None:
    ns = meshed_namespace
    kubectl("-n", ns, "apply", "-f", str(HERE / "manifests.yaml"))
    for name in ("echo", "client"):
        kubectl("-n", ns, "rollout", "status", f"deployment/{name}", "--timeout=180s")

    def client_identity_reaches_the_server() -> None:
        xfcc = curl_echo(kubectl, ns).get("x-forwarded-client-cert", "")
        assert f"spiffe://cluster.local/ns/{ns}/sa/client" in xfcc, xfcc

    eventually(client_identity_reaches_the_server, within=60, what="mTLS between sidecars")


def dry_run_pod(kubectl: Kubectl, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    # Server-side dry run goes through admission (our webhooks have no side effects).
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "probe-", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "synchro:dev"}]},
    }
    out = kubectl(
        "-n", namespace, "create", "--dry-run=server", "-o", "json", "-f", "-",
        stdin=json.dumps(pod),
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    return result


def test_injection_follows_namespace_and_pod_labels(
    kubectl: Kubectl, meshed_namespace: str, plain_namespace: str
) -> None:
    assert injected(dry_run_pod(kubectl, meshed_namespace, {}))
    assert not injected(dry_run_pod(kubectl, meshed_namespace, {INJECT: "disabled"}))
    assert injected(dry_run_pod(kubectl, plain_namespace, {INJECT: "enabled"}))
    assert not injected(dry_run_pod(kubectl, plain_namespace, {}))


def test_controller_runs_two_uninjected_replicas(kubectl: Kubectl) -> None:
    pods = get_json(
        kubectl, "-n", "synchro-system", "pods", "-l", "app.kubernetes.io/name=synchro-controller"
    )["items"]
    assert len(pods) == 2
    for pod in pods:
        assert not injected(pod)
        ready, total = ready_containers(pod)
        assert ready == total == 1
    mwc = get_json(kubectl, "mutatingwebhookconfiguration", "synchro-injector")
    # The controller wrote its serving certificate's CA into its own webhook config.
    assert all(h["clientConfig"].get("caBundle") for h in mwc["webhooks"])


def test_policies_are_accepted_by_the_api_server(kubectl: Kubectl, plain_namespace: str) -> None:
    docs = [
        d for p in sorted((REPO / "deploy" / "examples-crs").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text()) if d
    ]  # fmt: skip
    for doc in docs:
        doc["metadata"].pop("namespace", None)
    stream = yaml.safe_dump_all(docs)
    kubectl("-n", plain_namespace, "apply", "--dry-run=server", "-f", "-", stdin=stream)

    # A misspelt field is an error, not silently pruned (kubectl's strict field validation).
    bad = dict(docs[0], spec={**docs[0]["spec"], "retries": {"attempts": 3}})
    with pytest.raises(KubectlError, match="retries"):
        kubectl(
            "-n", plain_namespace, "apply", "--dry-run=server", "--validate=strict", "-f", "-",
            stdin=yaml.safe_dump(bad),
        )  # fmt: skip
