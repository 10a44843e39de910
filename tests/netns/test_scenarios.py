"""Scenarios the mesh was not built around, run as a user would run them.

Each directory under scenarios/ (see its README) is brought up unchanged with
`synchro up` (one mesh per module fixture), and every check goes through
`synchro exec` from inside a Pod: curl, a Python HTTP client and a grpcio
client. What is expected is what Kubernetes, the Gateway API and Istio say,
not what the mesh happens to do. Requests are batched per exec so that the
three meshes stay within a couple of minutes together.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.test_up import Up, mesh_up, synchro

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
CLIENT = str(SCENARIOS / "client.py")
GRPC_CLIENT = str(SCENARIOS / "grpc_client.py")


def scenario(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Up]:
    # A copy, so a test may edit a file while the mesh runs.
    directory = tmp_path_factory.mktemp(name) / name
    shutil.copytree(SCENARIOS / name, directory)
    with mesh_up(directory) as up:
        yield up


def http(up: Up, pod: str, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Run client.py in `pod`; one answer per request (times `repeat`)."""
    proc = up.exec(pod, "python3", CLIENT, json.dumps(list(requests)))
    assert proc.returncode == 0, f"client in {pod}: {proc.stderr}"
    answers: list[dict[str, Any]] = json.loads(proc.stdout)
    return answers


