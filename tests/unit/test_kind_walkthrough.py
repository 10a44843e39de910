"""The README's walkthroughs agree with the Makefile and the shop's manifests:
every `make` target it names exists, `make kind-up` builds the images the shop
runs, `make kind-demo` waits for every Deployment of the shop, and the local
mesh section names the dashboard URL and the output formats."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
MAKEFILE = (REPO / "Makefile").read_text()
SHOP = REPO / "examples" / "shop"


def var(name: str) -> str:
    m = re.search(rf"^{name}\s*\?=\s*(\S+)", MAKEFILE, re.M)
    assert m, name
    return m[1]


def target(name: str) -> str:
    return MAKEFILE.split(f"\n{name}:", 1)[1].split("\n\n", 1)[0]


def shop_docs() -> list[dict[str, object]]:
    return [d for p in sorted(SHOP.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_every_make_target_the_readme_names_exists() -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, re.M))
    named = set(re.findall(r"make ([a-z][a-z-]+)", README))
    assert {"demo", "test", "kind-up", "kind-demo", "kind-test", "kind-down"} <= named
    assert named <= targets, named - targets


def test_kind_up_builds_and_loads_the_images_the_shop_runs() -> None:
    images = {
        c["image"]
        for d in shop_docs()
        if d.get("kind") == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    }
    assert images == {var("EXAMPLES_IMAGE")}
    up = target("kind-up")
    assert "-f examples/Dockerfile" in up and "$(EXAMPLES_IMAGE)" in up
    load = next(line for line in up.splitlines() if "kind load docker-image" in line)
    assert "$(IMAGE)" in load and "$(EXAMPLES_IMAGE)" in load
    # The shop's canary is an HTTPRoute: kind has no Gateway API CRDs of its own.
    assert "$(GATEWAY_API_CRDS)" in up and "standard-install.yaml" in var("GATEWAY_API_CRDS")
    dockerfile = (REPO / "examples" / "Dockerfile").read_text()
    assert f"ARG BASE={var('IMAGE')}" in dockerfile and "grpcio-health-checking" in dockerfile


def test_kind_demo_waits_for_every_deployment_of_the_shop() -> None:
    deployments = {
        d["metadata"]["name"]  # type: ignore[index]
        for d in shop_docs()
        if d.get("kind") == "Deployment"
    }
    loop = re.search(r"for d in ([a-z0-9 -]+); do", target("kind-demo"))
    assert loop and set(loop[1].split()) == deployments
    assert "apply -f examples/shop/" in target("kind-demo")
    assert "SYNCHRO_KIND=1" in target("kind-test")


def test_the_readme_walkthroughs_say_what_users_need() -> None:
    local = section("Try it on one machine")
    assert "http://127.0.0.1:15014/" in local and "--dashboard-port" in local
    assert "-o json|yaml" in local
    assert "synchro down" in local and "sudo make demo" in local
    kind = section("Install on Kubernetes (kind)")
    for step in ("make kind-up", "kubectl label namespace shop synchro.dev/inject=enabled",
                 "kubectl apply -f examples/shop/", "port-forward", "synchro top",
                 "synchro status", "make kind-test", "make kind-down"):  # fmt: skip
        assert step in kind, step
