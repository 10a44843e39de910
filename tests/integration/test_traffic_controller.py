"""Traffic rules from Kubernetes-shaped resources, end to end on loopback: a real
`synchro-controller` (`--config-dir` of Service, HTTPRoute and TrafficPolicy
YAML, Pods reported through its API) pushes config to a real `synchro-proxy`
subscribed with `SYNCHRO_CONTROLLER`; requests are routed and retried by it."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.controller_harness import run_controller
from tests.integration.proxy_harness import free_port, run_proxy
from tests.integration.traffic_harness import Behaviour, Client, Upstream, load

pytestmark = pytest.mark.timeout(90)


def resources(vip: int, v1_port: int, v2_port: int) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: 127.0.0.1
  selector: {{app: web}}
  ports: [{{name: http, port: {vip}, targetPort: {v1_port}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-v1, namespace: shop}}
spec:
  clusterIP: 10.96.0.11
  selector: {{app: web, version: v1}}
  ports: [{{name: http, port: 80, targetPort: {v1_port}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-v2, namespace: shop}}
spec:
  clusterIP: 10.96.0.12
  selector: {{app: web, version: v2}}
  ports: [{{name: http, port: 80, targetPort: {v2_port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: {vip}}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: "yes"}}]}}]
    backendRefs: [{{name: web-v2, port: 80}}]
  - backendRefs: [{{name: web-v1, port: 80}}]
---
apiVersion: synchro.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: web-retries, namespace: shop}}
spec:
  targetRef: {{group: "", kind: Service, name: web}}
  retry: {{attempts: 4, retryOn: [5xx], budget: {{percent: 100}}}}
---
# These tests are about traffic, not identity: no certificate needed to be ready.
apiVersion: synchro.dev/v1alpha1
kind: PeerAuthentication
metadata: {{name: plaintext, namespace: shop}}
spec: {{mtls: {{mode: DISABLE}}}}
"""


def pod(ip: str, version: str) -> dict[str, object]:
    return {
        "ip": ip,
        "labels": {"app": "web", "version": version},
        "serviceAccount": "web",
        "ready": True,
    }


def test_routes_and_policies_from_the_controller_steer_real_requests(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    with (
        Upstream("v1", Behaviour(fail_ratio=0.3, fail_status=503, seed=3), host="127.0.0.2") as v1,
        Upstream("v2", host="127.0.0.3") as v2,
    ):
        vip = free_port()
        (config_dir / "shop.yaml").write_text(resources(vip, v1.port, v2.port))
        with run_controller(config_dir, tmp_path) as ctl:
            ctl.request("PUT", "/v1/pods/shop/web-v1-1", pod("127.0.0.2", "v1"))
            ctl.request("PUT", "/v1/pods/shop/web-v2-1", pod("127.0.0.3", "v2"))
            env = {
                "SYNCHRO_CONTROLLER": ctl.url,
                "SYNCHRO_CONTROLLER_CA": str(ctl.cert),
                "POD_NAMESPACE": "shop",
                "POD_NAME": "client-1",
            }
            with run_proxy(static_destination=f"127.0.0.1:{vip}", env=env) as proxy:
                # Ready means configured: the first request is already routed.
                dump = proxy.admin_json("/config_dump")
                assert dump["version"] and dump["source"]["connected"] in (True, False)
                deadline = time.monotonic() + 10
                while True:
                    with Client(proxy.outbound) as c:
                        status, hdrs, _ = c.get("/", {"x-canary": "yes"})
                    if hdrs.get("x-upstream") == "v2" or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)  # the Pods' endpoints may land in a later push
                assert (status, hdrs.get("x-upstream")) == (200, "v2")
                results = load(proxy.outbound, 300, concurrency=4)
                dump = proxy.admin_json("/config_dump")
    names = Counter(name for _, name in results)
    assert names["v1"] == len(results)  # the default rule
    ok = sum(1 for s, _ in results if s == 200) / len(results)
    assert ok >= 0.98, Counter(s for s, _ in results)  # 30% failures, retried
    assert v1.hits > len(results) * 1.2
    assert {s["name"] for s in dump["config"]["services"]} >= {"web", "web-v1", "web-v2"}
