"""Fixtures for the root-only tests: Pods as Linux network namespaces.

Every test in this directory is skipped, with the reason, when this host
cannot create network namespaces (not root, no `ip netns`, no veth/bridge).

- `node`: a fresh node namespace with a bridge (unique name prefix), torn down
  after the test whatever happens; `node.add_pod("a")` gives a bare Pod
  namespace (`.ip`, `.spawn()`, `.exec()`, `.connect()`, `.wait_for_port()`).
- `module_node`: the same, shared by one module's tests; `node6`: Pods also get
  a unique-local IPv6 address (fd00:5e:1::/64).
- `start(spec, **kw)`: runs an already injected Pod spec on `node` (start_pod).
- `injected_pod(manifest, **kw)`: injects with the webhook core, then runs it.
- `synchro_init`: the `synchro-init` console script's path.

On failure, the tail of every process log of the test's node is printed in
the report ("Captured stdout teardown").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from synchro.local import netns
from synchro.local.netns import Node
from synchro.local.pod import Pod, inject_and_start, resolve_command, start_pod

HERE = Path(__file__).resolve().parent
PREFIX_BASE = "synt"
DSTECHO = HERE / "dstecho.py"

_reason: list[str | None] = []
_FAILED = pytest.StashKey[bool]()


def netns_unavailable_reason() -> str | None:
    if not _reason:
        _reason.append(netns.unavailable_reason())
    return _reason[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.netns)


def pytest_report_header(config: pytest.Config) -> str:
    reason = netns_unavailable_reason()
    return f"netns tests: {'skipped: ' + reason if reason else 'enabled'}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def _require_netns() -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"network-namespace tests skipped: {reason}")


@pytest.fixture(scope="session", autouse=True)
def _session_cleanup() -> Iterator[None]:
    """Remove what crashed earlier runs left (their owner is gone), and ours at the end."""
    if netns_unavailable_reason():
        yield
        return
    netns.cleanup_prefix(PREFIX_BASE, only_dead_owners=True)
    yield
    mine = [
        path.stem
        for path in (
            netns.STATE_DIR.glob(f"{PREFIX_BASE}-*.json") if netns.STATE_DIR.exists() else []
        )
        if netns.State.load(path).owner_pid == os.getpid()
    ]
    for prefix in mine:
        netns.cleanup_prefix(prefix)


def _dump_logs(node: Node) -> None:
    for path in sorted(node.logdir.rglob("*.log")):
        text = path.read_text(errors="replace").splitlines()[-40:]
        print(f"----- {path.relative_to(node.logdir)} (last {len(text)} lines)")
        print("\n".join(text))


@pytest.fixture
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    n = Node.create(netns.new_prefix(PREFIX_BASE), logdir=tmp_path / "logs")
    try:
        yield n
    finally:
        if request.node.stash.get(_FAILED, False):
            _dump_logs(n)
        n.close()


@pytest.fixture(scope="module")
def module_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node shared by the tests of one module (cheaper; tests must not depend on
    each other's leftovers)."""
    n = Node.create(netns.new_prefix(PREFIX_BASE), logdir=tmp_path_factory.mktemp("netns") / "logs")
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def node6(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """Like `node`, with a unique-local IPv6 address on every Pod as well."""
    n = Node.create(
        netns.new_prefix(PREFIX_BASE),
        ipv6_subnet="fd00:5e:1::/64",
        logdir=tmp_path / "logs6",
    )
    try:
        yield n
    finally:
        if request.node.stash.get(_FAILED, False):
            _dump_logs(n)
        n.close()


@pytest.fixture
def start(node: Node) -> Callable[..., Pod]:
    """`start(spec, **kwargs)` runs an injected Pod spec on `node` (see start_pod)."""

    def run(spec: dict[str, Any], **kwargs: Any) -> Pod:
        return start_pod(node, spec, **kwargs)

    return run


@pytest.fixture
def injected_pod(node: Node) -> Callable[..., Pod]:
    """`injected_pod(manifest, namespace="default", config=None, **kwargs)`.

    Without a `config`, the injector's defaults with no controller address
    (there is none in these tests).
    """

    def run(manifest: dict[str, Any], **kwargs: Any) -> Pod:
        if kwargs.get("config") is None:
            from webhook.config import InjectorConfig

            kwargs["config"] = InjectorConfig(controller_address="")
        return inject_and_start(node, manifest, **kwargs)

    return run


@pytest.fixture(scope="session")
def synchro_init() -> str:
    return resolve_command("synchro-init")


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
