"""The shop demo (examples/shop) through `synchro up`, checked against real traffic.

One mesh for the module, on a copy of examples/shop so the hot-reload test can
edit its files. Tests run in file order and share the mesh: the checks of the
90/10 canary come before the test that moves the weights (which puts them back).
Traffic is driven from inside the Pods (`synchro exec`): examples/load.py for
bounded load with a JSON summary, examples/pay.py for one gRPC call, and
watch_split.py for measuring how fast an edit in a file reaches the traffic.
The demo's own checks (examples/shopstats.py, shared with tests/kind) run
through `examples/demo.py --attach`, exactly as `sudo make demo` prints them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from synchro.local import hosts, mesh, netns
from tests.integration.test_dashboard import DomGraph, run_chromium
from tests.netns.test_up import Up, curl_host, mesh_up, synchro
from tests.netns.watch_split import watch

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
CANARY = "25-catalog-canary.yaml"
RELOAD_SECONDS = 2.0
GRPC = ("-X", "POST", "-H", "content-type:application/grpc")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    directory = tmp_path_factory.mktemp("shop") / "shop"
    shutil.copytree(SHOP, directory)
    with mesh_up(directory) as running:
        yield running


def load(shop: Up, requests: int, url: str = "http://127.0.0.1:8080/checkout") -> dict[str, Any]:
    proc = synchro(
        "exec", "shop/frontend-0", "--mesh", shop.name, "--",
        "python3", "-m", "examples.load", "--url", url,
        "--requests", str(requests), "--concurrency", "8",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


def pay(shop: Up, pod: str) -> dict[str, Any]:
    proc = shop.exec(pod, "python3", "-m", "examples.pay")
    assert proc.stdout.strip(), proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def samples(shop: Up, pod: str, metric: str) -> list[tuple[dict[str, str], float]]:
    text = shop.curl(pod, "http://127.0.0.1:15020/metrics")
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == metric
    ]


def explain(shop: Up, source: str, destination: str, *extra: str) -> dict[str, Any]:
    proc = synchro("explain", source, destination, *extra, "--mesh", shop.name, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def set_canary(shop: Up, v1: int, v2: int) -> float:
    path = shop.directory / CANARY
    text = path.read_text()
    head, _, _ = text.partition("  rules:")
    path.write_text(
        head + "  rules:\n    - backendRefs:\n"
        f"        - {{name: catalog-v1, port: 80, weight: {v1}}}\n"
        f"        - {{name: catalog-v2, port: 80, weight: {v2}}}\n"
    )
    return time.time()


# --- (1) the demo's services answer through the mesh ------------------------------------


def test_frontend_checkout_answers_through_the_mesh(shop: Up) -> None:
    pods = {p["ref"]: p for p in shop.status()["pods"]}
    assert all(p["phase"] == "Ready" and p["meshed"] for p in pods.values()), pods
    body = json.loads(shop.curl("shop/frontend-0", "http://127.0.0.1:8080/checkout"))
    assert body["catalog"]["status"] == 200 and body["catalog"]["version"] in ("v1", "v2")
    assert body["ratings"]["status"] == 200
    assert body["payments"]["status"] == "OK"


def test_the_demo_summary_passes_its_checks_on_real_traffic(shop: Up) -> None:
    # What `sudo make demo` prints after `synchro up`: its exit status is the
    # shared checks (canary 90/10, retries hiding the flaky replica, payments
    # over gRPC and its authorization, mTLS on every edge).
    proc = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--attach", "--mesh", shop.name,
         "--requests", "400"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for check in (
        "frontend answers", "canary split 90/10", "retries hide the flaky ratings replica",
        "payments over gRPC", "payments authorization", "mTLS on every edge",
    ):  # fmt: skip
        assert f"\u2714 {check}:" in out, out
    # Per service, with and without the mesh's retries; a denied call.
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  shop/")
    }
    assert {"shop/catalog", "shop/ratings", "shop/payments"} <= set(rows), out
    _, _, with_retries, _, without, _ = rows["shop/ratings"]
    assert float(with_retries.rstrip("%")) >= 99.0, out
    assert float(without.rstrip("%")) < 100.0, "ratings' Pods never failed a try"
    assert "PERMISSION_DENIED: RBAC: access denied" in out
    # Where to look next, with a dashboard URL that answers now.
    assert f"{shop.dashboard}  (answering now)" in out, out
    for step in ("synchro top", "synchro explain shop/frontend-0", "synchro down"):
        assert f"sudo {step}" in out, out


def test_the_dashboard_shows_the_shop_on_the_host(shop: Up) -> None:
    page = curl_host(shop.dashboard)
    assert page.returncode == 0 and "<title>Synchro</title>" in page.stdout, page.stderr
    assert "synchro_controller_" in curl_host(shop.dashboard + "metrics").stdout
    # The dashboard scrapes the proxies while it is being read: wait for its rates.
    deadline = time.monotonic() + 30
    names: set[str] = set()
    while time.monotonic() < deadline:
        load(shop, 50)
        rows = json.loads(curl_host(shop.dashboard + "api/services").stdout)["services"]
        names = {f"{r['namespace']}/{r['name']}" for r in rows if r.get("requests")}
        if {"shop/catalog", "shop/ratings", "shop/payments"} <= names:
            break
        time.sleep(1)
    assert {"shop/catalog", "shop/ratings", "shop/payments"} <= names, names


def test_chromium_draws_the_shops_service_graph_from_the_host(shop: Up, tmp_path: Path) -> None:
    """Headless Chromium opens the dashboard of the running `synchro up` mesh
    through the host relay: a real screenshot, and the SVG the page's script drew
    has the service graph's nodes and edges (from the page's own data)."""
    deadline = time.monotonic() + 30
    graph: dict[str, Any] = {}
    # Edges join workloads: the canary's two versions are nodes of their own.
    wanted = {("shop/frontend", "shop/catalog-v1"), ("shop/frontend", "shop/payments")}
    while time.monotonic() < deadline:
        load(shop, 50)
        pay(shop, "shop/frontend-0")
        graph = json.loads(curl_host(shop.dashboard + "api/graph").stdout)
        if wanted <= {(e["source"], e["destination"]) for e in graph["edges"]}:
            break
        time.sleep(1)
    assert wanted <= {(e["source"], e["destination"]) for e in graph["edges"]}, graph
    screenshot = tmp_path / "dashboard.png"
    run_chromium(shop.dashboard, tmp_path, f"--screenshot={screenshot}")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = DomGraph()
    dom.feed(run_chromium(shop.dashboard, tmp_path, "--dump-dom"))
    assert dom.edges >= wanted, dom.edges
    assert dom.nodes >= {"shop/frontend", "shop/catalog-v1", "shop/payments"}, dom.nodes


def test_payments_proxy_reports_mutual_tls_from_frontend(shop: Up) -> None:
    assert pay(shop, "shop/frontend-0")["status"] == "OK"
    seen = [
        (labels, n)
        for labels, n in samples(shop, "shop/payments-0", "synchro_requests_total")
        if labels["reporter"] == "destination" and labels["grpc_status"] == "0"
    ]
    assert seen, "payments' proxy recorded no successful gRPC request"
    from_frontend = [
        labels
        for labels, _ in seen
        if labels["source_principal"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    ]
    assert from_frontend, f"no request from frontend's identity: {[lb for lb, _ in seen]}"
    assert {lb["connection_security_policy"] for lb in from_frontend} == {"mutual_tls"}


# --- (3) explain agrees with traffic ------------------------------------------------------


def test_explain_canary_weights_match_the_split(shop: Up) -> None:
    answer = explain(shop, "shop/frontend-0", "catalog.shop")
    assert answer["outcome"] == "forwarded"
    assert answer["route"] and answer["route"].startswith("shop/catalog-canary")
    shares = {b["service"]: b["percent"] for b in answer["backends"]}
    assert shares == {"shop/catalog-v1": 90.0, "shop/catalog-v2": 10.0}
    versions = load(shop, 600, "http://127.0.0.1:8080/")["catalog_versions"]
    measured = 100.0 * versions.get("v2", 0) / sum(versions.values())
    assert abs(measured - shares["shop/catalog-v2"]) <= 5.0, versions


def test_explain_denies_catalog_to_payments_as_traffic_does(shop: Up) -> None:
    answer = explain(
        shop, "shop/catalog-v1-0", "payments.shop:50051", "/shop.Payments/Charge", *GRPC
    )
    assert answer["outcome"] == "denied", answer["verdict"]
    assert [b["authorization"]["decision"] for b in answer["backends"]] == ["DENY"]
    assert pay(shop, "shop/catalog-v1-0")["status"] == "PERMISSION_DENIED"
    allowed = explain(
        shop, "shop/frontend-0", "payments.shop:50051", "/shop.Payments/Charge", *GRPC
    )
    assert allowed["outcome"] == "forwarded"
    assert [b["authorization"]["decision"] for b in allowed["backends"]] == ["ALLOW"]
    assert pay(shop, "shop/frontend-0")["status"] == "OK"


def test_explain_retry_policy_and_retries_in_traffic(shop: Up) -> None:
    answer = explain(shop, "shop/frontend-0", "ratings.shop")
    retry = answer["retry"]
    assert retry["source"] == "TrafficPolicy shop/ratings"
    # TrafficPolicy `attempts: 3` are retries: four tries in all.
    assert retry["attempts"] == 4
    assert "5xx" in retry["retry_on"] and retry["per_try_timeout"] == 0.5

    def retried() -> dict[str, float]:
        return {
            labels["reason"]: n
            for labels, n in samples(shop, "shop/frontend-0", "synchro_retries_total")
            if labels["destination_service"] == "shop/ratings"
        }

    summary = load(shop, 200, "http://127.0.0.1:8080/")
    assert summary["ratings_status"].get("200", 0) >= 198, summary
    # Counted since the mesh came up: the TrafficPolicy's outlier detection may
    # have ejected the flaky replica by now, so this last window need not retry.
    grew = retried()
    assert grew, "no ratings retries in frontend's proxy"
    # Every retry reason is one explain listed (the flaky replica answers 500).
    assert all(r.startswith("5") or r in retry["retry_on"] for r in grew), grew


# --- (2) hot reload ---------------------------------------------------------------------


def test_a_canary_weight_edit_shifts_the_split_within_two_seconds(shop: Up) -> None:
    exec_argv = ["synchro", "exec", "shop/frontend-0", "--mesh", shop.name, "--"]
    try:
        w = watch(
            exec_argv, "http://catalog.shop/", lambda: set_canary(shop, 0, 100),
            key="version", want="v2", until="only", stable=30, seconds=15,
        )  # fmt: skip
        assert w.done, f"the split never became 0/100: last answers {w.values()[-40:]}"
        elapsed = w.switched_at() - w.changed_at
        assert elapsed <= RELOAD_SECONDS, f"the new split showed after {elapsed:.2f} s"
        answer = explain(shop, "shop/frontend-0", "catalog.shop")
        assert {b["service"]: b["percent"] for b in answer["backends"]} == {
            "shop/catalog-v1": 0.0,
            "shop/catalog-v2": 100.0,
        }
    finally:
        w = watch(
            exec_argv, "http://catalog.shop/", lambda: set_canary(shop, 90, 10),
            key="version", want="v1", until="only", stable=10, seconds=15,
        )  # fmt: skip
        assert w.done, "the 90/10 split did not come back"


# --- (4) down leaves nothing ----------------------------------------------------------------


def _pids_in(namespaces: list[str]) -> list[tuple[int, int | None]]:
    out: list[tuple[int, int | None]] = []
    for ns in namespaces:
        proc = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
        )
        for word in proc.stdout.split():
            pid = int(word)
            out.append((pid, mesh.proc_start_time(pid)))
    return out


def _mentions(name: str) -> list[int]:
    """Processes whose command line names the mesh's state directory or the mesh."""
    marks = (f"/run/synchro/{name}/", f"--name\0{name}\0")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in marks):
            found.append(int(entry.name))
    return found


def test_down_leaves_no_namespace_directory_or_process(shop: Up) -> None:
    info = mesh.read_info(shop.paths)
    prefix = info["prefix"]
    namespaces = [n for n in netns.list_netns() if n.startswith(prefix + "-")]
    assert len(namespaces) >= 9  # node + 8 Pods
    pids = _pids_in(namespaces)
    pids.append((info["supervisor"]["pid"], info["supervisor"]["start"]))
    pids.append((info["controller"]["pid"], info["controller"]["start"]))
    assert _mentions(shop.name)  # the check sees a running mesh
    proc = synchro("down", "--mesh", shop.name)
    assert proc.returncode == 0, proc.stderr
    ip = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert prefix not in ip.stdout
    assert hosts.existing(prefix) == []
    assert not list(Path("/etc/netns").glob(f"{prefix}*"))
    assert not (mesh.RUN_ROOT / shop.name).exists()
    assert [pid for pid, start_time in pids if mesh.pid_alive(pid, start_time)] == []
    assert _mentions(shop.name) == []
