"""`synchro top`: live golden metrics per service, like `linkerd viz stat`.

    NAMESPACE  SERVICE   REQUESTS/S  SUCCESS  P50     P99
    shop       catalog   41.2        99.5%    2.1 ms  24 ms
    shop       payments  8.0         100%     4.0 ms  9.8 ms

Rates are over the controller's window (10 s by default) from the proxies'
own counters; success means no 5xx and, for gRPC, status OK.

The controller is `--controller URL` (its API, default `$SYNCHRO_CONTROLLER`,
e.g. https://127.0.0.1:15012, or its dashboard listener, e.g.
http://127.0.0.1:15014, which `synchro up` opens on the host), verified with
`--cacert FILE` (default `$SYNCHRO_CONTROLLER_CA`) or not at all with
`--insecure`. Without a URL, the local mesh that `synchro up` started is used
(as root).

In a terminal the table refreshes every 2 s until Ctrl-C; with `--once`, with
`-o json|yaml`, or when the output is not a terminal, it prints once.

"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from synchro import controller_api, output
from synchro.commands import CommandError

EPILOG = """\
examples:
  sudo synchro top                                  # the local mesh, live
  sudo synchro top -n shop --once                   # one table, then exit
  synchro top --controller http://127.0.0.1:15014 -o yaml   # synchro up's dashboard port
  synchro top --controller https://10.0.0.5:15012 --cacert ca.pem -o json
"""

COLUMNS = ("NAMESPACE", "SERVICE", "REQUESTS/S", "SUCCESS", "P50", "P99")
PATHS = ("/v1/golden/services", "/api/services")  # the controller API, the dashboard listener
REFRESH_SECONDS = 2.0
FIRST_DATA_SECONDS = 10.0  # a controller that just started needs two scrapes

Get = Callable[[str], tuple[int, bytes]]


def fmt_rps(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def fmt_success(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 100:.0f}%" if v >= 0.9995 or v == 0 else f"{v * 100:.1f}%"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    return f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"


def render_table(services: list[dict[str, Any]]) -> str:
    rows = [
        (
            s.get("namespace") or "-",
            s.get("name", ""),
            fmt_rps(s.get("rps")),
            fmt_success(s.get("success_rate")),
            fmt_ms(s.get("p50_ms")),
            fmt_ms(s.get("p99_ms")),
        )
        for s in services
    ]
    return output.table(COLUMNS, rows)


def http_getter(base: str, cafile: str | None, insecure: bool, timeout: float = 10.0) -> Get:
    url = base.rstrip("/")
    if "://" not in url:
        url = "https://" + url
    ctx: ssl.SSLContext | None = None
    if url.startswith("https://"):
        ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url + path, context=ctx, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CommandError(f"cannot reach the controller at {url}: {reason}") from None

    return get


def local_getter(mesh: str | None) -> Get:
    """The controller API of the local mesh, from inside its node namespace."""
    from synchro.local import mesh as local

    try:
        paths = local.resolve_mesh(mesh)
        info = local.read_info(paths)
    except local.MeshError as e:
        raise CommandError(
            f"no --controller given (or $SYNCHRO_CONTROLLER) and no local mesh: {e}"
        ) from None
    if os.geteuid() != 0:
        raise CommandError("reading the local mesh's controller needs root (sudo synchro top)")
    ctrl = info.get("controller") or {}
    host, _, port = str(ctrl.get("api", "")).rpartition(":")
    if not host or not port.isdigit():
        raise CommandError(f"{paths.info}: no controller address recorded")
    ca = str(ctrl.get("ca") or "")
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()

    def get(path: str) -> tuple[int, bytes]:
        try:
            return local.netns_request(
                str(info["node_netns"]), "GET", host, int(port), path, context=ctx, timeout=10.0
            )
        except OSError as e:
            raise CommandError(f"cannot reach the local mesh's controller: {e}") from None

    return get


def fetch(get: Get) -> dict[str, Any]:
    """The controller's golden metrics per service: {ready, window_seconds, services}."""
    last = ""
    for path in PATHS:
        status, body = get(path)
        if status == 404:
            last = f"{path}: 404"
            continue
        if status != 200:
            raise CommandError(f"controller answered {status} for {path}: {body[:200]!r}")
        try:
            data = json.loads(body)
        except ValueError:
            raise CommandError(f"{path}: not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("services"), list):
            raise CommandError(f"{path}: unexpected answer")
        return data
    raise CommandError(
        f"the controller serves no golden metrics ({last}); "
        "start synchro-controller with --metrics-listen"
    )


def select(data: dict[str, Any], namespace: str | None) -> list[dict[str, Any]]:
    services = [s for s in data["services"] if isinstance(s, dict)]
    if namespace:
        services = [s for s in services if s.get("namespace") == namespace]
    return services


def first_data(get: Get, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Wait (briefly) for a controller that has not scraped twice yet."""
    deadline = clock() + FIRST_DATA_SECONDS
    data = fetch(get)
    while not data.get("ready", True) and clock() < deadline:
        time.sleep(0.5)
        data = fetch(get)
    return data


def frame(data: dict[str, Any], namespace: str | None, source: str) -> str:
    window = data.get("window_seconds")
    when = time.strftime("%H:%M:%S")
    head = f"synchro top  {source}  " + (
        f"rates over {window:.0f} s  {when}" if window else f"collecting…  {when}"
    )
    services = select(data, namespace)
    body = render_table(services) if services else "no traffic seen yet\n"
    return f"{head}\n\n{body}"


def cmd_top(args: argparse.Namespace) -> int:
    if args.controller:
        get = http_getter(args.controller, args.cacert, args.insecure)
        source = args.controller
    else:
        get = local_getter(args.mesh)
        source = "local mesh"
    data = first_data(get)
    live = args.output == output.TABLE and not args.once and sys.stdout.isatty()
    if not live:
        if not data.get("ready", True):
            print("synchro: the controller has no rates yet (needs two scrapes)", file=sys.stderr)
        services = select(data, args.namespace)
        output.emit(services, args.output, table=render_table)
        return 0
    try:
        while True:
            sys.stdout.write("\x1b[H\x1b[2J" + frame(data, args.namespace, source))
            sys.stdout.flush()
            time.sleep(REFRESH_SECONDS)
            data = fetch(get)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "top",
        help="live golden metrics per service (like linkerd viz stat)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-n", "--namespace", help="only services in this namespace")
    p.add_argument("--once", action="store_true", help="print once and exit")
    output.add_output_flag(p)
    controller_api.add_controller_flags(p)
    p.set_defaults(func=cmd_top)
