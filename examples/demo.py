"""`sudo make demo`: the shop on the local mesh, with numbers from real traffic.

Brings the mesh up (`synchro up examples/shop`), drives checkouts through the
frontend from inside its Pod, reads every proxy's /metrics before and after,
and prints what the mesh did: requests/s and success per service as callers
saw them (after the mesh's retries) and as the Pods answered (before), the
canary split, mTLS on every edge, and a call the AuthorizationPolicy refuses;
then where to look next. The mesh stays up for exploring until `synchro down`.

`--attach` uses a mesh that is already up instead (`--mesh NAME`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from examples import shopstats
from examples.shopstats import Check, Figures

DEFAULT_MESH = "synchro"
MARK = {True: "\u2714", False: "\u2718"}  # ✔ ✘


def synchro_runner(mesh: str) -> shopstats.Runner:
    def run(pod: str, argv: Sequence[str]) -> str:
        done = subprocess.run(
            ["synchro", "exec", pod, "--mesh", mesh, "--", *argv],
            text=True,
            capture_output=True,
            timeout=300,
            check=False,
        )
        return done.stdout

    return run


def up(mesh: str, dashboard_port: int) -> dict[str, Any] | None:
    """`synchro up`; its progress shows on stderr, its final state comes as JSON."""
    argv = ["synchro", "up", str(shopstats.SHOP), "--mesh", mesh]
    argv += ["--dashboard-port", str(dashboard_port), "-o", "json"]
    done = subprocess.run(argv, text=True, stdout=subprocess.PIPE, timeout=600, check=False)
    if done.returncode != 0:
        return None
    state: dict[str, Any] = json.loads(done.stdout)
    return state


def down_earlier_demo(mesh: str) -> None:
    """A shop left up by an earlier `make demo` is replaced (anything else, `synchro up`
    refuses with its own message)."""
    from synchro.local import mesh as local

    paths = local.MeshPaths(mesh)
    info = local.read_info(paths) if paths.info.exists() else {}
    if info.get("directory") == str(shopstats.SHOP):
        print(f"== synchro down --mesh {mesh} (the shop of an earlier run)", flush=True)
        subprocess.run(["synchro", "down", "--mesh", mesh, "-q"], timeout=120, check=False)


def state_of(mesh: str) -> dict[str, Any]:
    from synchro.local import mesh as local

    return local.read_status(local.resolve_mesh(mesh)) or {}


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100.0 * v:.1f}%"


def render(fig: Figures, checks: Sequence[Check], denied: dict[str, Any]) -> str:
    load = fig.load
    lines = [
        f"\n{load['requests']} checkouts in {load['seconds']} s "
        f"({load['requests_per_second']}/s), each calling catalog, ratings and payments",
        "",
        "Per service: as callers saw it, with the mesh's retries, and as its Pods "
        "answered every try, without them:",
        f"  {'':16} {'-- with retries --':>16}   {'-- without (every try) --':>25}",
        f"  {'SERVICE':16} {'REQ/S':>7} {'SUCCESS':>8}   {'TRIES/S':>7} {'SUCCESS':>8}"
        f" {'RETRIES':>8}",
    ]
    for s in fig.services:
        tries_rps = s.tries / s.seconds if s.seconds else 0.0
        lines.append(
            f"  {s.service:16} {s.rps:7.1f} {pct(s.success):>8}   {tries_rps:7.1f} "
            f"{pct(s.tries_success):>8} {int(s.retries):8d}"
        )
    split = ", ".join(f"{v} {p:.1f}%" for v, p in fig.canary.items())
    lines += ["", f"Canary split of catalog (HTTPRoute 90/10): {split}", ""]
    lines.append("mTLS on every edge (as the receiving proxy saw it):")
    for e in fig.edges:
        lines.append(
            f"  {e.source:>10} -> {e.destination:20} {', '.join(e.security):12} "
            f"{int(e.requests)} req"
        )
    lines += [
        "",
        "A call the AuthorizationPolicy refuses (catalog -> payments, gRPC):",
        f"  {denied.get('status')}: {denied.get('details') or ''}".rstrip(),
        "",
        "Checks:",
    ]
    lines += [f"  {MARK[c.ok]} {c.name}: {c.detail}" for c in checks]
    return "\n".join(lines)


def mesh_flag(mesh: str) -> str:
    """`--mesh NAME` where the commands need it: another name, or other meshes up."""
    from synchro.local import mesh as local

    alone = local.list_meshes() == [mesh]
    return "" if mesh == DEFAULT_MESH and alone else f" --mesh {mesh}"


def next_steps(mesh: str, dashboard: dict[str, Any]) -> str:
    flag = mesh_flag(mesh)
    url = dashboard.get("url") or ""
    if url:
        where = f"{url}  ({'answering now' if answers(url) else 'NOT answering'})"
    else:
        where = f"not on this host: {dashboard.get('error') or 'disabled'}"
    steps = [
        (f"sudo synchro top{flag}", "live requests/s, success and latency per service"),
        ("dashboard", where),
        (f"sudo synchro status{flag}", "every proxy and its config version"),
        (
            f"sudo synchro explain shop/frontend-0 catalog.shop{flag}",
            "route, weights, retries, mTLS, authz",
        ),
        (
            f"sudo synchro explain shop/catalog-v1-0 payments.shop:50051 "
            f"/shop.Payments/Charge -X POST -H content-type:application/grpc{flag}",
            "why it is denied",
        ),
        (f"sudo synchro exec shop/frontend-0{flag} -- curl -s http://catalog.shop/", ""),
        (f"sudo synchro logs shop/ratings-flaky-0 -c synchro-proxy{flag}", ""),
        (
            "edit examples/shop/25-catalog-canary.yaml",
            "the new weights apply within 2 s",
        ),
        (f"sudo synchro down{flag}", "stop and remove everything"),
    ]
    body = "\n".join(f"  {cmd}\n      {what}" if what else f"  {cmd}" for cmd, what in steps)
    return f"\nThe mesh is still up. Where to look next:\n{body}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--mesh", default=DEFAULT_MESH, help="local mesh name")
    parser.add_argument("--dashboard-port", type=int, default=15014)
    parser.add_argument(
        "--attach", action="store_true", help="use the mesh that is up; do not run synchro up"
    )
    args = parser.parse_args(argv)

    if args.attach:
        state = state_of(args.mesh)
    else:
        down_earlier_demo(args.mesh)
        print("== synchro up examples/shop", flush=True)
        started = up(args.mesh, args.dashboard_port)
        if started is None:
            print("synchro up failed; see the message above", file=sys.stderr)
            return 1
        state = started
    refs = [p["ref"] for p in state.get("pods") or [] if p.get("ref", "").startswith("shop/")]
    if "shop/frontend-0" not in refs or "shop/catalog-v1-0" not in refs:
        print(f"the shop is not running in mesh {args.mesh!r}: {refs}", file=sys.stderr)
        return 1

    print(f"\n== {args.requests} checkouts through frontend (from inside its Pod)", flush=True)
    pods = shopstats.Pods("shop/frontend-0", "shop/catalog-v1-0", tuple(refs))
    run = shopstats.collect(
        synchro_runner(args.mesh), pods, requests=args.requests, concurrency=args.concurrency
    )
    fig = run.figures()
    checks = shopstats.checks(fig, run.allowed, run.denied)
    print(render(fig, checks, run.denied))
    print(next_steps(args.mesh, state.get("dashboard") or {}))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
