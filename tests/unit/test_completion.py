"""`synchro completion`: the scripts are generated from the real argparse tree and
run in real shells. bash: the completion function is called the way bash calls
it (COMP_WORDS/COMP_CWORD) and COMPREPLY is read back. zsh (skipped without
zsh): the script parses, and with `_arguments`/`_describe` replaced by printers
every spec reaches zsh as one intact word.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from synchro import cli
from synchro.commands import completion


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "synchro.bash"
    path.write_text(completion.script("bash", cli.build_parser()))
    return path


def complete_bash(script: Path, *words: str) -> list[str]:
    """COMPREPLY for the command line `words` (the last word is being completed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    program = (
        f"source '{script}'\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        "_synchro\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [line for line in done.stdout.splitlines() if line]


def test_bash_script_parses(bash_script: Path) -> None:
    subprocess.run(["bash", "-n", str(bash_script)], check=True, timeout=30)


def test_bash_completes_commands(bash_script: Path) -> None:
    names = set(complete_bash(bash_script, "synchro", ""))
    registered = {name for name, _, _ in completion._subcommands(cli.build_parser())}
    assert registered <= names
    assert {"install", "explain", "up", "status", "completion"} <= names
    assert complete_bash(bash_script, "synchro", "unin") == ["uninject", "uninstall"]


def test_bash_completes_options_and_their_values(bash_script: Path) -> None:
    assert complete_bash(bash_script, "synchro", "install", "--s") == ["--set"]
    assert complete_bash(bash_script, "synchro", "install", "-o", "") == ["yaml", "json"]
    assert complete_bash(bash_script, "synchro", "explain", "-o", "j") == ["json"]
    assert "--crds" in complete_bash(bash_script, "synchro", "uninstall", "--")
    # After an option value, options again.
    assert "--method" in complete_bash(bash_script, "synchro", "explain", "-o", "json", "--m")
    # A free-text value completes nothing of ours.
    assert complete_bash(bash_script, "synchro", "install", "--set", "") == []


def test_bash_completes_positional_choices_and_files(bash_script: Path, tmp_path: Path) -> None:
    assert complete_bash(bash_script, "synchro", "completion", "") == ["bash", "zsh"]
    (tmp_path / "mesh-demo").mkdir()
    got = complete_bash(bash_script, "synchro", "inject", "-f", f"{tmp_path}/mesh-")
    assert got == [f"{tmp_path}/mesh-demo"]


def test_follows_the_parser() -> None:
    # A made-up CLI: whatever is registered is what completes.
    parser = argparse.ArgumentParser(prog="tool")
    subs = parser.add_subparsers()
    p = subs.add_parser("frob", help="frobnicate [things]: 'now'")
    p.add_argument("--level", choices=["low", "high"])
    p.add_argument("--config", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("mode", choices=["a", "b"])
    (cmd,) = completion.commands(parser)
    assert cmd.name == "frob" and cmd.positional_choices == ("a", "b")
    by_flag = {o.flags[-1]: o for o in cmd.options}
    assert by_flag["--level"].choices == ("low", "high")
    assert by_flag["--config"].files and not by_flag["--quiet"].takes_value
    assert "frob)" in completion.bash(parser, "tool")
    assert "'frob:frobnicate [things]: '\\''now'\\'''" in completion.zsh(parser, "tool")


def test_unsafe_words_are_refused() -> None:
    parser = argparse.ArgumentParser(prog="tool")
    subs = parser.add_subparsers()
    subs.add_parser("x").add_argument("--pick", choices=["$(reboot)"])
    with pytest.raises(ValueError, match="cannot be completed safely"):
        completion.bash(parser, "tool")


def test_cli_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", "bash"]) == 0
    assert "complete -o default -F _synchro synchro" in capsys.readouterr().out
    assert cli.main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("#compdef synchro\n")


# --- zsh -----------------------------------------------------------------------------------

needs_zsh = pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")


@needs_zsh
def test_zsh_script_parses(tmp_path: Path) -> None:
    path = tmp_path / "_synchro"
    path.write_text(completion.script("zsh", cli.build_parser()))
    subprocess.run(["zsh", "-n", str(path)], check=True, timeout=30)


def zsh_specs(tmp_path: Path, *words: str) -> list[str]:
    """The words `_arguments` (or `_describe`'s list) gets for the command line `words`."""
    script = tmp_path / "_synchro"
    script.write_text(completion.script("zsh", cli.build_parser()))
    state = "command" if len(words) <= 1 else "args"
    quoted = " ".join(f"'{w}'" for w in words)
    program = (
        "_arguments() { if [[ $1 == -C ]]; then state=$MOCK_STATE; "
        'else print -rl -- "$@"; fi }\n'
        '_describe() { print -rl -- "${(@P)${@[-1]}}" }\n'
        f"MOCK_STATE={state}\n"
        f"words=({quoted})\n"
        f"source '{script}'\n"
    )
    done = subprocess.run(
        ["zsh", "-f", "-c", program], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@needs_zsh
def test_zsh_commands_and_specs(tmp_path: Path) -> None:
    listed = zsh_specs(tmp_path, "")
    assert any(line.startswith("install:print the control plane's manifests") for line in listed)
    assert any(line.startswith("explain:") for line in listed)
    specs = zsh_specs(tmp_path, "install", "")
    assert "(-o --output)-o[output format (default\\: yaml)]:output:(yaml json)" in specs
    assert "(-o --output)--output[output format (default\\: yaml)]:output:(yaml json)" in specs
    assert any(s.startswith("--set[") for s in specs)
    assert zsh_specs(tmp_path, "completion", "")[-1] == "*: :(bash zsh)"
