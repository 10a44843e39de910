"""`synchro up DIR`: the whole mesh on this machine, in the background.

Needs root (network namespaces, veth pairs, iptables). Starts the supervisor
(see synchro/local/mesh.py), shows each Pod's progress, and returns once every
Pod is ready (exit 0, with a summary) or one failed (exit 1, naming the Pod
and the container). The mesh keeps running until `synchro down`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from synchro import output
from synchro.commands import CommandError
from synchro.local import mesh, netns
from synchro.local.manifests import ManifestError, load

SPINNER = "|/-\\"
DONE = {"Ready": "+", "Completed": "+", "Failed": "x"}
EPILOG = """examples:
  sudo synchro up examples/shop          # start, wait until every Pod is ready
  sudo synchro up examples/shop -o json  # the same, the final state as JSON on stdout
  sudo synchro up examples/shop --dashboard-port 8014 --mesh shop2
  sudo synchro exec shop/frontend-0 -- curl -s http://catalog.shop/
  sudo synchro logs shop/catalog-v1-0 -c synchro-proxy
  sudo synchro down
"""


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def summary(status: Mapping[str, Any]) -> str:
    rows = [["NAMESPACE", "NAME", "STATUS", "MESHED", "IP", "CONTAINERS", "READY AFTER"]]
    for pod in status.get("pods") or []:
        containers = [c["name"] for c in pod.get("containers") or [] if c.get("kind") != "init"]
        after = pod.get("ready_seconds")
        rows.append(
            [
                pod["namespace"],
                pod["name"],
                pod["phase"],
                "yes" if pod.get("meshed") else "no",
                pod.get("ip") or "-",
                ",".join(containers) or "-",
                f"{after:.1f}s" if isinstance(after, int | float) else "-",
            ]
        )
    return table(rows)


class Progress:
    """Pod phases as they change: redrawn in place on a terminal, one line per
    change otherwise (logs, CI)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty() and os.environ.get("TERM") != "dumb"
        self.seen: dict[str, str] = {}
        self.drawn = 0
        self.frame = 0

    def update(self, status: Mapping[str, Any]) -> None:
        pods = status.get("pods") or []
        if self.tty:
            self._redraw(pods)
            return
        for pod in pods:
            phase = pod.get("phase", "")
            if self.seen.get(pod["ref"]) != phase:
                self.seen[pod["ref"]] = phase
                print(f"  {pod['ref']}: {phase}", file=self.out, flush=True)

    def _redraw(self, pods: Sequence[Mapping[str, Any]]) -> None:
        self.frame += 1
        width = max((len(p["ref"]) for p in pods), default=0)
        lines = []
        for pod in pods:
            phase = pod.get("phase", "")
            mark = DONE.get(phase, SPINNER[self.frame % len(SPINNER)])
            meshed = "meshed" if pod.get("meshed") else ""
            lines.append(f"  {mark} {pod['ref'].ljust(width)}  {phase:<11} {meshed}")
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
        self.out.write("\n".join(lines) + ("\n" if lines else ""))
        self.out.flush()
        self.drawn = len(lines)


def _existing(paths: mesh.MeshPaths, out: TextIO) -> None:
    """A mesh of this name: refuse if it runs, clean it if it failed or crashed."""
    if not paths.info.exists() and not paths.dir.exists():
        return
    info = mesh.read_info(paths) if paths.info.exists() else {}
    status = mesh.read_status(paths) or {}
    if info and mesh.supervisor_alive(info) and status.get("phase") != "failed":
        raise CommandError(
            f"mesh {paths.name!r} is already up (from {info.get('directory')}); "
            f"run `synchro down{_mesh_flag(paths.name)}` first, or pick another --mesh"
        )
    print(f"removing what is left of the earlier mesh {paths.name!r}", file=out)
    mesh.down(paths)


def _mesh_flag(name: str) -> str:
    return "" if name == mesh.DEFAULT_MESH else f" --mesh {name}"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def follow(paths: mesh.MeshPaths, proc: Any, deadline: float, out: TextIO) -> dict[str, Any]:
    """Wait for the supervisor to say ready or failed; show progress meanwhile."""
    progress = Progress(out)
    while True:
        status = mesh.read_status(paths)
        if status is not None:
            progress.update(status)
            if status.get("phase") in ("ready", "failed"):
                return status
        if proc.poll() is not None:
            log = _tail(paths.supervisor_log)
            mesh.down(paths)
            raise CommandError(f"the mesh supervisor exited {proc.returncode}:\n{log}")
        if time.monotonic() > deadline:
            raise CommandError(
                f"the mesh is not ready after {deadline:.0f}s; see `synchro logs` and "
                f"{paths.supervisor_log}; `synchro down` removes it"
            )
        time.sleep(0.1)