def body(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["status"] == 200, answer
    doc: dict[str, Any] = json.loads(answer["body"])
    return doc


def grpc_calls(up: Up, pod: str, target: str, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    proc = up.exec(pod, "python3", GRPC_CLIENT, target, json.dumps(list(calls)))
    assert proc.returncode == 0, f"grpc client in {pod}: {proc.stderr}"
    answers: list[dict[str, Any]] = json.loads(proc.stdout)
    return answers


def logs(up: Up, pod: str, container: str) -> str:
    proc = synchro("logs", pod, "-c", container, "--mesh", up.name)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def wait_for(what: str, check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout}s (last: {last!r})")


# --- bank: routing, balancing, retries, timeouts ------------------------------------------


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    yield from scenario(tmp_path_factory, "bank")


def test_bank_pods_of_every_kind_run_and_the_job_completes(bank: Up) -> None:
    phases = {p["ref"]: p["phase"] for p in bank.status()["pods"]}
    assert phases == {
        "bank/accounts-v1-0": "Ready",
        "bank/accounts-v1-1": "Ready",
        "bank/accounts-v2-0": "Ready",
        "bank/ledger-0": "Ready",
        "bank/ledger-1": "Ready",
        "ops/auditor": "Ready",
        "ops/teller-0": "Ready",
        "ops/nightly-0": phases["ops/nightly-0"],
    }
    assert all(p["meshed"] for p in bank.status()["pods"])  # `ops` has no Namespace object
    # The Job POSTed a dry-run transfer through its proxy: the route sends those to v2.
    wait_for("the nightly Job completed", lambda: bank.pod("ops/nightly-0")["phase"] == "Completed")
    assert "transfer answered by v2 bank/accounts-v2-0" in logs(bank, "ops/nightly-0", "transfer")


def test_bank_routes_by_header_method_and_query(bank: Up) -> None:
    base = "http://accounts.bank"
    answers = http(
        bank,
        "ops/teller-0",
        {"url": f"{base}/home", "headers": {"x-canary": "true"}, "repeat": 3},
        {"url": f"{base}/api/transfer?dry-run=true", "method": "POST", "body": "{}"},
        {"url": f"{base}/api/transfer", "method": "POST", "body": "{}"},
        {"url": f"{base}/api/transfer?dry-run=true"},
        {"url": f"{base}/api/transfer?dry-run=false", "method": "POST", "body": "{}"},
        # The catch-all rule: v1 at weight 100, v2 at weight 0 gets nothing.
        {"url": f"{base}/home", "repeat": 12},
        {"url": "http://accounts.bank.svc.cluster.local/home"},
        {"url": "http://accounts.bank.svc/home"},
    )
    versions = [body(a)["version"] for a in answers]
    assert versions[:3] == ["v2"] * 3
    assert versions[3:7] == ["v2", "v1", "v1", "v1"]  # POST + Exact path + query, all three
    assert versions[7:] == ["v1"] * 14
    # The app saw the request as the client sent it (no rewrite on these rules).
    assert body(answers[3])["path"] == "/api/transfer?dry-run=true"
    assert body(answers[3])["body"] == "{}"


def test_bank_redirect_rewrite_and_header_modifiers(bank: Up) -> None:
    redirect, rewritten = http(
        bank,
        "ops/teller-0",
        {"url": "http://accounts.bank/legacy/balance?since=2024"},
        {"url": "http://accounts.bank/v1/balance?since=2024", "headers": {"x-debug": "1"}},
    )
    # Answered by the caller's sidecar; the host and query are kept (Gateway API).
    assert redirect["status"] == 301
    assert redirect["headers"]["location"] == "http://accounts.bank/v1/balance?since=2024"
    doc = body(rewritten)
    assert doc["path"] == "/api/balance?since=2024"
    assert doc["headers"]["x-env"] == "prod" and doc["headers"]["x-routed-by"] == "mesh"
    assert "x-debug" not in doc["headers"]
    assert doc["headers"]["host"] == "accounts.bank"
    # curl follows the redirect through the mesh to the rewritten API.
    proc = bank.exec(
        "ops/teller-0", "curl", "-sSL", "--max-time", "5", "http://accounts.bank/legacy/x"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["path"] == "/api/x"


def test_bank_a_50_50_split_reaches_both_versions(bank: Up) -> None:
    answers = http(bank, "ops/teller-0", {"url": "http://accounts.bank/v1/x", "repeat": 60})
    split = Counter(body(a)["version"] for a in answers)
    assert set(split) == {"v1", "v2"}
    assert 15 <= split["v2"] <= 45, split  # 50% of 60, about 4 standard deviations wide


def test_bank_sessions_stick_to_a_replica_by_header(bank: Up) -> None:
    # The TrafficPolicy of accounts-v1 (a backend of the route, not the Service
    # the client called) hashes on x-user: each user always meets one replica.
    users = [f"user-{i}" for i in range(12)]
    requests = [
        {"url": "http://accounts.bank/home", "headers": {"x-user": u}, "repeat": 5} for u in users
    ]
    answers = http(bank, "ops/teller-0", *requests)
    pods = [body(a)["pod"] for a in answers]
    per_user = {u: set(pods[i * 5 : i * 5 + 5]) for i, u in enumerate(users)}
    assert all(len(seen) == 1 for seen in per_user.values()), per_user
    assert set().union(*per_user.values()) == {"bank/accounts-v1-0", "bank/accounts-v1-1"}


def test_bank_second_named_port_with_its_own_route(bank: Up) -> None:
    (admin,) = http(bank, "ops/teller-0", {"url": "http://accounts.bank:9000/admin"})
    doc = body(admin)
    assert doc["port"] == 8001  # Service port 9000 -> targetPort "admin"
    assert doc["version"] in ("v1", "v2")
    assert admin["headers"]["x-admin"] == "yes"


def test_bank_route_timeout_and_the_timeout_annotation(bank: Up) -> None:
    slow_report, quick_report, unmatched = http(
        bank,
        "ops/teller-0",
        {"url": "http://accounts.bank/reports/7?sleep=1"},
        {"url": "http://accounts.bank/reports/7?sleep=0"},
        {"url": "http://accounts.bank/reports/x?sleep=0.5"},  # not the regex: no timeout
    )
    assert slow_report["status"] == 504
    assert quick_report["status"] == 200 and unmatched["status"] == 200
    # The auditor's synchro.dev/timeout: 250ms bounds every call it makes.
    slow, quick = http(
        bank,
        "ops/auditor",
        {"url": "http://accounts-v1.bank/api?sleep=1"},
        {"url": "http://accounts-v1.bank/api"},
    )
    assert slow["status"] == 504 and quick["status"] == 200


def test_bank_retries_and_ejection_hide_a_broken_replica(bank: Up) -> None:
    answers = http(bank, "ops/teller-0", {"url": "http://ledger.bank/balance", "repeat": 30})
    assert [a["status"] for a in answers] == [200] * 30
    assert {body(a)["pod"] for a in answers} == {"bank/ledger-0"}
    assert {body(a)["port"] for a in answers} == {7000}  # port 80 -> targetPort 7000
    # Each replica by its own DNS name (hostname.subdomain), short and long.
    whoami, broken = http(
        bank,
        "ops/teller-0",
        {"url": "http://ledger-1.ledger-hl.bank:7000/whoami"},
        {"url": "http://ledger-1.ledger-hl.bank.svc.cluster.local:7000/balance"},
    )
    assert body(whoami)["pod"] == "bank/ledger-1"
    assert broken["status"] == 503  # a Pod called directly: no Service, no retries
    same_ns = http(bank, "bank/ledger-0", {"url": "http://ledger-0.ledger-hl:7000/whoami"})
    assert body(same_ns[0])["pod"] == "bank/ledger-0"


def test_bank_a_consumer_route_applies_to_its_own_namespace_only(bank: Up) -> None:
    (from_ops,) = http(bank, "ops/teller-0", {"url": "http://ledger.bank/whoami"})
    (from_bank,) = http(bank, "bank/accounts-v2-0", {"url": "http://ledger/whoami"})
    assert body(from_ops)["headers"]["x-caller-team"] == "ops"
    assert "x-caller-team" not in body(from_bank)["headers"]


def test_bank_a_weight_edit_applies_while_running(bank: Up) -> None:
    path = bank.directory / "20-accounts-routes.yaml"
    text = path.read_text()
    old = "- {name: accounts-v1, port: 80, weight: 100}\n        - {name: accounts-v2, port: 80, weight: 0}"
    assert old in text
    path.write_text(
        text.replace(
            old,
            "- {name: accounts-v1, port: 80, weight: 0}\n        - {name: accounts-v2, port: 80, weight: 100}",
        )
    )

    def switched() -> bool:
        answers = http(bank, "ops/teller-0", {"url": "http://accounts.bank/home", "repeat": 5})
        return [body(a)["version"] for a in answers] == ["v2"] * 5

    wait_for("the catch-all rule sends everything to v2", switched)


# --- clinic: mTLS modes, authorization, Pods outside the mesh -----------------------------


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    yield from scenario(tmp_path_factory, "clinic")


def test_clinic_injection_follows_namespace_label_pod_label_and_annotation(clinic: Up) -> None:
    meshed = {p["ref"]: p["meshed"] for p in clinic.status()["pods"]}
    assert meshed == {
        "clinic/doctor-0": True,
        "clinic/nurse-0": True,
        "clinic/monitor-0": True,
        "clinic/lab": False,  # label synchro.dev/inject: disabled
        "clinic/xray": False,  # annotation synchro.dev/inject: disabled
        "lobby/kiosk": False,  # namespace labelled synchro.dev/inject=disabled
        "records/records-0": True,
    }


def test_clinic_strict_mtls_and_authorization(clinic: Up) -> None:
    charts = "http://records.records/charts/42"
    doctor = http(
        clinic,
        "clinic/doctor-0",
        {"url": charts},
        {"url": "http://records.records.svc.cluster.local/charts/42", "method": "POST"},
        {"url": charts, "method": "DELETE"},  # not an allowed method
        {"url": "http://records.records/charts/sealed/7"},  # DENY wins over ALLOW
        {"url": "http://records.records/public/hours"},
    )
    assert [a["status"] for a in doctor] == [200, 200, 403, 403, 200]
    xfcc = json.loads(doctor[0]["body"])["xfcc"]
    assert "URI=spiffe://cluster.local/ns/clinic/sa/doctor" in xfcc
    assert "By=spiffe://cluster.local/ns/records/sa/records" in xfcc
    assert doctor[2]["body"].strip().endswith("RBAC: access denied")
    nurse = http(
        clinic,
        "clinic/nurse-0",
        {"url": charts},
        {"url": "http://records.records/public/hours"},
        {"url": "http://records.records/public/hours", "method": "POST"},
        {"url": "http://records.records/healthz"},
    )
    assert [a["status"] for a in nurse] == [403, 200, 403, 200]
    assert "URI=spiffe://cluster.local/ns/clinic/sa/nurse" in json.loads(nurse[1]["body"])["xfcc"]
    # DENY by host (HTTP/1 sends "Host"); `ports` are the workload's, not the Service's.
    by_host = http(
        clinic,
        "clinic/nurse-0",
        {"url": "http://records.records/public/internal"},
        {"url": "http://records.records.svc.cluster.local/public/internal"},
        {"url": "http://records.records.svc/public/internal"},
    )
    assert [a["status"] for a in by_host] == [200, 403, 403]


def test_clinic_plaintext_callers_meet_strict_and_permissive(clinic: Up) -> None:
    for pod in ("lobby/kiosk", "clinic/lab"):
        strict, permissive = http(
            clinic,
            pod,
            {"url": "http://records.records/public/hours"},
            {"url": "http://doctor.clinic/"},
        )
        assert strict["status"] == 0, f"{pod} reached a STRICT workload in plaintext: {strict}"
        assert permissive["status"] == 200 and permissive["body"] == "doctor desk\n", permissive


def test_clinic_meshed_callers_reach_workloads_that_take_no_mesh_tls(clinic: Up) -> None:
    # Opted out by annotation (port 80 -> 9000) and a sidecar with mTLS DISABLE:
    # meshed callers must speak plaintext to both.
    answers = http(
        clinic,
        "clinic/doctor-0",
        {"url": "http://xray.clinic/"},
        {"url": "http://xray/"},
        {"url": "http://monitor:9100/"},
    )
    assert [a["status"] for a in answers] == [200, 200, 200], answers
    (nurse,) = http(clinic, "clinic/nurse-0", {"url": "http://monitor.clinic.svc:9100/"})
    assert nurse["status"] == 200
    (outside,) = http(clinic, "lobby/kiosk", {"url": "http://monitor.clinic:9100/"})
    assert outside["status"] == 200
    # Opaque TCP to the lab (opted out by label), from in and outside the mesh.
    script = (
        "import socket, sys; s = socket.create_connection((sys.argv[1], 5000), timeout=5); "
        "s.sendall(b'glucose\\n'); print(s.makefile().readline().strip())"
    )
    for pod, host in (("clinic/doctor-0", "lab"), ("lobby/kiosk", "lab.clinic")):
        proc = clinic.exec(pod, "python3", "-c", script, host)
        assert proc.returncode == 0, f"{pod} -> {host}: {proc.stderr}"
        assert proc.stdout.strip() == "lab: GLUCOSE"


def test_clinic_access_log_annotation(clinic: Up) -> None:
    http(clinic, "clinic/doctor-0", {"url": "http://records.records/charts/sealed/9"})

    def denied_logged() -> list[dict[str, Any]]:
        lines = logs(clinic, "clinic/doctor-0", "synchro-proxy").splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in records if r.get("path") == "/charts/sealed/9"]

    (entry,) = wait_for("the doctor's proxy logged the denied call", denied_logged)
    assert entry["status"] == 403 and entry["method"] == "GET"
    assert entry["destination_service"] == "records/records"


# --- rpc: gRPC routes and balancing, workload annotations, TCP, Jobs ----------------------


@pytest.fixture(scope="module")
def rpc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    yield from scenario(tmp_path_factory, "rpc")


def test_rpc_grpc_route_balancing_retries_and_deadline(rpc: Up) -> None:
    answers = grpc_calls(
        rpc,
        "apps/plain-0",
        "echo.rpc:50051",
        {"method": "Say", "text": "hi", "repeat": 12},
        {"method": "Shout", "text": "hey"},
        {"method": "Say", "text": "hi", "metadata": {"x-tier": "gold"}},
        {"method": "Say", "text": "fragile", "repeat": 10},
        {"method": "Say", "text": "slow", "timeout": 0.3},
    )
    # One HTTP/2 channel, balanced per call: round robin over echo-v1's two Pods.
    says = Counter(a["ok"].split()[1] for a in answers[:12])
    assert says == {"echo-v1-0": 6, "echo-v1-1": 6}, says
    assert answers[12]["ok"].startswith("v2 echo-v2-0 - SHOUTED HEY")
    assert answers[13]["ok"] == "v2 echo-v2-0 gold said hi"
    # echo-v1-1 answers UNAVAILABLE to "fragile"; the retry goes to echo-v1-0.
    assert [a.get("ok", a.get("code")) for a in answers[14:24]] == [
        "v1 echo-v1-0 - said fragile"
    ] * 10
    assert answers[24]["code"] == "DEADLINE_EXCEEDED"


def test_rpc_retry_annotations_of_the_calling_workload(rpc: Up) -> None:
    request = {"url": "http://quotes.rpc/", "repeat": 16}
    careful = [a["status"] for a in http(rpc, "apps/careful-0", request)]
    plain = [a["status"] for a in http(rpc, "apps/plain-0", request)]
    # quotes-1 always answers 503: only the workload that asked for retries
    # on 5xx (synchro.dev/retries, retry-on) never sees it.
    assert careful == [200] * 16
    assert 503 in plain


def test_rpc_server_first_tcp_through_the_mesh(rpc: Up) -> None:
    script = (
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
        "f = s.makefile('rwb')\n"
        "out = [f.readline()]\n"
        "f.write(b'HELO synchro\\r\\n'); f.flush(); out.append(f.readline())\n"
        "f.write(b'QUIT\\r\\n'); f.flush(); out.append(f.readline())\n"
        "print('|'.join(x.decode().strip() for x in out))\n"
    )
    expected = "220 mail ready|250 ok HELO synchro|221 bye"
    for pod, host, port in (
        ("apps/plain-0", "mail.rpc", "25"),
        ("apps/plain-0", "mail-0.mail.rpc", "2525"),
        ("apps/debug", "mail.rpc.svc.cluster.local", "25"),  # no sidecar on this side
    ):
        proc = rpc.exec(pod, "timeout", "10", "python3", "-c", script, host, port)
        assert proc.returncode == 0, f"{pod} -> {host}:{port}: {proc.stderr}"
        assert proc.stdout.strip() == expected


def test_rpc_job_workers_complete_through_the_mesh(rpc: Up) -> None:
    for n in (0, 1):
        ref = f"apps/batch-{n}"
        wait_for(f"{ref} completed", lambda ref=ref: rpc.pod(ref)["phase"] == "Completed")
        assert f"said batch-{n}" in logs(rpc, ref, "worker")
    assert not rpc.pod("apps/debug")["meshed"]
    # No sidecar, no route: the node balances over all of the Service's Pods,
    # whose container ports differ (targetPort by name: 50051 on v1, 50052 on v2).
    answers = grpc_calls(
        rpc, "apps/debug", "echo.rpc:50051", {"method": "Say", "text": "x", "repeat": 4}
    )
    assert all(a.get("ok", "").endswith(" - said x") for a in answers), answers


# --- exec probes --------------------------------------------------------------------------


def test_exec_probes_run_in_the_pod_with_the_container_environment(
    node: Any, tmp_path: Path
) -> None:
    from synchro.local.pod import probe_once
    from synchro.local.podplan import PodContext, plan_pod

    flag = tmp_path / "ready"
    net = node.add_pod("p")
    # Ready once the file exists, and only where the Pod's own address is local.
    check = 'test -f "$FLAG" && ip -o addr | grep -q " $ME/"'
    app = {
        "name": "app",
        "command": ["sleep", "1"],
        "env": [{"name": "FLAG", "value": str(flag)}, {"name": "ME", "value": str(net.ip)}],
        "readinessProbe": {"exec": {"command": ["sh", "-c", check]}},
    }
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [app]}}
    ctx = PodContext(name="p", namespace="default", ip=str(net.ip))
    probe = plan_pod(pod, ctx).step("app").readiness_probe
    assert probe is not None and probe.kind == "exec"
    assert not probe_once(node, str(net.ip), probe)
    flag.write_text("")
    assert probe_once(node, str(net.ip), probe)
    assert not probe_once(node, "10.255.255.254", probe)  # no such Pod
