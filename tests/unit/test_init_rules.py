"""The pure iptables rules core of synchro-init.

Besides the text itself, a tiny evaluator walks the generated chains for a
connection (the subset of iptables the rules use), so the properties the Pod
relies on are checked for arbitrary options with hypothesis.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.init import rules as r
from proxy.init.main import has_net_admin
from proxy.init.options import ALL, InterceptOptions, InterceptOptionsError

# --- a minimal evaluator of the generated nat rules --------------------------------


@dataclass(frozen=True)
class Conn:
    dst: str
    dport: int
    uid: int = 0
    gid: int = 0
    out_iface: str = "eth0"


def _chains(text: str) -> dict[str, list[list[str]]]:
    chains: dict[str, list[list[str]]] = {"PREROUTING": [], "OUTPUT": []}
    for line in r.nat_section(text):
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            words = shlex.split(line)
            chains.setdefault(words[1], []).append(words[2:])
    return chains


def _matches(spec: list[str], conn: Conn) -> bool:
    i, negate = 0, False
    while i < len(spec):
        word = spec[i]
        if word == "!":
            negate, i = True, i + 1
            continue
        if word in ("-j", "-g"):
            return True
        if word == "-m":
            i += 2
            continue
        value = spec[i + 1]
        if word == "-p":
            ok = value == "tcp"
        elif word == "--dport":
            ok = conn.dport == int(value)
        elif word == "-d":
            ok = ipaddress.ip_address(conn.dst) in ipaddress.ip_network(value)
        elif word == "-o":
            ok = conn.out_iface == value
        elif word == "--uid-owner":
            ok = conn.uid == int(value)
        elif word == "--gid-owner":
            ok = conn.gid == int(value)
        else:
            raise AssertionError(f"evaluator does not know {word}")
        if ok == negate:
            return False
        negate, i = False, i + 2
    return True


def _walk(chains: dict[str, list[list[str]]], chain: str, conn: Conn) -> str | None:
    """The REDIRECT port reached from `chain`, "ACCEPT" at the end of a built-in
    chain, or None when a user chain returns."""
    for spec in chains[chain]:
        if not _matches(spec, conn):
            continue
        target = spec[spec.index("-j") + 1]
        if target == "RETURN":
            return None
        if target == "REDIRECT":
            return spec[spec.index("--to-ports") + 1]
        verdict = _walk(chains, target, conn)
        if verdict is not None:
            return verdict
    return None


def outbound(text: str, conn: Conn) -> int | None:
    """Where a connection from a local process ends up: a port, or None (not captured)."""
    verdict = _walk(_chains(text), "OUTPUT", conn)
    return None if verdict is None else int(verdict)


def inbound(text: str, conn: Conn) -> int | None:
    verdict = _walk(_chains(text), "PREROUTING", conn)
    return None if verdict is None else int(verdict)


# --- the text ---------------------------------------------------------------------

POD_IP = "10.1.2.3"
PEER = "10.1.2.4"


def test_default_rules_capture_everything_but_what_must_bypass() -> None:
    text = r.rules(InterceptOptions())
    assert text.startswith("*nat\n") and text.endswith("COMMIT\n")
    for chain in r.CHAINS:
        assert f":{chain} - [0:0]" in text
    assert "-A PREROUTING -p tcp -j SYNCHRO_INBOUND" in text
    assert "-A OUTPUT -p tcp -j SYNCHRO_OUTPUT" in text
    assert outbound(text, Conn(PEER, 80)) == 15001
    assert outbound(text, Conn(PEER, 80, uid=1337)) is None
    assert outbound(text, Conn(PEER, 80, gid=1337)) is None
    assert outbound(text, Conn("127.0.0.1", 80, out_iface="lo")) is None
    assert outbound(text, Conn(POD_IP, 80, out_iface="lo")) == 15006
    assert outbound(text, Conn(POD_IP, 80, uid=1337, out_iface="lo")) is None
    assert inbound(text, Conn(POD_IP, 80)) == 15006
    for port in (15020, 15001, 15006, 15000):
        assert inbound(text, Conn(POD_IP, port)) is None
        assert outbound(text, Conn(POD_IP, port, out_iface="lo")) is None


def test_the_rules_are_stable_text() -> None:
    text = r.rules(InterceptOptions(exclude_outbound_ports=(22,)))
    output = [line for line in text.splitlines() if line.startswith("-A SYNCHRO_OUTPUT")]
    assert output == [
        "-A SYNCHRO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A SYNCHRO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A SYNCHRO_OUTPUT -p tcp --dport 22 -j RETURN",
        "-A SYNCHRO_OUTPUT ! -d 127.0.0.0/8 -o lo -j SYNCHRO_INBOUND",
        "-A SYNCHRO_OUTPUT -o lo -j RETURN",
        "-A SYNCHRO_OUTPUT -j SYNCHRO_REDIRECT",
    ]
    assert r.rules(InterceptOptions()) == r.rules(InterceptOptions())


def test_custom_ports_and_identity() -> None:
    opts = InterceptOptions(proxy_uid=2000, proxy_gid=2001, outbound_port=16001, inbound_port=16006)
    text = r.rules(opts)
    assert "--uid-owner 2000" in text and "--gid-owner 2001" in text
    assert outbound(text, Conn(PEER, 80)) == 16001
    assert inbound(text, Conn(POD_IP, 80)) == 16006
    assert inbound(text, Conn(POD_IP, 16001)) is None  # its own ports bypass
    assert outbound(text, Conn(PEER, 80, uid=1337)) == 16001


def test_only_included_inbound_ports() -> None:
    opts = InterceptOptions(inbound_all=False, include_inbound_ports=(80, 15020, 9000))
    text = r.rules(opts)
    assert inbound(text, Conn(POD_IP, 80)) == 15006
    assert inbound(text, Conn(POD_IP, 9000)) == 15006
    assert inbound(text, Conn(POD_IP, 81)) is None
    assert inbound(text, Conn(POD_IP, 15020)) is None  # excluded beats included
    nothing = r.rules(InterceptOptions(inbound_all=False))
    assert inbound(nothing, Conn(POD_IP, 80)) is None
    assert outbound(nothing, Conn(POD_IP, 80, out_iface="lo")) is None


def test_outbound_cidrs_and_ports() -> None:
    opts = InterceptOptions(
        include_outbound_cidrs=("10.0.0.0/8", "fd00::/8"),
        exclude_outbound_cidrs=("10.9.0.0/16",),
        exclude_outbound_ports=(5432,),
    )
    text = r.rules(opts)
    assert outbound(text, Conn("10.1.1.1", 80)) == 15001
    assert outbound(text, Conn("10.9.1.1", 80)) is None
    assert outbound(text, Conn("192.168.1.1", 80)) is None
    assert outbound(text, Conn("10.1.1.1", 5432)) is None
    assert "fd00::/8" not in text  # IPv6 ranges only in the IPv6 rules


def test_ipv6_rules() -> None:
    opts = InterceptOptions(
        include_outbound_cidrs=("10.0.0.0/8", "fd00::/8"),
        exclude_outbound_cidrs=("fd00:1::/32", "10.9.0.0/16"),
    )
    text = r.rules(opts, ipv6=True)
    assert "10.0.0.0/8" not in text and "10.9.0.0/16" not in text
    assert outbound(text, Conn("fd00:2::1", 80)) == 15001
    assert outbound(text, Conn("fd00:1::1", 80)) is None
    assert outbound(text, Conn("2001:db8::1", 80)) is None
    assert outbound(text, Conn("::1", 80, out_iface="lo")) is None
    assert outbound(text, Conn("fd00:2::9", 80, out_iface="lo")) == 15006
    everything = r.rules(InterceptOptions(), ipv6=True)
    assert outbound(everything, Conn("2001:db8::1", 443)) == 15001


@pytest.mark.parametrize(
    "options",
    [
        InterceptOptions(outbound_port=0),
        InterceptOptions(inbound_port=70000),
        InterceptOptions(exclude_inbound_ports=(-1,)),
        InterceptOptions(proxy_uid=-5),
        InterceptOptions(include_outbound_cidrs=("10.0.0.0/33",)),
        InterceptOptions(exclude_outbound_cidrs=("not-a-cidr",)),
    ],
)
def test_bad_options_are_refused_with_a_message(options: InterceptOptions) -> None:
    with pytest.raises(InterceptOptionsError, match=r"\S"):
        r.rules(options)


def test_arguments_round_trip() -> None:
    opts = InterceptOptions(
        inbound_all=False,
        include_inbound_ports=(80, 443),
        exclude_inbound_ports=(15020, 9000),
        exclude_outbound_ports=(22,),
        include_outbound_cidrs=("10.0.0.0/8",),
        exclude_outbound_cidrs=("10.9.0.0/16", "fd00::/8"),
    )
    assert InterceptOptions.from_args(opts.to_args()) == opts


# --- reading iptables-save ---------------------------------------------------------

SAVED = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j SYNCHRO_OUTPUT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:SYNCHRO_INBOUND - [0:0]
:SYNCHRO_IN_REDIRECT - [0:0]
:SYNCHRO_OUTPUT - [0:0]
:SYNCHRO_REDIRECT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j SYNCHRO_INBOUND
-A OUTPUT -p udp -m udp --dport 53 -j RETURN
-A OUTPUT -p tcp -j SYNCHRO_OUTPUT
-A OUTPUT -p tcp -j SYNCHRO_OUTPUT
-A OTHER -g SYNCHRO_REDIRECT
-A SYNCHRO_INBOUND -p tcp -j SYNCHRO_IN_REDIRECT
-A SYNCHRO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
COMMIT
"""


