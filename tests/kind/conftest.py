"""tests/kind: run against a real kind cluster made by `make kind-up`.

Skipped unless SYNCHRO_KIND=1. The cluster context defaults to `kind-synchro`
(the Makefile's KIND_CLUSTER); set SYNCHRO_KIND_CONTEXT to use another one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kind.kube import INJECT, Kubectl, KubectlError, find_kubectl, make_kubectl

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SYNCHRO_KIND") == "1":
        return
    skip = pytest.mark.skip(reason="needs a kind cluster: run `make kind-up`, then SYNCHRO_KIND=1")
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kubectl() -> Kubectl:
    binary, context = find_kubectl()
    if binary is None:
        pytest.fail("SYNCHRO_KIND=1 but kubectl is not installed")
    return make_kubectl(binary, context)


def _namespace(kubectl: Kubectl, labels: dict[str, str]) -> Iterator[str]:
    name = f"synchro-test-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    try:
        if labels:
            kubectl("label", "namespace", name, *(f"{k}={v}" for k, v in labels.items()))
        yield name
    finally:
        # Cleanup must not hide the test's own failure.
        with contextlib.suppress(KubectlError):
            kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture
def meshed_namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace labelled synchro.dev/inject=enabled, deleted afterwards."""
    yield from _namespace(kubectl, {INJECT: "enabled"})


@pytest.fixture
def plain_namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace without the injection label, deleted afterwards."""
    yield from _namespace(kubectl, {})