def failure_message(status: Mapping[str, Any], name: str) -> str:
    failed = [p for p in status.get("pods") or [] if p.get("phase") == "Failed"]
    hint = f"\n(the mesh stays up for inspection; `synchro down{_mesh_flag(name)}` removes it)"
    if not failed:
        return f"{status.get('error') or 'the mesh failed'}{hint}"
    pod = failed[0]
    container = pod.get("container")
    who = f"Pod {pod['ref']}" + (f", container {container}" if container else "")
    logs = (
        f"\nlogs: synchro logs {pod['ref']}{' -c ' + container if container else ''}"
        f"{_mesh_flag(name)}"
    )
    return f"{who} failed: {pod.get('message')}{logs}{hint}"


def dashboard_line(status: Mapping[str, Any]) -> str:
    dash = status.get("dashboard") or {}
    if dash.get("url"):
        return f"dashboard: {dash['url']}"
    if dash.get("error"):
        return f"dashboard: not exposed on this host: {dash['error']}"
    return "dashboard: off (--dashboard-port 0)"


def cmd_up(args: argparse.Namespace) -> int:
    # For -o json|yaml, stdout carries only the data; people read stderr.
    out = sys.stdout if args.output == output.TABLE else sys.stderr
    if os.geteuid() != 0:
        raise CommandError(
            "`synchro up` needs root: it creates network namespaces, veth pairs and "
            "iptables rules; run it with sudo"
        )
    reason = netns.unavailable_reason()
    if reason:
        raise CommandError(f"cannot run Pods as network namespaces here: {reason}")
    directory = Path(args.dir).resolve()
    try:
        manifests = load(directory)
        name = mesh.check_name(args.mesh)
    except (ManifestError, mesh.MeshError) as exc:
        raise CommandError(str(exc)) from None
    for line in manifests.skipped:
        print(f"warning: {line}", file=sys.stderr)
    if not manifests.pods:
        raise CommandError(f"{directory}: no Pods, Deployments, StatefulSets or Jobs to run")
    paths = mesh.MeshPaths(name)
    _existing(paths, out)
    if not 0 <= args.dashboard_port <= 65535:
        raise CommandError(f"--dashboard-port {args.dashboard_port}: expected 0 to 65535")
    options = mesh.Options(
        name,
        directory,
        subnet=args.subnet,
        timeout=args.timeout,
        parallel=args.parallel,
        dashboard_port=args.dashboard_port,
    )
    print(
        f"Starting mesh {name!r} from {directory}: controller and {len(manifests.pods)} Pods",
        file=out,
        flush=True,
    )
    proc = mesh.spawn_supervisor(options, paths)
    started = time.monotonic()
    status = follow(paths, proc, started + args.timeout * 3 + 60, out)
    print(file=out)
    print(summary(status), file=out)
    if args.output != output.TABLE:
        output.emit(status, args.output)
    if status.get("phase") == "failed":
        raise CommandError(failure_message(status, name))
    flag = _mesh_flag(name)
    steps = [
        ("synchro exec NAMESPACE/POD -- CMD...", "run a command in a Pod"),
        ("synchro logs NAMESPACE/POD [-c NAME]", "a container's log"),
        (f"synchro status{flag}", "the proxies and their config"),
        (f"synchro top{flag}", "requests/s, success and latency per service"),
        (f"synchro down{flag}", "stop and remove everything"),
    ]
    print(
        f"\nmesh {name!r} is up ({time.monotonic() - started:.1f}s); {dashboard_line(status)}\n"
        "Next:\n" + "\n".join(f"  {cmd:<38} {what}" for cmd, what in steps),
        file=out,
    )
    return 0


def add_mesh_flag(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--mesh",
        default=default if default is not None else os.environ.get("SYNCHRO_MESH"),
        metavar="NAME",
        help="which local mesh (default: $SYNCHRO_MESH, else the only one that is up)",
    )


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up",
        help="run the mesh and the workloads in DIR on this machine (root)",
        description="Run synchro-controller and every Pod, Deployment, StatefulSet and Job "
        "in DIR as network-namespace Pods on this machine, injected by the real webhook. "
        "Returns when every Pod is ready; the mesh keeps running until `synchro down`. "
        "Images are ignored: containers run their command/args as local processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("dir", metavar="DIR", help="directory of Kubernetes YAML (or one file)")
    add_mesh_flag(up, os.environ.get("SYNCHRO_MESH", mesh.DEFAULT_MESH))
    up.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long each Pod may take to become ready (default 60)",
    )
    up.add_argument(
        "--subnet",
        default=mesh.DEFAULT_SUBNET,
        help=f"the Pods' IPv4 network (default {mesh.DEFAULT_SUBNET})",
    )
    up.add_argument(
        "--parallel", type=int, default=4, metavar="N", help="Pods started at once (default 4)"
    )
    up.add_argument(
        "--dashboard-port",
        type=int,
        default=mesh.DEFAULT_DASHBOARD_PORT,
        metavar="PORT",
        help="serve the controller's dashboard on 127.0.0.1:PORT of this host "
        f"(default {mesh.DEFAULT_DASHBOARD_PORT}; 0: do not)",
    )
    output.add_output_flag(
        up,
        help="the final state: a table for people (default), or json|yaml on stdout "
        "(progress then goes to stderr)",
    )
    up.set_defaults(func=cmd_up)
