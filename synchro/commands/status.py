"""`synchro status`: every proxy the controller knows, like `istioctl proxy-status`.

    NAME             WORKLOAD  STATE   VERSION           CONNECTED  LAST NACK
    frontend-1.shop  frontend  SYNCED  5fbe24df15df97ed  yes        -

The controller is `--controller URL` (default `$SYNCHRO_CONTROLLER`, verified
with `--cacert FILE`), else the local mesh's (`synchro up`, root). `-o json|yaml` prints
the API's rows unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from synchro import output
from synchro.commands import CommandError
from synchro.controller_api import ControllerClient, add_controller_flags, client_from_args

COLUMNS = ("NAME", "WORKLOAD", "STATE", "VERSION", "CONNECTED", "LAST NACK")


def _row(p: dict[str, Any]) -> tuple[str, ...]:
    nack = p.get("last_nack")
    nack_text = f"{nack.get('version', '')}: {nack.get('error', '')}" if nack else "-"
    nack_text = " ".join(nack_text.split())  # one row per proxy, whatever the error says
    if len(nack_text) > 60:
        nack_text = nack_text[:57] + "..."
    return (
        str(p.get("proxy", "")),
        str(p.get("workload") or "-"),
        str(p.get("state", "")),
        str(p.get("version") or "-"),
        "yes" if p.get("connected") else "no",
        nack_text,
    )


def render_table(proxies: Sequence[dict[str, Any]]) -> str:
    return output.table(COLUMNS, [_row(p) for p in proxies])


def fetch(client: ControllerClient) -> dict[str, Any]:
    data = client.get("/v1/proxies")
    if not isinstance(data, dict) or not isinstance(data.get("proxies"), list):
        raise CommandError(f"{client.where}/v1/proxies: unexpected answer")
    return data


def cmd_status(args: argparse.Namespace) -> int:
    proxies = fetch(client_from_args(args))["proxies"]
    if args.namespace:
        proxies = [p for p in proxies if p.get("namespace") == args.namespace]
    output.emit(proxies, args.output, table=render_table)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status",
        help="the proxies' config sync state (like istioctl proxy-status)",
        description=__doc__,
        epilog="examples:\n  synchro status --controller https://127.0.0.1:15012 --cacert ca.crt\n"
        "  sudo synchro status -n shop -o json      # the local mesh (synchro up)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_controller_flags(p)
    p.add_argument("-n", "--namespace", help="only proxies in this namespace")
    output.add_output_flag(p)
    p.set_defaults(func=cmd_status)
