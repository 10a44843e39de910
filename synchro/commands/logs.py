"""`synchro logs POD [-c CONTAINER]`: a container's log in the local mesh.

Pods are `namespace/name`, or `name` in `default`; without `-c`, the Pod's
default container (annotation `kubectl.kubernetes.io/default-container`, else
the first app container). `synchro-system/synchro-controller` is the controller.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from synchro.commands import CommandError
from synchro.commands.up import add_mesh_flag
from synchro.local import mesh

CONTROLLER = "synchro-system/synchro-controller"


def log_path(paths: mesh.MeshPaths, pod: str, container: str | None) -> Path:
    if pod == CONTROLLER:
        return paths.controller_log
    record = mesh.find_pod(paths, pod)
    return Path(mesh.find_container(record, container)["log"])


def _print_tail(path: Path, tail: int | None) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if tail is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail:]) if tail > 0 else b""
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return path.stat().st_size


def cmd_logs(args: argparse.Namespace) -> int:
    try:
        paths = mesh.resolve_mesh(args.mesh)
        path = log_path(paths, args.pod, args.container)
    except mesh.MeshError as exc:
        raise CommandError(str(exc)) from None
    offset = _print_tail(path, args.tail)
    while args.follow:
        time.sleep(0.2)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0  # the mesh went down
        if size < offset:
            offset = 0  # truncated
        if size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                sys.stdout.buffer.write(f.read(size - offset))
                sys.stdout.flush()
            offset = size
    return 0


def register(subparsers: Any) -> None:
    logs = subparsers.add_parser(
        "logs",
        help="print a container's log from the local mesh",
        description=__doc__,
        epilog="examples:\n  synchro logs shop/frontend-0\n"
        "  synchro logs shop/frontend-0 -c synchro-proxy -f\n"
        f"  synchro logs {CONTROLLER} --tail 50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    logs.add_argument("pod", metavar="POD", help="NAMESPACE/NAME, or NAME in default")
    logs.add_argument("-c", "--container", help="container name (default: the Pod's default)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    add_mesh_flag(logs)
    logs.set_defaults(func=cmd_logs)