def test_references_are_the_jumps_into_our_chains_from_elsewhere() -> None:
    assert r.references(SAVED) == [
        "-A PREROUTING -p tcp -j SYNCHRO_INBOUND",
        "-A OUTPUT -p tcp -j SYNCHRO_OUTPUT",
        "-A OUTPUT -p tcp -j SYNCHRO_OUTPUT",
        "-A OTHER -g SYNCHRO_REDIRECT",
    ]
    assert r.existing_chains(SAVED) == list(r.CHAINS)
    assert r.rule_count(SAVED) == 7


def test_reconcile_deletes_old_jumps_in_the_same_transaction() -> None:
    desired = r.rules(InterceptOptions())
    text = r.reconcile(desired, SAVED)
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert lines[1:5] == [
        "-D PREROUTING -p tcp -j SYNCHRO_INBOUND",
        "-D OUTPUT -p tcp -j SYNCHRO_OUTPUT",
        "-D OUTPUT -p tcp -j SYNCHRO_OUTPUT",
        "-D OTHER -g SYNCHRO_REDIRECT",
    ]
    assert lines[5:] == desired.splitlines()[1:]
    assert r.reconcile(desired, "") == desired


def test_cleanup_removes_jumps_then_chains_and_nothing_else() -> None:
    text = r.cleanup(SAVED)
    assert text is not None
    lines = text.splitlines()
    assert "-D OUTPUT -p tcp -j SYNCHRO_OUTPUT" in lines
    assert not any("--dport 53" in line for line in lines)
    assert [line for line in lines if line.startswith("-X")] == [f"-X {c}" for c in r.CHAINS]
    assert lines.index("-F SYNCHRO_OUTPUT") < lines.index("-X SYNCHRO_INBOUND")
    empty = "*nat\n:PREROUTING ACCEPT [0:0]\n-A OUTPUT -j RETURN\nCOMMIT\n"
    assert r.cleanup(empty) is None


