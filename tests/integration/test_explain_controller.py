"""`synchro explain` end to end: the real `synchro` CLI asks a real
`synchro-controller` (HTTPS on loopback) for the live configs through
`GET /v1/config/{namespace}/{pod}`, and answers the canary, denied and
retried cases the same way as the core does on configs compiled in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.controller_harness import ControllerProcess, run_controller
from tests.unit.test_explain import PODS, SHOP


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    root = tmp_path_factory.mktemp("explain")
    config = root / "config"
    config.mkdir()
    (config / "shop.yaml").write_text(SHOP)
    with run_controller(config, root) as ctl:
        # As the local runtime reports its Pods.
        for pod in PODS:
            ctl.request("PUT", f"/v1/pods/shop/{pod['metadata']['name']}", pod)
        deadline = time.monotonic() + 20
        while True:
            got = ctl.get("/v1/config/shop/frontend-0")
            services = {s["name"]: s for s in got["config"]["services"]}
            payments = services.get("payments", {}).get("ports", [{}])[0].get("endpoints")
            if got["known"] and payments:
                break
            assert time.monotonic() < deadline, "the controller never saw the Pods"
            time.sleep(0.05)
        yield ctl


def explain(ctl: ControllerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHRO_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "synchro.cli",
            "explain",
            "--controller",
            ctl.url,
            "--cacert",
            str(ctl.cert),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )


def explain_json(ctl: ControllerProcess, *args: str) -> dict[str, Any]:
    done = explain(ctl, *args, "-o", "json")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_config_endpoint_is_read_only(controller: ControllerProcess) -> None:
    got = controller.get("/v1/config/shop/payments-0")
    assert got["pod"] == "shop/payments-0" and got["known"] is True
    assert got["config"]["workload"]["service_account"] == "payments"
    unknown = controller.get("/v1/config/shop/nobody")
    assert unknown["known"] is False
    # Reading configs registers no proxy (unlike the long poll).
    assert controller.get("/v1/proxies")["proxies"] == []


def test_canary(controller: ControllerProcess) -> None:
    e = explain_json(controller, "shop/frontend-0", "catalog", "/api/items")
    assert e["route"] == "shop/catalog rule 1"
    assert [(b["service"], b["percent"]) for b in e["backends"]] == [
        ("shop/catalog-v1", 90.0),
        ("shop/catalog-v2", 10.0),
    ]


def test_denied(controller: ControllerProcess) -> None:
    e = explain_json(
        controller, "shop/ratings-0", "payments:50051", "/shop.Payments/Charge", "-X", "POST"
    )
    assert e["outcome"] == "denied" and e["status"] == 403
    (b,) = e["backends"]
    assert b["authorization"]["decision"] == "DENY"
    assert b["mtls"]["mode"] == "STRICT"
    allowed = explain_json(
        controller, "shop/frontend-0", "payments:50051", "/shop.Payments/Charge", "-X", "POST"
    )
    assert allowed["outcome"] == "forwarded"


def test_retried_table(controller: ControllerProcess) -> None:
    done = explain(controller, "shop/frontend-0", "ratings.shop")
    assert done.returncode == 0, done.stderr
    assert "4 attempts on 5xx" in done.stdout
    assert "TrafficPolicy shop/ratings" in done.stdout
    assert "Verdict:" in done.stdout


def test_unknown_pod_and_bad_port(controller: ControllerProcess) -> None:
    done = explain(controller, "shop/nobody", "catalog")
    assert done.returncode == 1
    assert "knows no Pod shop/nobody" in done.stderr
    done = explain(controller, "shop/frontend-0", "catalog:81")
    assert done.returncode == 1
    assert "has no port 81" in done.stderr
