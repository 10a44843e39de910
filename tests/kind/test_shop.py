"""The shop demo (examples/shop) on a kind cluster, judged by the same checks as
`sudo make demo` and tests/netns/test_shop_demo.py (examples/shopstats.py):
the 90/10 canary, retries hiding the flaky ratings replica, payments over gRPC
and its AuthorizationPolicy, mTLS on every edge in the proxies' metrics.

Needs `make kind-up` (cluster, Gateway API CRDs, images synchro:dev and
synchro-examples:dev, deploy/) and SYNCHRO_KIND=1. The shop goes to namespace
`shop` as the README's walkthrough puts it (`make kind-demo` does the same); a
namespace this test created is deleted afterwards, one that was there is left.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from examples import shopstats
from tests.kind.kube import (
    Kubectl,
    KubectlError,
    app_container,
    eventually,
    exec_runner,
    find_kubectl,
    get_json,
    injected,
    port_forward,
    ready_containers,
)

NS = shopstats.NAMESPACE
DEPLOYMENTS = (
    "frontend", "catalog-v1", "catalog-v2", "ratings", "ratings-flaky", "ratings-slow", "payments",
)  # fmt: skip
CONTROLLER_NS = "synchro-system"
# Rollouts on a fresh cluster and load through `kubectl exec` take minutes.
pytestmark = pytest.mark.timeout(900)

Pods = dict[str, dict[str, Any]]  # "shop/<pod>" -> the Pod


def deployment_of(pod: dict[str, Any]) -> str:
    # <deployment>-<replicaset hash>-<pod hash>
    return str(pod["metadata"]["name"]).rsplit("-", 2)[0]


def running_pods(kubectl: Kubectl) -> Pods:
    pods = get_json(kubectl, "-n", NS, "pods")["items"]
    return {
        f"{NS}/{p['metadata']['name']}": p
        for p in pods
        if p.get("status", {}).get("phase") == "Running"
        and not p["metadata"].get("deletionTimestamp")
    }


def first(pods: Pods, deployment: str) -> str:
    return next(ref for ref, p in sorted(pods.items()) if deployment_of(p) == deployment)


@pytest.fixture(scope="module")
def shop(kubectl: Kubectl) -> Iterator[Pods]:
    existed = bool(kubectl("get", "namespace", NS, "--ignore-not-found", "-o", "name").strip())
    kubectl("apply", "-f", str(shopstats.SHOP))
    try:
        for name in DEPLOYMENTS:
            kubectl("-n", NS, "rollout", "status", f"deployment/{name}", "--timeout=240s")
        yield running_pods(kubectl)
    finally:
        if not existed:
            with contextlib.suppress(KubectlError):
                kubectl("delete", "namespace", NS, "--wait=false", "--ignore-not-found")


def test_every_shop_pod_is_injected_and_ready(shop: Pods) -> None:
    assert {deployment_of(p) for p in shop.values()} == set(DEPLOYMENTS)
    for ref, pod in shop.items():
        assert injected(pod), f"{ref} was not injected"
        ready, total = ready_containers(pod)
        assert ready == total == 2, f"{ref}: {ready}/{total} ready"


def test_the_demo_checks_pass_on_the_cluster(shop: Pods) -> None:
    binary, context = find_kubectl()
    assert binary is not None
    run = exec_runner(binary, context, {ref: app_container(p) for ref, p in shop.items()})
    pods = shopstats.Pods(first(shop, "frontend"), first(shop, "catalog-v1"), tuple(sorted(shop)))
    result = shopstats.collect(run, pods, requests=600)
    failed = [c for c in result.checks() if not c.ok]
    assert not failed, "\n".join(f"{c.name}: {c.detail}" for c in failed)


def synchro(*args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "synchro.cli", *args, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_top_and_dashboard_through_port_forward(kubectl: Kubectl, shop: Pods) -> None:
    # What the README's walkthrough does to watch the shop. Each controller
    # replica knows the proxies connected to it: together they know them all.
    binary, context = find_kubectl()
    assert binary is not None
    controllers = get_json(
        kubectl, "-n", CONTROLLER_NS, "pods", "-l", "app.kubernetes.io/name=synchro-controller"
    )["items"]
    frontend = first(shop, "frontend")
    load = subprocess.Popen(
        [binary, "--context", context, "-n", NS, "exec", frontend.split("/")[1],
         "-c", app_container(shop[frontend]), "--",
         "python3", "-m", "examples.load", "--requests", "3000", "--concurrency", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proxies: set[str] = set()
    services: set[str] = set()
    try:
        for pod in controllers:
            target = f"pod/{pod['metadata']['name']}"
            with port_forward(binary, context, CONTROLLER_NS, target, 15012, 15014) as local:
                api = f"https://127.0.0.1:{local[15012]}"
                dashboard = f"http://127.0.0.1:{local[15014]}"
                rows = synchro("status", "--controller", api, "--insecure", "-n", NS)
                proxies |= {r["proxy"] for r in rows}
                with urllib.request.urlopen(dashboard + "/", timeout=10) as resp:
                    assert "<title>Synchro</title>" in resp.read().decode()

                def busy(dashboard: str = dashboard) -> set[str]:
                    top = synchro("top", "--controller", dashboard, "--once", "-n", NS)
                    seen = {f"{s['namespace']}/{s['name']}" for s in top if s.get("requests")}
                    assert seen, "no shop service has traffic in this replica's window yet"
                    return seen

                with contextlib.suppress(AssertionError):
                    services |= eventually(busy, within=30, what="rates in synchro top")
    finally:
        load.kill()
        load.wait()
    assert {f"{ref.split('/')[1]}.{NS}" for ref in shop} <= proxies, proxies
    assert {shopstats.RATINGS, shopstats.PAYMENTS} <= services, services
