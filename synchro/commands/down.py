"""`synchro down`: stop a local mesh and remove everything it made.

Works on a crashed `synchro up` too: the supervisor is asked to stop, then
whatever is left (processes, network namespaces with their veth pairs and
iptables rules, /etc/netns files, state under /run/synchro) is removed by the
name prefix the mesh recorded.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from synchro.commands import CommandError
from synchro.commands.up import add_mesh_flag
from synchro.local import mesh


def cmd_down(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CommandError("`synchro down` needs root (it removes network namespaces); use sudo")
    names = mesh.list_meshes() if args.all else None
    if names is None:
        try:
            names = [mesh.resolve_mesh(args.mesh).name]
        except mesh.MeshError as exc:
            if args.mesh or mesh.list_meshes():
                raise CommandError(str(exc)) from None
            print("no mesh is up; nothing to do")
            return 0
    for name in names:
        removed = mesh.down(mesh.MeshPaths(name))
        if not args.quiet:
            for item in removed:
                print(f"removed {item}")
        print(f"mesh {name!r} is down")
    return 0


def register(subparsers: Any) -> None:
    down = subparsers.add_parser(
        "down",
        help="stop the local mesh and remove everything it made",
        description=__doc__,
        epilog="examples:\n  sudo synchro down\n  sudo synchro down --all -q\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_mesh_flag(down)
    down.add_argument("--all", action="store_true", help="every local mesh")
    down.add_argument("-q", "--quiet", action="store_true", help="no list of what was removed")
    down.set_defaults(func=cmd_down)
