"""Output shared by the `synchro` commands: tables for people, JSON and YAML for scripts.

Every command that prints data takes `-o/--output` from `add_output_flag`, builds
plain JSON-able data (dicts, lists, strings, numbers), and prints it with
`emit(data, fmt, table=...)`: `json` and `yaml` print the data unchanged (so
scripts see the same fields in both), `table` calls the command's own renderer.
Tables are left-aligned columns separated by two spaces, headers in capitals,
as kubectl prints them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import yaml

TABLE, JSON, YAML = "table", "json", "yaml"
FORMATS = (TABLE, JSON, YAML)

OK_MARK = "\u2714"  # ✔
FAIL_MARK = "\u2718"  # ✘


def add_output_flag(
    parser: argparse.ArgumentParser,
    *,
    choices: Sequence[str] = FORMATS,
    default: str | None = None,
    help: str | None = None,
) -> None:
    """`-o/--output` with the same spelling in every command."""
    default = default or choices[0]
    parser.add_argument(
        "-o",
        "--output",
        choices=tuple(choices),
        default=default,
        metavar="|".join(choices),
        help=help or f"output format (default: {default})",
    )


class _Dumper(yaml.SafeDumper):
    """Block-style YAML; multi-line strings as `|` blocks so they stay readable."""


# Line breaks to a YAML reader (1.1), which PyYAML would write raw in a single-
# quoted or block scalar and read back as a space or a newline: keep them escaped.
_YAML_BREAKS = frozenset("\x85\u2028\u2029")


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if not _YAML_BREAKS.isdisjoint(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_presenter)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def to_yaml(data: Any) -> str:
    text: str = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    return text


def to_yaml_stream(docs: Iterable[Any]) -> str:
    """Several documents separated by `---`, as `kubectl apply -f -` reads them."""
    text: str = yaml.dump_all(
        list(docs), Dumper=_Dumper, sort_keys=False, allow_unicode=True, explicit_start=True
    )
    return text


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Aligned columns; None and "" show as "-" so that every cell has a value."""
    cells = [list(columns)] + [["-" if c is None or c == "" else str(c) for c in r] for r in rows]
    for r in cells:
        if len(r) != len(columns):
            raise ValueError(f"row {r!r} has {len(r)} cells, expected {len(columns)}")
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def render(data: Any, fmt: str, table: Callable[[Any], str] | None = None) -> str:
    if fmt == JSON:
        return to_json(data)
    if fmt == YAML:
        return to_yaml(data)
    if fmt == TABLE:
        if table is None:
            return to_yaml(data)
        return table(data)
    raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")


def emit(
    data: Any,
    fmt: str,
    table: Callable[[Any], str] | None = None,
    out: TextIO | None = None,
) -> None:
    (out or sys.stdout).write(render(data, fmt, table))


def mark(ok: bool) -> str:
    return OK_MARK if ok else FAIL_MARK
