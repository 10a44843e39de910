"""`synchro install` / `synchro uninstall`: deploy/ rendered with --set applied, every
object valid offline for Kubernetes (kubernetes-validate, strict), the settings read
back by the real readers (injector, control plane, controller flags), bad input
refused with a message that names the key, and deploy/ shipped inside a built wheel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from synchro import cli, manifests
from synchro.commands import install, uninstall

REPO = Path(__file__).resolve().parents[2]
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())

Obj = dict[str, Any]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def objects(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def key(o: Obj) -> tuple[str, str, str]:
    return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])


def validate_all(objs: list[Obj]) -> None:
    for version in K8S_VERSIONS:
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{key(obj)} invalid for Kubernetes {version} at {path}: {e.message}")


def deploy_files() -> list[Obj]:
    """deploy/ read directly, independently of synchro.manifests."""
    kust = yaml.safe_load((REPO / "deploy/kustomization.yaml").read_text())
    out: list[Obj] = []
    for entry in kust["resources"]:
        out.extend(d for d in yaml.safe_load_all((REPO / "deploy" / entry).read_text()) if d)
    return out


# --- rendering ---------------------------------------------------------------------


def test_default_render_is_deploy_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "install")
    assert code == 0, err
    assert objects(out) == deploy_files()
    assert out.startswith("---\n")


def test_manifests_come_from_the_package_link() -> None:
    d = manifests.deploy_dir()
    assert Path(str(d)).resolve() == (REPO / "deploy").resolve()
    assert manifests.render() == deploy_files()


def test_rendered_objects_validate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "install",
        "--set",
        "image=registry.example/synchro:0.1.0",
        "--set",
        "replicas=3",
        "--set",
        "controllerCPULimit=",
        "--set",
        "proxyMemoryLimit=1Gi",
        "--set",
        "failurePolicy=Ignore",
        "--set",
        "logLevel=debug",
    )
    assert code == 0, err
    validate_all(objects(out))


def test_json_output_is_a_list_kubectl_reads(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "install", "-o", "json", "--set", "replicas=1")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["kind"] == "List" and doc["apiVersion"] == "v1"
    assert [key(o) for o in doc["items"]] == [key(o) for o in deploy_files()]
    validate_all(doc["items"])


def test_validation_can_fail() -> None:
    objs = install.render({"replicas": "3"})
    broken = one(objs, "Deployment")
    broken["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


# --- settings reach their readers ----------------------------------------------------


def test_image_and_replicas() -> None:
    objs = install.render(install.parse_sets(["image=registry.example/synchro:1.2", "replicas=3"]))
    deployment = one(objs, "Deployment", "synchro-controller")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/synchro:1.2"
    assert deployment["spec"]["replicas"] == 3
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    cm = one(objs, "ConfigMap", "synchro-config")
    assert cm["data"]["proxyImage"] == "registry.example/synchro:1.2"
    # A single replica must not block node drains forever.
    single = install.render(install.parse_sets(["replicas=1"]))
    assert one(single, "PodDisruptionBudget")["spec"]["minAvailable"] == 0


def test_proxy_image_after_image_wins_whatever_the_order() -> None:
    objs = install.render(install.parse_sets(["proxyImage=p:1", "image=c:1"]))
    assert one(objs, "ConfigMap")["data"]["proxyImage"] == "p:1"
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "c:1"


def test_mesh_settings_reach_the_control_plane() -> None:
    from controlplane import resources

    objs = install.render(
        install.parse_sets(
            ["defaultMtlsMode=STRICT", "outboundPolicy=REGISTRY_ONLY", "trustDomain=example.org"]
        )
    )
    parsed = resources.parse(one(objs, "ConfigMap", "synchro-config"))
    assert isinstance(parsed, resources.MeshConfig)
    s = parsed.settings
    assert (s.default_mtls_mode, s.outbound_policy, s.trust_domain) == (
        "STRICT",
        "REGISTRY_ONLY",
        "example.org",
    )


def test_injector_settings_reach_the_injector(tmp_path: Path) -> None:
    from webhook.config import load

    objs = install.render(
        install.parse_sets(
            [
                "proxyCPURequest=250m",
                "proxyMemoryLimit=",
                "nativeSidecar=False",
                "accessLog=text",
                "traceSampling=0.5",
                "drainSeconds=12",
                "tracingEndpoint=http://otel.observability.svc:4318/v1/traces",
            ]
        )
    )
    data = one(objs, "ConfigMap", "synchro-config")["data"]
    assert data["tracingEndpoint"] == "http://otel.observability.svc:4318/v1/traces"
    for k, v in data.items():  # as the Deployment mounts it: one file per key
        (tmp_path / k).write_text(v)
    config = load(tmp_path)
    assert config.cpu_request == "250m"
    assert config.memory_limit is None
    assert config.native_sidecar is False
    assert config.access_log == "text"
    assert config.trace_sampling == 0.5
    assert config.drain_seconds == 12


def test_controller_flags_still_parse() -> None:
    from controlplane import main

    objs = install.render(install.parse_sets(["logLevel=debug"]))
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    args = main.build_parser().parse_args(container["args"])
    assert args.log_level == "debug"
    assert args.kubernetes


def test_failure_policy_and_controller_resources() -> None:
    objs = install.render(
        install.parse_sets(
            ["failurePolicy=Ignore", "controllerMemoryRequest=1Gi", "controllerMemoryLimit=2Gi"]
        )
    )
    hooks = one(objs, "MutatingWebhookConfiguration")["webhooks"]
    assert {h["failurePolicy"] for h in hooks} == {"Ignore"}
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["memory"] == "1Gi"
    assert container["resources"]["limits"]["memory"] == "2Gi"


def test_every_setting_has_a_default_in_help() -> None:
    known = install.defaults()
    assert set(known) == set(install.BY_KEY)
    # Each default passes its own check: the table and deploy/ agree.
    for k, v in known.items():
        install.BY_KEY[k].check(v)


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("replica=3", "unknown setting; did you mean replicas?"),
        ("nosuchthing=1", "unknown setting; known: image,"),
        ("replicas", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("replicas=0", "replicas=0: expected an integer within 1..100"),
        ("replicas=two", "expected an integer"),
        ("defaultMtlsMode=strict", "expected one of STRICT, PERMISSIVE, DISABLE"),
        ("outboundPolicy=DENY", "expected one of ALLOW_ANY, REGISTRY_ONLY"),
        ("proxyCPURequest=lots", "expected a positive Kubernetes quantity"),
        ("proxyMemoryRequest=-1Mi", "expected a positive Kubernetes quantity"),
        ("tracingEndpoint=collector:4318", "an http(s) URL"),
        ("traceSampling=150", "within 0..100"),
        ("nativeSidecar=yes", "expected true or false"),
        ("trustDomain=spiffe://x", "DNS-like name"),
        ("image=Not An Image", "image reference"),
        ("controllerAddress=nohostport", "HOST:PORT"),
    ],
)
def test_bad_settings_are_refused(
    capsys: pytest.CaptureFixture[str], item: str, message: str
) -> None:
    code, out, err = run(capsys, "install", "--set", item)
    assert code == 1
    assert out == ""
    assert err.startswith("synchro: --set")
    assert message in err


def test_limit_below_request_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "install", "--set", "proxyCPULimit=50m")
    assert code == 1 and out == ""
    assert "proxy CPU: the limit 50m is below the request 100m" in err


def test_output_format_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["install", "-o", "table"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_settings_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["install", "--help"])
    out = capsys.readouterr().out
    assert "synchro install | kubectl apply -f -" in out
    for s in install.SETTINGS:
        assert f"  {s.key} " in out


# --- uninstall -----------------------------------------------------------------------


def test_uninstall_keeps_crds_and_deletes_the_webhook_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "uninstall")
    assert code == 0
    docs = objects(out)
    kinds = [d["kind"] for d in docs]
    assert "CustomResourceDefinition" not in kinds
    assert kinds[0] == "MutatingWebhookConfiguration"
    assert kinds[-1] == "Namespace"
    installed = {key(o) for o in deploy_files() if o["kind"] != "CustomResourceDefinition"}
    assert {key(d) for d in docs} == installed
    for d in docs:
        assert set(d) == {"apiVersion", "kind", "metadata"}
        assert set(d["metadata"]) <= {"name", "namespace"}
    assert "--crds" in err


def test_uninstall_crds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "uninstall", "--crds", "-o", "json")
    assert code == 0
    items = json.loads(out)["items"]
    assert {key(d) for d in items} == {key(o) for o in deploy_files()}
    crd_at = [i for i, d in enumerate(items) if d["kind"] == "CustomResourceDefinition"]
    deployment_at = next(i for i, d in enumerate(items) if d["kind"] == "Deployment")
    # The controller goes before the kinds it serves.
    assert crd_at and min(crd_at) > deployment_at


def test_uninstall_order_does_not_depend_on_deploy_order() -> None:
    objs = deploy_files()
    shuffled = objs[::-1]  # webhook first in the input: still first, namespace still last
    out = uninstall.to_delete(shuffled, crds=True)
    assert out[0]["kind"] == "MutatingWebhookConfiguration"
    assert out[-1]["kind"] == "Namespace"


# --- packaging -------------------------------------------------------------------------


def test_wheel_ships_the_manifests(tmp_path: Path) -> None:
    # Build from a copy holding only what the wheel needs, so that the working
    # tree (shared with other builds) gets no build/ or egg-info directories.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    for name in ("synchro", "deploy"):
        shutil.copytree(
            REPO / name,
            src / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    assert (src / "synchro/_deploy").is_symlink(), "synchro/_deploy must link to ../deploy"
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = wheels.glob("synchro-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    kust = yaml.safe_load((REPO / "deploy/kustomization.yaml").read_text())
    for entry in kust["resources"]:
        assert f"synchro/_deploy/{entry}" in names, entry
    assert not (site / "synchro/_deploy").is_symlink()
    # The installed package renders the same objects, with no deploy/ anywhere near it.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, synchro.manifests as m; print(m.deploy_dir()); "
            "print(json.dumps(m.render()))",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    where, rendered = probe.stdout.split("\n", 1)
    assert where.startswith(str(site))
    assert json.loads(rendered) == deploy_files()
