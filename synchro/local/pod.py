"""Run a (usually injected) Pod spec as processes in a network namespace.

`start_pod(node, pod)` does what the kubelet would, in order: each init
container's command runs to completion inside the Pod's namespace (so
`synchro-init` writes its iptables rules exactly as the webhook's patch asked),
a native sidecar (the proxy, `restartPolicy: Always`) is started and its
startup probe awaited, then the app containers start; `postStart` hooks block
like the kubelet's. The proxy runs as uid/gid 1337; the apps as whatever their
securityContext says (root by default). Console scripts of this project
(`synchro-init`, `synchro-proxy`) resolve to this interpreter's scripts and
`python`/`python3` to this interpreter.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synchro.local.netns import LocalError, Node, PodNet, Process, base_env, netns_socket
from synchro.local.podplan import (
    APP,
    INIT,
    SIDECAR,
    PodContext,
    PodPlan,
    PodSpecError,
    Probe,
    Step,
    plan_pod,
)

log = logging.getLogger(__name__)

# What setting up a container's mount namespace may take on a busy machine (an
# interpreter start and a few mounts): added to exec probes' timeouts.
MOUNT_HELPER_SECONDS = 2.0
PROJECT_SCRIPTS = frozenset({"synchro", "synchro-init", "synchro-proxy", "synchro-controller"})


class PodStartError(LocalError):
    """A Pod did not start; the message names the container and shows its log."""


def resolve_command(argv0: str, path: str | None = None) -> str:
    """The executable a container's `command[0]` means on this machine."""
    if "/" in argv0:
        return argv0
    if argv0 in ("python", "python3"):
        return sys.executable
    if argv0 in PROJECT_SCRIPTS:
        # Next to the interpreter, not a pyenv shim (a bash script that needs $HOME).
        candidate = Path(sys.executable).parent / argv0
        if candidate.exists():
            return str(candidate)
    found = shutil.which(argv0, path=path)
    if found is None:
        raise PodStartError(f"command {argv0!r} is not installed on this machine")
    return found


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Pod:
    """A running Pod: its namespace, plan and container processes."""

    name: str
    namespace: str
    net: PodNet
    plan: PodPlan
    spec: Mapping[str, Any]
    processes: dict[str, Process] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return str(self.net.ip)

    @property
    def netns(self) -> str:
        return self.net.netns

    def process(self, container: str) -> Process:
        return self.processes[container]

    def log(self, container: str) -> str:
        path = self.net.node.logdir / self.net.name / f"{container}.log"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def exec(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command in the Pod's namespace (as root unless uid/gid given)."""
        return self.net.exec(argv, **kwargs)

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        return self.net.connect(host, port, timeout)

    def stop(self, grace: float = 2.0, *, pre_stop: bool = False) -> None:
        """Stop the app containers, then the sidecars (reverse start order)."""
        for step in reversed(self.plan.steps):
            proc = self.processes.get(step.name)
            if proc is None:
                continue
            if pre_stop and step.pre_stop and proc.alive():
                with contextlib.suppress(Exception):
                    _run_hook(self, step, step.pre_stop, timeout=grace)
            proc.stop(grace)


def _env_for(step: Step) -> dict[str, str]:
    return {**base_env(), **step.env}


def _argv(step: Step, argv: Sequence[str]) -> list[str]:
    env = _env_for(step)
    return [resolve_command(argv[0], env.get("PATH")), *argv[1:]]


def spawn_step(net: PodNet, step: Step, argv: Sequence[str] | None = None) -> Process:
    """Start a container's process: its ids, environment, volumes and directory."""
    return net.spawn(
        argv if argv is not None else _argv(step, step.argv),
        name=step.name,
        uid=step.uid,
        gid=step.gid,
        env=_env_for(step),
        cwd=step.cwd,
        mounts=step.mounts,
    )


def _run_hook(pod: Pod, step: Step, argv: Sequence[str], *, timeout: float) -> None:
    proc = pod.net.exec(
        _argv(step, argv),
        uid=step.uid,
        gid=step.gid,
        env=_env_for(step),
        timeout=timeout,
        mounts=step.mounts,
        cwd=step.cwd,
    )
    if proc.returncode != 0:
        raise PodStartError(
            f"{pod.name}/{step.name}: hook {' '.join(argv)} exited {proc.returncode}: "
            f"{_tail(proc.stdout + proc.stderr)}"
        )


def probe_once(node: Node, pod_ip: str, probe: Probe) -> bool:
    """One kubelet-style probe from the node namespace (exec: in the Pod's); True on success."""
    if probe.kind == "exec":
        return _exec_probe(node, pod_ip, probe)
    host = probe.host or pod_ip
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = netns_socket(node.netns, family)
    sock.settimeout(probe.timeout)
    try:
        sock.connect((host, probe.port))
        if probe.kind == "tcpSocket":
            return True
        conn = http.client.HTTPConnection(host, probe.port, timeout=probe.timeout)
        conn.sock = sock
        conn.request("GET", probe.path, headers={"User-Agent": "synchro-local-probe"})
        status = conn.getresponse().status
        return 200 <= status < 400
    except (OSError, http.client.HTTPException):
        return False
    finally:
        sock.close()


def _exec_probe(node: Node, pod_ip: str, probe: Probe) -> bool:
    net = next((p for p in list(node.pods.values()) if str(p.ip) == pod_ip), None)
    if net is None or not probe.command:
        return False
    env = {**base_env(), **probe.env}
    try:
        argv = [resolve_command(probe.command[0], env.get("PATH")), *probe.command[1:]]
        proc = net.exec(
            argv,
            uid=probe.uid,
            gid=probe.gid,
            env=env,
            # The mount helper's start is the runtime's time, not the probe's.
            timeout=probe.timeout + (MOUNT_HELPER_SECONDS if probe.mounts else 0.0),
            mounts=probe.mounts,
            cwd=probe.cwd,
        )
    except (PodStartError, OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def wait_probe(pod: Pod, step: Step, probe: Probe, proc: Process | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe_once(pod.net.node, pod.ip, probe):
            return
        if proc is not None and not proc.alive():
            raise PodStartError(
                f"{pod.name}/{step.name} exited {proc.popen.returncode} before it was ready:\n"
                f"{_tail(proc.log())}"
            )
        time.sleep(0.25 if probe.kind == "exec" else 0.05)  # exec probes start processes
    log_text = proc.log() if proc else ""
    what = " ".join(probe.command) if probe.kind == "exec" else f"on port {probe.port}"
    raise PodStartError(
        f"{pod.name}/{step.name}: {probe.kind} probe {what} did not pass "
        f"within {timeout}s:\n{_tail(log_text)}"
    )


def node_allocatable() -> dict[str, str]:
    """This machine as the one node: its CPUs and memory, as Kubernetes quantities."""
    out = {"cpu": str(os.cpu_count() or 1)}
    with contextlib.suppress(ValueError, OSError):
        out["memory"] = str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with contextlib.suppress(OSError):
        out["ephemeral-storage"] = str(shutil.disk_usage("/").total)
    return out


def _prepare_volumes(
    node: Node, pod_name: str, spec: Mapping[str, Any], files: Mapping[str, Mapping[str, str]]
) -> dict[str, str]:
    """A directory per declared volume (emptyDir semantics), seeded with `files`."""
    out: dict[str, str] = {}
    for volume in spec.get("volumes") or []:
        name = volume.get("name")
        if not isinstance(name, str):
            continue
        path = node.rundir / "volumes" / pod_name / name
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        # Containers run as different uids (root, 1337) and share the volume.
        path.chmod(0o777)
        for filename, content in files.get(name, {}).items():
            target = path / filename  # an item's path may name a subdirectory
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            target.write_text(content)
            target.chmod(0o644)
        out[name] = str(path)
    return out


def start_pod(
    node: Node,
    pod: Mapping[str, Any],
    *,
    namespace: str | None = None,
    name: str | None = None,
    env_overrides: Mapping[str, Mapping[str, str]] | None = None,
    volume_files: Mapping[str, Mapping[str, str]] | None = None,
    wait_ready: bool = True,
    timeout: float = 30.0,
    key: str | None = None,
) -> Pod:
    """Create a Pod namespace on `node` and run `pod` in it. On failure nothing
    of the Pod is left behind and `PodStartError` says which container failed.

    `key` names the Pod's namespace on the node when the Pod's name alone is not
    unique there (Pods of the same name in two Kubernetes namespaces)."""
    meta = pod.get("metadata") or {}
    pod_name = name or meta.get("name")
    if not isinstance(pod_name, str) or not pod_name:
        raise PodSpecError("metadata.name: expected a name (or pass name=)")
    ns = namespace or meta.get("namespace") or "default"
    spec = pod.get("spec") or {}
    key = key or pod_name
    net = node.add_pod(key)
    try:
        ctx = PodContext(
            name=pod_name,
            namespace=ns,
            ip=str(net.ip),
            ips=(str(net.ip),) + ((str(net.ip6),) if net.ip6 else ()),
            node_name=node.netns,
            host_ip=str(node.gateway),
            uid=f"local-{node.prefix}-{pod_name}",
            volumes=_prepare_volumes(node, key, spec, volume_files or {}),
            allocatable=node_allocatable(),
        )
        plan = plan_pod(pod, ctx, env_overrides)
        running = Pod(pod_name, ns, net, plan, pod)
        _start_steps(running, wait_ready=wait_ready, timeout=timeout)
        return running
    except BaseException:
        node.remove_pod(key)
        raise


def _start_steps(pod: Pod, *, wait_ready: bool, timeout: float) -> None:
    for step in pod.plan.steps:
        argv = _argv(step, step.argv)
        if step.kind == INIT:
            _run_init(pod, step, argv, timeout)
            continue
        proc = spawn_step(pod.net, step, argv)
        pod.processes[step.name] = proc
        log.info("%s/%s started (pid %d)", pod.name, step.name, proc.pid)
        if step.post_start:
            _run_hook(pod, step, step.post_start, timeout=timeout)
        if step.kind == SIDECAR and step.startup_probe is not None:
            # The kubelet starts the next container only once a native sidecar has started.
            wait_probe(pod, step, step.startup_probe, proc, timeout)
    if wait_ready:
        for step in pod.plan.steps:
            if step.kind in (SIDECAR, APP) and step.readiness_probe is not None:
                wait_probe(pod, step, step.readiness_probe, pod.processes[step.name], timeout)


def _run_init(pod: Pod, step: Step, argv: Sequence[str], timeout: float) -> None:
    proc = spawn_step(pod.net, step, argv)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop(0.5)
        raise PodStartError(
            f"{pod.name}/{step.name} (init) did not finish within {timeout}s:\n{_tail(proc.log())}"
        ) from None
    pod.exit_codes[step.name] = code
    if code != 0:
        raise PodStartError(
            f"{pod.name}/{step.name} (init) exited {code}: {' '.join(argv)}\n{_tail(proc.log())}"
        )
    log.info("%s/%s (init) done", pod.name, step.name)


def inject_and_start(
    node: Node,
    pod: Mapping[str, Any],
    *,
    namespace: str = "default",
    config: Any = None,
    **kwargs: Any,
) -> Pod:
    """Inject `pod` with the webhook core, as the admission webhook would, then start it."""
    from webhook.config import InjectorConfig
    from webhook.inject import inject_pod

    injected = inject_pod(pod, namespace, config or InjectorConfig())
    return start_pod(node, injected, namespace=namespace, **kwargs)


__all__ = [
    "Pod",
    "PodStartError",
    "inject_and_start",
    "probe_once",
    "resolve_command",
    "spawn_step",
    "start_pod",
]