def test_global_ipv6_detection() -> None:
    link_local_only = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe80000000000000a8bbccfffedd0011 02 40 20 80     eth0\n"
    )
    assert not r.has_global_ipv6(link_local_only)
    assert r.has_global_ipv6(
        link_local_only + "fd00005e000100000000000000000002 02 40 00 80 eth0\n"
    )
    assert not r.has_global_ipv6("")


def test_net_admin_capability() -> None:
    assert has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not has_net_admin("CapEff:\t0000000000000000\n")
    assert has_net_admin("CapEff:\t0000000000001000\n")
    assert not has_net_admin("CapEff:\t0000000000002000\n")


# --- properties for arbitrary options ----------------------------------------------

port_st = st.integers(1, 65535)
v4_cidr = st.builds(
    lambda a, n: str(ipaddress.ip_network((a, n), strict=False)),
    st.integers(0, 2**32 - 1),
    st.integers(8, 32),
)
options_st = st.builds(
    InterceptOptions,
    proxy_uid=st.integers(0, 70000),
    proxy_gid=st.integers(0, 70000),
    outbound_port=port_st,
    inbound_port=port_st,
    inbound_all=st.booleans(),
    include_inbound_ports=st.lists(port_st, max_size=4).map(tuple),
    exclude_inbound_ports=st.lists(port_st, max_size=4).map(tuple),
    exclude_outbound_ports=st.lists(port_st, max_size=4).map(tuple),
    include_outbound_cidrs=st.one_of(st.just((ALL,)), st.lists(v4_cidr, max_size=3).map(tuple)),
    exclude_outbound_cidrs=st.lists(v4_cidr, max_size=3).map(tuple),
)
conn_st = st.builds(
    Conn,
    dst=st.builds(lambda a: str(ipaddress.IPv4Address(a)), st.integers(0, 2**32 - 1)),
    dport=port_st,
    uid=st.integers(0, 70000),
    gid=st.integers(0, 70000),
    out_iface=st.sampled_from(["eth0", "lo"]),
).map(lambda c: replace(c, out_iface="lo") if c.dst.startswith("127.") else c)


