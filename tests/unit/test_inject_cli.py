"""`synchro inject` / `synchro uninject` on YAML streams of every workload kind."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from synchro.cli import main

ROOT = Path(__file__).resolve().parents[2]

POD_SPEC = {
    "containers": [
        {
            "name": "app",
            "image": "nginx",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
        }
    ]
}
TEMPLATE = {"metadata": {"labels": {"app": "x"}}, "spec": POD_SPEC}
SELECTOR = {"matchLabels": {"app": "x"}}


def workloads() -> list[dict[str, Any]]:
    def meta(name: str) -> dict[str, Any]:
        return {"name": name, "namespace": "apps"}

    t = copy.deepcopy(TEMPLATE)
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta("pod"), "spec": copy.deepcopy(POD_SPEC)},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("deploy"),
         "spec": {"selector": SELECTOR, "template": t}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("sts"),
         "spec": {"selector": SELECTOR, "serviceName": "sts", "template": copy.deepcopy(t)}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta("ds"),
         "spec": {"selector": SELECTOR, "template": copy.deepcopy(t)}},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta("rs"),
         "spec": {"selector": SELECTOR, "template": copy.deepcopy(t)}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta("job"),
         "spec": {"template": {"spec": {**copy.deepcopy(POD_SPEC), "restartPolicy": "Never"}}}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta("cron"),
         "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": {
             "spec": {**copy.deepcopy(POD_SPEC), "restartPolicy": "OnFailure"}}}}}},
    ]  # fmt: skip


OTHERS = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"},
     "spec": {"ports": [{"port": 80}], "selector": {"app": "x"}}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "b"}},
]  # fmt: skip


def stream(docs: list[Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def run(
    argv: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    kind = doc["kind"]
    if kind == "Pod":
        return [doc["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "List":
        return [s for item in doc["items"] for s in pod_specs(item)]
    if "template" in doc.get("spec", {}):
        return [doc["spec"]["template"]["spec"]]
    return []


def names(spec: dict[str, Any]) -> list[str]:
    return [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]


def test_inject_every_workload_kind(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    docs = workloads() + OTHERS
    code, out, err = run(["inject", "-f", "-"], stream(docs), monkeypatch, capsys)
    assert code == 0
    result = list(yaml.safe_load_all(out))
    assert len(result) == len(docs)
    for before, after in zip(docs, result, strict=True):
        kubernetes_validate.validate(after, "1.30", strict=True)
        if before["kind"] in ("Service", "ConfigMap"):
            assert after == before
            continue
        for spec in pod_specs(after):
            assert names(spec)[:2] == ["synchro-init", "synchro-proxy"]
            assert spec["containers"][0]["readinessProbe"]["httpGet"]["port"] == 15020
    assert err.count("injected") == len(workloads())


def test_inject_is_idempotent_and_uninject_restores(
    monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    docs = workloads() + OTHERS
    _, once, _ = run(["inject", "-f", "-"], stream(docs), monkeypatch, capsys)
    _, twice, err = run(["inject", "-f", "-"], once, monkeypatch, capsys)
    assert twice == once
    assert "already injected" in err
    code, back, _ = run(["uninject", "-f", "-"], once, monkeypatch, capsys)
    assert code == 0
    assert list(yaml.safe_load_all(back)) == docs


def test_list_items_are_walked(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": workloads()[:2] + OTHERS[:1]}
    code, out, _ = run(["inject", "-f", "-"], stream([doc]), monkeypatch, capsys)
    assert code == 0
    (result,) = list(yaml.safe_load_all(out))
    specs = pod_specs(result)
    assert len(specs) == 2
    assert all("synchro-proxy" in names(s) for s in specs)
    assert result["items"][2] == OTHERS[0]


def test_classic_sidecar_through_mesh_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text("nativeSidecar: false\nproxyImage: reg.example/synchro:2\n")
    argv = ["inject", "-f", "-", "--mesh-config", str(config)]
    code, out, _ = run(argv, stream(workloads()[:1]), monkeypatch, capsys)
    assert code == 0
    (pod,) = list(yaml.safe_load_all(out))
    assert pod["spec"]["containers"][0]["name"] == "synchro-proxy"
    assert pod["spec"]["containers"][0]["image"] == "reg.example/synchro:2"


def test_system_namespaces_pass_through(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    doc = workloads()[1]
    doc["metadata"]["namespace"] = "kube-system"
    code, out, err = run(["inject", "-f", "-"], stream([doc]), monkeypatch, capsys)
    assert code == 0
    assert list(yaml.safe_load_all(out)) == [doc]
    assert "skipped" in err and "kube-system" in err


def test_errors_name_the_document_and_field(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    docs = workloads()[:3]
    docs[2]["spec"]["template"]["metadata"]["annotations"] = {
        "synchro.dev/exclude-outbound-ports": "80,abc"
    }
    code, out, err = run(["inject", "-f", "-"], stream(docs), monkeypatch, capsys)
    assert code == 1
    assert out == ""  # nothing half-written
    assert "document 3 (StatefulSet sts)" in err
    assert "synchro.dev/exclude-outbound-ports" in err and "'80,abc'" in err

    docs = workloads()[1:2]
    docs[0]["spec"]["template"]["spec"]["containers"] = "app"
    code, _, err = run(["inject", "-f", "-"], stream(docs), monkeypatch, capsys)
    assert code == 1
    assert "document 1 (Deployment deploy): spec.template.spec.containers" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [("a: [\n", "not valid YAML"), ("kind: Deployment\nspec: 3\n", "spec.template: missing")],
)
def test_unreadable_input(
    text: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    code, _, err = run(["inject", "-f", "-"], text, monkeypatch, capsys)
    assert code == 1
    assert message in err


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    code, _, err = run(["inject", "-f", str(tmp_path / "nope.yaml")], "", monkeypatch, capsys)
    assert code == 1
    assert "nope.yaml" in err


def test_console_script_on_the_example_shop(tmp_path: Path) -> None:
    """The installed `synchro` entry point, reading files, as a user runs it."""
    shop = ROOT / "examples" / "shop"
    if not shop.is_dir():
        pytest.skip("examples/shop not present")
    source = tmp_path / "shop.yaml"
    source.write_text("\n---\n".join(p.read_text() for p in sorted(shop.glob("*.yaml"))))
    command = [sys.executable, "-c", "import sys; from synchro.cli import main; sys.exit(main())"]
    injected = subprocess.run(
        [*command, "inject", "-f", str(source)], capture_output=True, text=True, check=True
    )
    deployments = [
        d for d in yaml.safe_load_all(injected.stdout) if d and d.get("kind") == "Deployment"
    ]
    assert deployments
    for d in deployments:
        kubernetes_validate.validate(d, "1.30", strict=True)
        assert "synchro-proxy" in names(d["spec"]["template"]["spec"])
    back = subprocess.run(
        [*command, "uninject", "-f", "-"],
        input=injected.stdout,
        capture_output=True,
        text=True,
        check=True,
    )
    original = [d for d in yaml.safe_load_all(source.read_text()) if d]
    assert list(yaml.safe_load_all(back.stdout)) == original
