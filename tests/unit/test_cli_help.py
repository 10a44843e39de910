"""The CLI as a whole: every registered command has a --help with examples, and
every `-o/--output` speaks the same formats (json for scripts, names from
synchro.output), so that commands feel alike whoever wrote them."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from synchro import cli, output

REPO = Path(__file__).resolve().parents[2]


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


COMMANDS = commands()


def test_the_commands_of_the_issue_are_registered() -> None:
    wanted = {"install", "uninstall", "check", "inject", "uninject", "status", "explain"}
    wanted |= {"up", "down", "logs", "exec", "completion"}
    assert wanted <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_has_examples(name: str) -> None:
    text = COMMANDS[name].format_help()
    lowered = text.lower()
    assert "examples:" in lowered, f"`synchro {name} --help` shows no examples (add an epilog)"
    examples = text[lowered.index("examples:") :]
    assert f"synchro {name}" in examples


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_output_formats_are_consistent(name: str) -> None:
    for a in COMMANDS[name]._actions:
        if "--output" not in a.option_strings:
            continue
        assert "-o" in a.option_strings, name
        choices = tuple(a.choices or ())
        assert set(choices) <= set(output.FORMATS), (name, choices)
        assert output.JSON in choices, f"{name}: -o json is what scripts use"


def test_every_command_help_runs() -> None:
    # The real entry point, as a user types it (argparse formatting errors show here).
    for name in COMMANDS:
        done = subprocess.run(
            [sys.executable, "-m", "synchro.cli", name, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=REPO,
        )
        assert done.returncode == 0, (name, done.stderr)


def test_table_helper() -> None:
    text = output.table(("NAME", "READY"), [("a", True), ("long-name", None)])
    assert text.splitlines() == ["NAME       READY", "a          True", "long-name  -"]
    with pytest.raises(ValueError):
        output.table(("A",), [("x", "y")])


def test_yaml_keeps_multiline_strings_readable() -> None:
    text = output.to_yaml({"pem": "line1\nline2\n"})
    assert "pem: |" in text
    assert output.render([1], output.JSON) == "[\n  1\n]\n"
    with pytest.raises(ValueError):
        output.render([], "xml")
