"""`synchro exec POD [-c CONTAINER] -- CMD...`: a command inside a local Pod.

Like `kubectl exec`: the command runs in the Pod's network namespace (so its
hosts file resolves Service names, and a meshed Pod's traffic goes through its
proxy), with the container's environment, user, working directory and volumes
(each at its mountPath, in a mount namespace of the command's own, as the
container sees them). stdin, stdout and stderr are passed through; the exit
status is the command's.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from synchro.commands import CommandError
from synchro.commands.up import add_mesh_flag
from synchro.local import mesh
from synchro.local.mountns import Mount
from synchro.local.netns import LocalError, wrap_argv
from synchro.local.pod import PodStartError, resolve_command


def exec_argv(
    record: dict[str, Any], container: dict[str, Any], command: list[str]
) -> tuple[list[str], dict[str, str]]:
    env = {str(k): str(v) for k, v in (container.get("env") or {}).items()}
    argv = [resolve_command(command[0], env.get("PATH")), *command[1:]]
    mounts = [Mount.from_dict(m) for m in container.get("mounts") or []]
    wrapped = wrap_argv(
        record["netns"],
        argv,
        container.get("uid"),
        container.get("gid"),
        mounts,
        container.get("cwd") if mounts else None,
    )
    return wrapped, env


_LATE_FLAGS = {"-c": "container", "--container": "container", "--mesh": "mesh"}


def split_command(args: argparse.Namespace) -> list[str]:
    """`[-c C] [--mesh M] [--] CMD...` after POD: the flags into `args`, the command out.

    argparse's subparsers keep or drop `--` depending on where the flags were,
    so the flags between POD and `--` are read here, one known flag at a time;
    the first token that is not one of them (or a `--`) starts the command."""
    rest = list(args.command)
    i = 0
    while i < len(rest):
        token = rest[i]
        name, eq, value = token.partition("=")
        if token == "--":
            return rest[i + 1 :]
        if name not in _LATE_FLAGS:
            break
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1] == "--":
                raise CommandError(f"exec: {name} needs a value")
            value = rest[i + 1]
            i += 1
        setattr(args, _LATE_FLAGS[name], value)
        i += 1
    command = rest[i:]
    if command[:1] and command[0].startswith("-"):
        raise CommandError(
            f"exec: unknown flag {command[0]}; put the command after --, e.g. "
            "synchro exec POD -c app -- env"
        )
    return command


def cmd_exec(args: argparse.Namespace) -> int:
    command = split_command(args)
    if not command:
        raise CommandError(
            "no command; e.g. synchro exec shop/frontend-0 -- curl -s http://catalog/"
        )
    if os.geteuid() != 0:
        raise CommandError("`synchro exec` needs root (it enters network namespaces); use sudo")
    try:
        paths = mesh.resolve_mesh(args.mesh)
        record = mesh.find_pod(paths, args.pod)
        container = mesh.find_container(record, args.container)
        if not record.get("ip"):
            raise mesh.MeshError(f"Pod {record['ref']} is not running ({record.get('phase')})")
        argv, env = exec_argv(record, container, command)
    except (mesh.MeshError, PodStartError, LocalError) as exc:
        raise CommandError(str(exc)) from None
    cwd = container.get("cwd")
    if cwd and not container.get("mounts"):  # else the mount helper changes to it
        try:
            os.chdir(cwd)
        except OSError as exc:
            raise CommandError(f"working directory {cwd}: {exc}") from None
    sys.stdout.flush()
    os.execve(argv[0], argv, env)
    return 127  # not reached


def register(subparsers: Any) -> None:
    ex = subparsers.add_parser(
        "exec",
        help="run a command inside a Pod of the local mesh",
        description=__doc__,
        epilog="examples:\n  synchro exec shop/frontend-0 -- curl -s http://catalog.shop/\n"
        "  synchro exec web-0 -c app -- env\n"
        "  synchro exec shop/frontend-0 -c synchro-proxy -- curl -s localhost:15000/config_dump",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("pod", metavar="POD", help="NAMESPACE/NAME, or NAME in default")
    ex.add_argument("-c", "--container", help="container name (default: the Pod's default)")
    add_mesh_flag(ex)
    # REMAINDER, and the flags between POD and `--` parsed again in split_command:
    # argparse's subparsers drop `--`, and kubectl's order is `exec POD -c C -- CMD`.
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    ex.set_defaults(func=cmd_exec)
