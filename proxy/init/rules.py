"""The iptables rules that send a Pod's TCP traffic through its proxy (pure).

Everything here takes text and options and returns text: no subprocesses, no
files. `main.py` feeds it `iptables-save` output and pipes the result into
`iptables-restore --noflush`, so one transaction replaces our rules and leaves
everybody else's alone.

Shape of the `nat` table we write (IPv4 shown; IPv6 uses `::1/128`)::

    PREROUTING -p tcp -> SYNCHRO_INBOUND
        RETURN for the status port, the proxy's own ports and excluded ports
        -> SYNCHRO_IN_REDIRECT (every port, or only the included ones)
    OUTPUT -p tcp -> SYNCHRO_OUTPUT
        RETURN for the proxy's uid and gid (its own traffic is never captured)
        RETURN for excluded outbound ports
        -o lo to a non-loopback address (an app calling its own Pod IP)
            -> SYNCHRO_INBOUND, so it is treated as inbound traffic
        RETURN for whatever else leaves over lo (127.0.0.0/8)
        RETURN for excluded CIDRs
        -> SYNCHRO_REDIRECT (every destination, or only the included CIDRs)
    SYNCHRO_IN_REDIRECT: REDIRECT --to-ports <inbound port>
    SYNCHRO_REDIRECT:    REDIRECT --to-ports <outbound port>
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from proxy import ports
from proxy.init.options import ALL, InterceptOptions, InterceptOptionsError

INBOUND = "SYNCHRO_INBOUND"
IN_REDIRECT = "SYNCHRO_IN_REDIRECT"
OUTPUT = "SYNCHRO_OUTPUT"
REDIRECT = "SYNCHRO_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)

# Built-in chain -> our chain it jumps to. Only TCP is ever captured.
JUMPS = (("PREROUTING", INBOUND), ("OUTPUT", OUTPUT))

_LOOPBACK = {False: "127.0.0.0/8", True: "::1/128"}


def _check_port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InterceptOptionsError(f"{what}: {port!r} is not a port (1-65535)")
    return port


def _check_id(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InterceptOptionsError(f"{what}: {value!r} is not a uid/gid (integer >= 0)")
    return value


def _networks(cidrs: Iterable[str], *, ipv6: bool, what: str) -> list[str]:
    """The CIDRs of one family, normalised; `*` is handled by the caller."""
    out: list[str] = []
    for cidr in cidrs:
        if cidr == ALL:
            continue
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise InterceptOptionsError(f"{what}: {cidr!r} is not a CIDR") from exc
        if (net.version == 6) == ipv6:
            out.append(str(net))
    return list(dict.fromkeys(out))


def proxy_own_ports(options: InterceptOptions) -> tuple[int, ...]:
    """Ports the proxy listens on: redirecting them back into it would loop."""
    own = {options.outbound_port, options.inbound_port, ports.STATUS_PORT, ports.ADMIN_PORT}
    return tuple(sorted(own))


def rules(options: InterceptOptions, *, ipv6: bool = False) -> str:
    """The complete `iptables-restore` text for the `nat` table.

    Declaring a chain in `--noflush` mode empties it, so re-applying this text
    replaces our chains' contents; the jumps from the built-in chains are
    de-duplicated by `reconcile`.
    """
    uid = _check_id(options.proxy_uid, "proxy uid")
    gid = _check_id(options.proxy_gid, "proxy gid")
    out_port = _check_port(options.outbound_port, "outbound port")
    in_port = _check_port(options.inbound_port, "inbound port")
    excluded_in = [_check_port(p, "excluded inbound port") for p in options.exclude_inbound_ports]
    included_in = [_check_port(p, "included inbound port") for p in options.include_inbound_ports]
    excluded_out = [
        _check_port(p, "excluded outbound port") for p in options.exclude_outbound_ports
    ]
    capture_all_out = ALL in options.include_outbound_cidrs
    include_nets = _networks(
        options.include_outbound_cidrs, ipv6=ipv6, what="included outbound CIDR"
    )
    exclude_nets = _networks(
        options.exclude_outbound_cidrs, ipv6=ipv6, what="excluded outbound CIDR"
    )
    loopback = _LOOPBACK[ipv6]

    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in CHAINS]
    lines.append(f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {in_port}")
    lines.append(f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {out_port}")

    bypass_in = sorted(set(excluded_in) | set(proxy_own_ports(options)))
    lines += [f"-A {INBOUND} -p tcp --dport {p} -j RETURN" for p in bypass_in]
    if options.inbound_all:
        lines.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
    else:
        captured = [p for p in dict.fromkeys(included_in) if p not in bypass_in]
        lines += [f"-A {INBOUND} -p tcp --dport {p} -j {IN_REDIRECT}" for p in captured]

    lines.append(f"-A {OUTPUT} -m owner --uid-owner {uid} -j RETURN")
    lines.append(f"-A {OUTPUT} -m owner --gid-owner {gid} -j RETURN")
    lines += [f"-A {OUTPUT} -p tcp --dport {p} -j RETURN" for p in dict.fromkeys(excluded_out)]
    # An app dialling its own Pod IP never leaves the namespace (it goes over
    # lo), so PREROUTING never sees it; hand it to the inbound rules here.
    lines.append(f"-A {OUTPUT} ! -d {loopback} -o lo -j {INBOUND}")
    lines.append(f"-A {OUTPUT} -o lo -j RETURN")
    lines += [f"-A {OUTPUT} -d {net} -j RETURN" for net in exclude_nets]
    if capture_all_out:
        lines.append(f"-A {OUTPUT} -j {REDIRECT}")
    else:
        lines += [f"-A {OUTPUT} -d {net} -j {REDIRECT}" for net in include_nets]

    lines += [f"-A {builtin} -p tcp -j {ours}" for builtin, ours in JUMPS]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --- reading `iptables-save` output -------------------------------------------

_RULE = re.compile(r"^-A (?P<chain>\S+)(?P<spec>.*?)\s(?:-j|-g|--jump|--goto) (?P<target>\S+)")


def nat_section(saved: str) -> list[str]:
    """The rule and chain lines of the `*nat` table in `iptables-save` output."""
    out: list[str] = []
    inside = False
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            inside = line == "*nat"
        elif line == "COMMIT":
            inside = False
        elif inside and line and not line.startswith("#"):
            out.append(line)
    return out


def existing_chains(saved: str) -> list[str]:
    """Our chains present in the saved `nat` table."""
    declared = {line[1:].split()[0] for line in nat_section(saved) if line.startswith(":")}
    return [chain for chain in CHAINS if chain in declared]


def references(saved: str) -> list[str]:
    """Rules in chains that are not ours which jump into ours, as saved.

    These are deleted verbatim (`-A` -> `-D`): the saved form is exactly what
    `-D` matches, whichever spelling created the rule.
    """
    out: list[str] = []
    for line in nat_section(saved):
        m = _RULE.match(line)
        if m and m["target"] in CHAINS and m["chain"] not in CHAINS:
            out.append(line)
    return out


def _delete(rule: str) -> str:
    return "-D" + rule[2:]


def reconcile(desired: str, saved: str) -> str:
    """`desired` (from `rules`) made safe to apply on top of `saved`.

    Existing jumps into our chains are deleted first, in the same transaction,
    so re-running the init leaves exactly one of each.
    """
    deletions = [_delete(rule) for rule in references(saved)]
    lines = desired.splitlines()
    head = lines.index("*nat") + 1
    return "\n".join(lines[:head] + deletions + lines[head:]) + "\n"


def cleanup(saved: str) -> str | None:
    """The `iptables-restore --noflush` text that removes our rules, or None
    when there is nothing of ours in `saved`."""
    deletions = [_delete(rule) for rule in references(saved)]
    chains = existing_chains(saved)
    if not deletions and not chains:
        return None
    lines = ["*nat", *deletions]
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def rule_count(saved: str) -> int:
    """How many rules the saved `nat` table holds (all chains)."""
    return sum(1 for line in nat_section(saved) if line.startswith("-A "))


def has_global_ipv6(if_inet6: str) -> bool:
    """Whether `/proc/net/if_inet6` lists an address of global scope.

    Columns: address, ifindex, prefix length, scope, flags, name; scope 00 is
    global (unique local fd00::/8 addresses are global scope too).
    """
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[3] == "00" and fields[5] != "lo":
            return True
    return False
