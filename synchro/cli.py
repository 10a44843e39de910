"""`synchro`: the command line.

Commands live one module per command (or per group of related commands) under
`synchro.commands`; each module's `register(subparsers)` adds its parsers and
sets `func`. To add a command, append its module to COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from synchro import __version__
from synchro.commands import CommandError

COMMANDS: tuple[str, ...] = (
    "synchro.commands.inject",
    "synchro.commands.up",
    "synchro.commands.down",
    "synchro.commands.logs",
    "synchro.commands.exec",
    "synchro.commands.status",
    "synchro.commands.top",
    "synchro.commands.install",
    "synchro.commands.uninstall",
    "synchro.commands.explain",
    "synchro.commands.completion",
    "synchro.commands.check",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synchro", description="Synchro, a sidecar service mesh for Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"synchro {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CommandError as exc:
        print(f"synchro: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `synchro inject ... | head`: the reader left; not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
