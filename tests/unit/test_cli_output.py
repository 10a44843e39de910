"""The CLI's output switch and its shared flags, the same in every command.

- `-o json` and `-o yaml` print the same data (yaml.safe_load of one equals
  json.loads of the other), tables for people by default: for arbitrary data
  (hypothesis) and for real commands reading a real HTTP controller API on
  127.0.0.1 (`synchro status`, `synchro top --once`).
- The controller's CA is `--cacert` wherever a command talks to a controller;
  `--ca` still works (hidden).
- Shell completion offers the new flags (`up --dashboard-port`, `top --cacert`,
  `-o yaml`).
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from synchro import cli, output
from synchro.commands import completion, up

PROXIES = {
    "proxies": [
        {
            "proxy": "frontend-0.shop",
            "namespace": "shop",
            "pod": "frontend-0",
            "workload": "frontend",
            "state": "SYNCED",
            "version": "5fbe24df15df97ed",
            "connected": True,
            "last_nack": None,
        },
        {
            "proxy": "payments-0.shop",
            "namespace": "shop",
            "pod": "payments-0",
            "workload": "payments",
            "state": "STALE",
            "version": "",
            "connected": False,
            "last_nack": {"version": "ab12", "error": "bad route:\nline 2"},
        },
    ]
}
GOLDEN = {
    "ready": True,
    "window_seconds": 10.0,
    "services": [
        {"namespace": "shop", "name": "catalog", "requests": 412.0, "rps": 41.2,
         "success_rate": 0.995, "p50_ms": 2.1, "p99_ms": 24.0},
        {"namespace": "shop", "name": "payments", "requests": 0.0, "rps": 0.0,
         "success_rate": None, "p50_ms": None, "p99_ms": None},
    ],
}  # fmt: skip


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


# --- the switch itself --------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500)
@given(json_values)
def test_yaml_and_json_carry_the_same_data(data: Any) -> None:
    as_json = json.loads(output.render(data, output.JSON))
    assert yaml.safe_load(output.render(data, output.YAML)) == as_json


def test_tricky_strings_stay_strings_in_yaml() -> None:
    data = {"a": "yes", "b": "null", "c": "1.0", "d": "0o17", "e": "line\n  indented\n", "f": ""}
    assert yaml.safe_load(output.to_yaml(data)) == data


# --- real commands against a real HTTP controller API -------------------------------------


class _Api(BaseHTTPRequestHandler):
    routes = {"/v1/proxies": PROXIES, "/v1/golden/services": GOLDEN}

    def do_GET(self) -> None:
        body = self.routes.get(self.path)
        raw = json.dumps(body if body is not None else {"error": "not found"}).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def controller() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    out: str = capsys.readouterr().out
    return out


@pytest.mark.parametrize(
    ("command", "expected", "header"),
    [
        (("status",), PROXIES["proxies"], ["NAME", "WORKLOAD", "STATE", "VERSION"]),
        (("top", "--once"), GOLDEN["services"], ["NAMESPACE", "SERVICE", "REQUESTS/S"]),
    ],
)
def test_commands_print_the_same_data_as_json_and_yaml(
    controller: str,
    capsys: pytest.CaptureFixture[str],
    command: tuple[str, ...],
    expected: Any,
    header: list[str],
) -> None:
    base = (*command, "--controller", controller)
    as_json = json.loads(run(capsys, *base, "-o", "json"))
    as_yaml = yaml.safe_load(run(capsys, *base, "-o", "yaml"))
    assert as_json == as_yaml == expected
    table = run(capsys, *base)  # for people, by default
    assert table.splitlines()[0].split()[: len(header)] == header
    assert len(table.splitlines()) == 1 + len(expected)


def test_top_takes_the_old_ca_spelling_too(
    controller: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(
        capsys, "top", "--once", "--controller", controller, "--ca", "/nonexistent", "-o", "json"
    )
    assert json.loads(out) == GOLDEN["services"]  # http: the CA is not read


# --- every command alike -----------------------------------------------------------------


def test_commands_with_a_table_also_speak_json_and_yaml() -> None:
    for name, parser in subcommands().items():
        flag = option(parser, "--output")
        if flag is None or flag.default != output.TABLE:
            continue
        assert set(flag.choices or ()) == set(output.FORMATS), name
    for name in ("up", "status", "top", "explain", "check"):
        flag = option(subcommands()[name], "--output")
        assert flag is not None and output.YAML in (flag.choices or ()), name


def test_the_controller_ca_flag_is_cacert_everywhere() -> None:
    talking = {n: p for n, p in subcommands().items() if option(p, "--controller")}
    assert {"status", "top", "explain", "check"} <= set(talking)
    for name, parser in talking.items():
        cacert = option(parser, "--cacert")
        assert cacert is not None and cacert.dest == "cacert", name
        ca = option(parser, "--ca")
        # `--ca` is an alias of `--cacert`, not shown in --help.
        assert ca is None or (ca.dest == "cacert" and ca.help == argparse.SUPPRESS), name
        assert "--ca " not in parser.format_help().replace("--cacert", ""), name
    args = cli.build_parser().parse_args(["top", "--ca", "x.pem"])
    assert args.cacert == "x.pem"


def test_up_flags_and_its_dashboard_line() -> None:
    args = cli.build_parser().parse_args(["up", "dir", "--dashboard-port", "0", "-o", "yaml"])
    assert (args.dashboard_port, args.output) == (0, "yaml")
    assert up.dashboard_line({"dashboard": {"url": "http://127.0.0.1:15014/", "error": ""}}) == (
        "dashboard: http://127.0.0.1:15014/"
    )
    taken = up.dashboard_line(
        {"dashboard": {"url": "", "error": "127.0.0.1:15014 is already in use"}}
    )
    assert "not exposed" in taken and "already in use" in taken
    assert "off" in up.dashboard_line({"dashboard": {"url": "", "error": ""}})


def test_completion_offers_the_new_flags(tmp_path: Path) -> None:
    from tests.unit.test_completion import complete_bash

    script = tmp_path / "synchro.bash"
    script.write_text(completion.script("bash", cli.build_parser()))
    assert "--dashboard-port" in complete_bash(script, "synchro", "up", "--da")
    assert complete_bash(script, "synchro", "up", "-o", "") == ["table", "json", "yaml"]
    top = complete_bash(script, "synchro", "top", "--")
    assert "--cacert" in top and "--ca" not in top and "--mesh" in top
    assert complete_bash(script, "synchro", "top", "--cacert", "") is not None
    zsh = completion.script("zsh", cli.build_parser())
    assert "--dashboard-port" in zsh
