"""What synchro-init is told to do: shared by the webhook (which writes the
arguments into the injected init container) and the init (which parses them).

Data only, no I/O: the webhook imports this module.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy import ports

ALL = "*"


class InterceptOptionsError(ValueError):
    """An interception option that does not parse."""


def parse_ports(text: str, *, what: str) -> tuple[int, ...]:
    """`"80,443"` -> (80, 443); empty -> (). Raises with the accepted form."""
    out: list[int] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise InterceptOptionsError(
                f"{what}: {item!r} is not a port; expected comma-separated integers 1-65535"
            )
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def parse_cidrs(text: str, *, what: str) -> tuple[str, ...]:
    """`"10.0.0.0/8,fd00::/8"` -> normalised CIDRs; `"*"` -> ("*",)."""
    out: list[str] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item == ALL:
            out.append(ALL)
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise InterceptOptionsError(
                f"{what}: {item!r} is not a CIDR; expected e.g. 10.0.0.0/8 or fd00::/8"
            ) from exc
    return tuple(dict.fromkeys(out))


def _ports_arg(values: Sequence[int] | str) -> str:
    return values if isinstance(values, str) else ",".join(str(v) for v in values)


@dataclass(frozen=True)
class InterceptOptions:
    """How a Pod's traffic is redirected to its proxy.

    `include_inbound_ports` is `("*",)`-like via `inbound_all=True`: every inbound
    port is captured except `exclude_inbound_ports`; otherwise only the listed ones.
    Outbound: every destination is captured except excluded ports and CIDRs; if
    `include_outbound_cidrs` is not `("*",)`, only those CIDRs are captured.
    """

    proxy_uid: int = ports.PROXY_UID
    proxy_gid: int = ports.PROXY_GID
    outbound_port: int = ports.OUTBOUND_CAPTURE_PORT
    inbound_port: int = ports.INBOUND_CAPTURE_PORT
    inbound_all: bool = True
    include_inbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = (ports.STATUS_PORT,)
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_cidrs: tuple[str, ...] = (ALL,)
    exclude_outbound_cidrs: tuple[str, ...] = field(default=())

    def to_args(self) -> list[str]:
        """The init container's `args`, in a stable order."""
        return [
            "--proxy-uid", str(self.proxy_uid),
            "--proxy-gid", str(self.proxy_gid),
            "--outbound-port", str(self.outbound_port),
            "--inbound-port", str(self.inbound_port),
            "--include-inbound-ports",
            ALL if self.inbound_all else _ports_arg(self.include_inbound_ports),
            "--exclude-inbound-ports", _ports_arg(self.exclude_inbound_ports),
            "--exclude-outbound-ports", _ports_arg(self.exclude_outbound_ports),
            "--include-outbound-ip-ranges", ",".join(self.include_outbound_cidrs),
            "--exclude-outbound-ip-ranges", ",".join(self.exclude_outbound_cidrs),
        ]  # fmt: skip

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        d = cls()
        parser.add_argument("--proxy-uid", type=int, default=d.proxy_uid)
        parser.add_argument("--proxy-gid", type=int, default=d.proxy_gid)
        parser.add_argument("--outbound-port", type=int, default=d.outbound_port)
        parser.add_argument("--inbound-port", type=int, default=d.inbound_port)
        parser.add_argument("--include-inbound-ports", default=ALL)
        parser.add_argument("--exclude-inbound-ports", default=_ports_arg(d.exclude_inbound_ports))
        parser.add_argument("--exclude-outbound-ports", default="")
        parser.add_argument("--include-outbound-ip-ranges", default=ALL)
        parser.add_argument("--exclude-outbound-ip-ranges", default="")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> InterceptOptions:
        include_in = ns.include_inbound_ports.strip()
        inbound_all = include_in == ALL
        return cls(
            proxy_uid=ns.proxy_uid,
            proxy_gid=ns.proxy_gid,
            outbound_port=ns.outbound_port,
            inbound_port=ns.inbound_port,
            inbound_all=inbound_all,
            include_inbound_ports=()
            if inbound_all
            else parse_ports(include_in, what="--include-inbound-ports"),
            exclude_inbound_ports=parse_ports(
                ns.exclude_inbound_ports, what="--exclude-inbound-ports"
            ),
            exclude_outbound_ports=parse_ports(
                ns.exclude_outbound_ports, what="--exclude-outbound-ports"
            ),
            include_outbound_cidrs=parse_cidrs(
                ns.include_outbound_ip_ranges, what="--include-outbound-ip-ranges"
            ),
            exclude_outbound_cidrs=parse_cidrs(
                ns.exclude_outbound_ip_ranges, what="--exclude-outbound-ip-ranges"
            ),
        )

    @classmethod
    def from_args(cls, argv: Sequence[str]) -> InterceptOptions:
        parser = argparse.ArgumentParser(add_help=False)
        cls.add_arguments(parser)
        ns, _ = parser.parse_known_args(list(argv))
        return cls.from_namespace(ns)
