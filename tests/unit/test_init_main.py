"""synchro-init's command line, run as a real process, in ways that never touch
this machine's iptables (the real rules are tested in tests/netns)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.init import rules as r
from proxy.init.options import InterceptOptions

OPTIONS = InterceptOptions(exclude_outbound_ports=(22,), exclude_outbound_cidrs=("10.9.0.0/16",))


def run(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "proxy.init.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_dry_run_prints_exactly_the_rules(tmp_path: Path) -> None:
    # An empty PATH proves that a dry run does not need (or call) iptables.
    done = run("--dry-run", "--ipv6", "off", *OPTIONS.to_args(), path=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == r.rules(OPTIONS)


def test_dry_run_with_ipv6_prints_both_families(tmp_path: Path) -> None:
    done = run("--dry-run", "--ipv6", "on", *OPTIONS.to_args(), path=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == r.rules(OPTIONS) + r.rules(OPTIONS, ipv6=True)


@pytest.mark.parametrize(
    "args",
    [
        ["--include-inbound-ports", "80,http"],
        ["--exclude-outbound-ip-ranges", "10.0.0.0/99"],
        ["--outbound-port", "0"],
    ],
)
def test_bad_options_exit_2_with_the_reason(args: list[str], tmp_path: Path) -> None:
    done = run("--dry-run", *args, path=str(tmp_path))
    assert done.returncode == 2
    assert "bad option" in done.stderr


def test_missing_iptables_exits_3_and_names_the_binary(tmp_path: Path) -> None:
    done = run(*OPTIONS.to_args(), "--ipv6", "off", path=str(tmp_path))
    assert done.returncode == 3
    assert "missing iptables" in done.stderr and "iptables-save" in done.stderr
    cleanup = run("--cleanup", "--ipv6", "off", path=str(tmp_path))
    assert cleanup.returncode == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="as root, tests/netns checks this inside a Pod")
def test_missing_permission_exits_4() -> None:
    import shutil

    if shutil.which("iptables-restore") is None:
        pytest.skip("iptables is not installed")
    done = run(*OPTIONS.to_args(), "--ipv6", "off")
    assert done.returncode == 4
    assert "missing permission" in done.stderr
