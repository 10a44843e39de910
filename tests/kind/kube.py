"""kubectl helpers for tests/kind (imported by conftest and the tests)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

INJECT = "synchro.dev/inject"
PROXY = "synchro-proxy"

Kubectl = Callable[..., str]


class KubectlError(AssertionError):
    """kubectl exited non-zero; the message carries its stderr."""


def make_kubectl(binary: str, context: str) -> Kubectl:
    def run(*args: str, stdin: str | None = None, timeout: float = 240) -> str:
        done = subprocess.run(
            [binary, "--context", context, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    return run


def find_kubectl() -> tuple[str | None, str]:
    return shutil.which("kubectl"), os.environ.get("SYNCHRO_KIND_CONTEXT", "kind-synchro")


def get_json(kubectl: Kubectl, *args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json"))


def exec_runner(binary: str, context: str, containers: dict[str, str]) -> Callable[..., str]:
    """`kubectl exec` as examples/shopstats.py's Runner: Pods named `ns/name`, run in
    the app container `containers[ref]`; a non-zero exit is not an error (a refused
    gRPC call exits 1), its stdout is the answer."""

    def run(pod: str, argv: Sequence[str]) -> str:
        namespace, _, name = pod.partition("/")
        done = subprocess.run(
            [binary, "--context", context, "-n", namespace, "exec", name,
             "-c", containers[pod], "--", *argv],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        return done.stdout

    return run


def app_container(pod: dict[str, Any]) -> str:
    """The Pod's first container that is not the proxy (a classic sidecar comes first)."""
    names = [c["name"] for c in pod["spec"]["containers"]]
    return next(n for n in names if n != PROXY)


@contextlib.contextmanager
def port_forward(
    binary: str, context: str, namespace: str, target: str, *remote: int
) -> Iterator[dict[int, int]]:
    """`kubectl port-forward TARGET :PORT...` on free local ports: remote -> local."""
    proc = subprocess.Popen(
        [binary, "--context", context, "-n", namespace, "port-forward", target,
         *(f":{p}" for p in remote)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ports: dict[int, int] = {}
        assert proc.stdout is not None
        while len(ports) < len(remote):
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise KubectlError(f"kubectl port-forward {target} failed:\n{err}")
            # "Forwarding from 127.0.0.1:41234 -> 15014"
            m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
            if m:
                ports[int(m.group(2))] = int(m.group(1))
        yield ports
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready_containers(pod: dict[str, Any]) -> tuple[int, int]:
    """(ready, total) as `kubectl get pods` counts them: native sidecars included."""
    spec, status = pod["spec"], pod.get("status", {})
    sidecars = {
        c["name"] for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"
    }
    ready = sum(bool(c.get("ready")) for c in status.get("containerStatuses", []))
    ready += sum(
        bool(c.get("ready"))
        for c in status.get("initContainerStatuses", [])
        if c["name"] in sidecars
    )
    return ready, len(spec["containers"]) + len(sidecars)


def injected(pod: dict[str, Any]) -> bool:
    names = [c["name"] for c in pod["spec"].get("containers", [])]
    names += [c["name"] for c in pod["spec"].get("initContainers", [])]
    return PROXY in names and "synchro.dev/status" in pod["metadata"].get("annotations", {})


def eventually(check: Any, *, within: float, what: str) -> Any:
    # Waiting for the cluster to converge, not a speed assertion.
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return check()
        except AssertionError as e:
            last = e
            time.sleep(2)
    raise AssertionError(f"{what} did not happen within {within:.0f}s: {last}")