@given(options_st, conn_st)
def test_what_the_pod_relies_on_holds_for_any_options(opts: InterceptOptions, conn: Conn) -> None:
    text = r.rules(opts)
    own = r.proxy_own_ports(opts)
    out = outbound(text, conn)
    if conn.uid == opts.proxy_uid or conn.gid == opts.proxy_gid:
        assert out is None  # the proxy's own traffic is never captured
    if conn.dport in opts.exclude_outbound_ports:
        assert out is None
    if ipaddress.ip_address(conn.dst) in ipaddress.ip_network("127.0.0.0/8"):
        assert out is None
    if conn.out_iface == "lo":
        # Only ever into the inbound listener, and only as inbound traffic would be.
        assert out in (None, opts.inbound_port)
        if out is not None:
            assert inbound(text, conn) == opts.inbound_port
    elif out is not None:
        assert out == opts.outbound_port
        assert not any(
            ipaddress.ip_address(conn.dst) in ipaddress.ip_network(c)
            for c in opts.exclude_outbound_cidrs
        )
    if ALL in opts.include_outbound_cidrs and conn.out_iface == "eth0":
        excluded = (
            conn.uid == opts.proxy_uid
            or conn.gid == opts.proxy_gid
            or conn.dport in opts.exclude_outbound_ports
            or any(
                ipaddress.ip_address(conn.dst) in ipaddress.ip_network(c)
                for c in opts.exclude_outbound_cidrs
            )
        )
        assert (out is None) == excluded

    got_in = inbound(text, conn)
    if conn.dport in own or conn.dport in opts.exclude_inbound_ports:
        assert got_in is None
    elif opts.inbound_all or conn.dport in opts.include_inbound_ports:
        assert got_in == opts.inbound_port
    else:
        assert got_in is None
