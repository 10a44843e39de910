"""Subcommands of `synchro`: each module has `register(subparsers)`, adding one or
more parsers whose `func(args) -> int` runs the command (see synchro/cli.py)."""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing failure: printed as `synchro: <message>`, exit status 1."""
