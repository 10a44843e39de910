"""`synchro-init`: write, or remove, the Pod's traffic interception rules.

A thin adapter around `proxy.init.rules`: read the current `nat` table with
`iptables-save`, pipe the new rules into `iptables-restore --noflush` (one
atomic transaction; other tools' rules survive), then exit. Runs once as the
Pod's init container, as root with NET_ADMIN.

Exit codes say what went wrong, so the Pod's init fails visibly:
0 ok, 1 iptables refused the rules, 2 bad arguments, 3 iptables binaries
missing, 4 missing permission (not root / no NET_ADMIN).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.init import rules as rules_core
from proxy.init.options import InterceptOptions, InterceptOptionsError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_IPTABLES_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_IPTABLES = 3
EXIT_NO_PERMISSION = 4

CAP_NET_ADMIN = 12
_PERMISSION_MARKERS = ("permission denied", "you must be root", "operation not permitted")


class InitError(Exception):
    """A failure of synchro-init; `exit_code` tells the kind."""

    exit_code = EXIT_IPTABLES_FAILED


class MissingIptables(InitError):
    exit_code = EXIT_NO_IPTABLES


class MissingPermission(InitError):
    exit_code = EXIT_NO_PERMISSION


class IptablesFailed(InitError):
    exit_code = EXIT_IPTABLES_FAILED


@dataclass(frozen=True)
class Family:
    name: str
    ipv6: bool
    save: str
    restore: str


IPV4 = Family("IPv4", False, "iptables-save", "iptables-restore")
IPV6 = Family("IPv6", True, "ip6tables-save", "ip6tables-restore")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingIptables(
            f"missing iptables: {name!r} is not on PATH; install the iptables package "
            "(the synchro image ships it)"
        )
    return path


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except PermissionError as exc:
        raise MissingPermission(f"missing permission: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        if any(marker in err.lower() for marker in _PERMISSION_MARKERS):
            raise MissingPermission(
                f"missing permission: {Path(argv[0]).name} was refused ({err}); "
                "synchro-init needs root with the NET_ADMIN and NET_RAW capabilities"
            )
        raise IptablesFailed(f"{Path(argv[0]).name} failed: {err}")
    return proc.stdout


def has_net_admin(status: str) -> bool:
    """Whether a `/proc/<pid>/status` text shows CAP_NET_ADMIN in effect."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _check_permission() -> None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return  # not Linux-like; let iptables itself say no
    if not has_net_admin(status):
        raise MissingPermission(
            "missing permission: synchro-init needs root with the NET_ADMIN and NET_RAW "
            "capabilities to write iptables rules"
        )


def _detect_ipv6() -> bool:
    try:
        return rules_core.has_global_ipv6(Path("/proc/net/if_inet6").read_text())
    except OSError:
        return False  # IPv6 disabled in this namespace


def _families(mode: str) -> list[Family]:
    if mode == "on" or (mode == "auto" and _detect_ipv6()):
        return [IPV4, IPV6]
    return [IPV4]


def _apply(options: InterceptOptions, families: list[Family]) -> str:
    # Resolve every binary before touching anything: a half-written Pod is worse.
    binaries = {fam.name: (_binary(fam.save), _binary(fam.restore)) for fam in families}
    _check_permission()
    texts = [rules_core.rules(options, ipv6=fam.ipv6) for fam in families]
    for fam, desired in zip(families, texts, strict=True):
        save, restore = binaries[fam.name]
        current = _run([save, "-t", "nat"])
        _run([restore, "--noflush"], rules_core.reconcile(desired, current))
        log.info("wrote %s interception rules", fam.name)
    return "".join(texts)


def _cleanup(mode: str, *, dry_run: bool) -> str:
    families = [IPV4] if mode == "off" else [IPV4, IPV6]
    out = []
    for fam in families:
        optional = fam.ipv6 and mode == "auto"
        if optional and shutil.which(fam.save) is None:
            continue
        save, restore = _binary(fam.save), _binary(fam.restore)
        if not dry_run:
            _check_permission()
        text = rules_core.cleanup(_run([save, "-t", "nat"]))
        if text is None:
            log.info("no %s interception rules to remove", fam.name)
            continue
        out.append(text)
        if not dry_run:
            _run([restore, "--noflush"], text)
            log.info("removed %s interception rules", fam.name)
    return "".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synchro-init",
        description="Redirect the Pod's TCP traffic to the synchro proxy with iptables.",
    )
    InterceptOptions.add_arguments(parser)
    parser.add_argument(
        "--dry-run", action="store_true", help="print the rules instead of writing them"
    )
    parser.add_argument(
        "--cleanup", action="store_true", help="remove the rules and chains synchro-init wrote"
    )
    parser.add_argument(
        "--ipv6",
        choices=("auto", "on", "off"),
        default="auto",
        help="also write ip6tables rules: auto = when the namespace has a global IPv6 address",
    )
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cleanup:
            sys.stdout.write(_cleanup(args.ipv6, dry_run=args.dry_run))
            return EXIT_OK
        options = InterceptOptions.from_namespace(args)
        families = _families(args.ipv6)
        if args.dry_run:
            for fam in families:
                sys.stdout.write(rules_core.rules(options, ipv6=fam.ipv6))
            return EXIT_OK
        sys.stdout.write(_apply(options, families))
        return EXIT_OK
    except InterceptOptionsError as exc:
        log.error("bad option: %s", exc)
        return EXIT_USAGE
    except InitError as exc:
        log.error("%s", exc)
        return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="synchro-init: %(levelname)s %(message)s")
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
