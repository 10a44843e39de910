"""Authorization: Istio `security.istio.io/v1` AuthorizationPolicy semantics as a
pure core. `compile_policy` turns a policy's spec into frozen matchers once per
config; `decide(policies, request)` answers Allow or Deny(reason) per request.

Evaluation (as Istio): any matching DENY policy denies; otherwise, if any ALLOW
policy applies to the workload, the request must match one of them; otherwise
allow. AUDIT policies never change the decision; their matches are reported.
Within a rule, `from`, `to` and `when` must all match; a list of sources or
operations matches if any entry does; inside an entry every given field must
match; `not*` fields must not. L7-only fields (methods, paths, hosts, request
headers) cannot be evaluated on plain TCP: an ALLOW rule using them never
matches there and a DENY rule ignores them, so both fail closed, as Istio does.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuthzPolicyError(ValueError):
    """A policy that cannot be compiled; the message names the field."""


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is calling: the mTLS identity (SPIFFE ID without `spiffe://`, e.g.
    `cluster.local/ns/shop/sa/frontend`), its namespace, and its IP."""

    principal: str | None
    namespace: str | None
    ip: str


@dataclass(frozen=True, slots=True)
class Request:
    port: int
    protocol: str = "http"  # "http" (HTTP/1, HTTP/2, gRPC) or "tcp"
    method: str = ""
    path: str = ""
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names


@dataclass(frozen=True, slots=True)
class Allow:
    audited_by: tuple[str, ...] = ()
    policy: str | None = None


@dataclass(frozen=True, slots=True)
class Deny:
    reason: str
    policy: str | None = None
    audited_by: tuple[str, ...] = ()


Decision = Allow | Deny

# ---- string matching: exact, "prefix*", "*suffix", "*" ----------------------


def _string_matcher(pattern: str) -> Callable[[str], bool]:
    if pattern == "*":
        return lambda value: value != ""
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return lambda value: value.startswith(prefix)
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return lambda value: value.endswith(suffix)
    return lambda value: value == pattern


@dataclass(frozen=True)
class _Strings:
    """Any-of string patterns; `None` when the field was not given."""

    patterns: tuple[str, ...]
    matchers: tuple[Callable[[str], bool], ...]
    fold_case: bool = False

    @classmethod
    def build(cls, values: Sequence[str] | None, *, fold_case: bool = False) -> _Strings | None:
        if values is None:
            return None
        pats = tuple(v.lower() if fold_case else v for v in values)
        return cls(pats, tuple(_string_matcher(p) for p in pats), fold_case)

    def match(self, value: str | None) -> bool:
        if value is None:
            return False
        v = value.lower() if self.fold_case else value
        return any(m(v) for m in self.matchers)


def _present_and_match(
    positive: _Strings | None, negative: _Strings | None, value: str | None
) -> bool:
    if positive is not None and not positive.match(value):
        return False
    return not (negative is not None and negative.match(value))


# ---- compiled pieces --------------------------------------------------------


@dataclass(frozen=True)
class Source:
    principals: _Strings | None = None
    not_principals: _Strings | None = None
    namespaces: _Strings | None = None
    not_namespaces: _Strings | None = None
    ip_blocks: tuple[IpNetwork, ...] | None = None
    not_ip_blocks: tuple[IpNetwork, ...] | None = None

    def match(self, peer: Peer) -> bool:
        if not _present_and_match(self.principals, self.not_principals, peer.principal):
            return False
        if not _present_and_match(self.namespaces, self.not_namespaces, peer.namespace):
            return False
        if self.ip_blocks is not None or self.not_ip_blocks is not None:
            try:
                ip = ipaddress.ip_address(peer.ip)
            except ValueError:
                return False
            if self.ip_blocks is not None and not any(ip in n for n in self.ip_blocks):
                return False
            if self.not_ip_blocks is not None and any(ip in n for n in self.not_ip_blocks):
                return False
        return True


@dataclass(frozen=True)
class Operation:
    hosts: _Strings | None = None
    not_hosts: _Strings | None = None
    ports: frozenset[int] | None = None
    not_ports: frozenset[int] | None = None
    methods: _Strings | None = None
    not_methods: _Strings | None = None
    paths: _Strings | None = None
    not_paths: _Strings | None = None

    @property
    def uses_l7(self) -> bool:
        return any(
            f is not None
            for f in (
                self.hosts,
                self.not_hosts,
                self.methods,
                self.not_methods,
                self.paths,
                self.not_paths,
            )
        )

    def match(self, req: Request, *, ignore_l7: bool = False) -> bool:
        if self.ports is not None and req.port not in self.ports:
            return False
        if self.not_ports is not None and req.port in self.not_ports:
            return False
        if ignore_l7:
            return True
        host = req.host.rsplit(":", 1)[0] if req.host.count(":") == 1 else req.host
        return (
            _present_and_match(self.hosts, self.not_hosts, host)
            and _present_and_match(self.methods, self.not_methods, req.method)
            and _present_and_match(self.paths, self.not_paths, req.path)
        )


_SOURCE_KEYS = {"source.principal", "source.namespace", "source.ip", "destination.port"}


@dataclass(frozen=True)
class Condition:
    key: str
    values: _Strings | None
    not_values: _Strings | None

    @property
    def uses_l7(self) -> bool:
        return self.key.startswith("request.")

    def value_of(self, peer: Peer, req: Request) -> str | None:
        if self.key == "source.principal":
            return peer.principal
        if self.key == "source.namespace":
            return peer.namespace
        if self.key == "source.ip":
            return peer.ip
        if self.key == "destination.port":
            return str(req.port)
        header = self.key[len("request.headers[") : -1].lower()
        return req.headers.get(header)

    def match(self, peer: Peer, req: Request) -> bool:
        value = self.value_of(peer, req)
        if self.key == "source.ip" and value is not None and self.values is not None:
            return self._ip_match(value)
        return _present_and_match(self.values, self.not_values, value)

    def _ip_match(self, value: str) -> bool:
        try:
            ip = ipaddress.ip_address(value)
            nets = [ipaddress.ip_network(p, strict=False) for p in self.values.patterns]  # type: ignore[union-attr]
        except ValueError:
            return False
        return any(ip in n for n in nets) and not (
            self.not_values is not None and self.not_values.match(value)
        )


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] = ()  # empty: any source
    operations: tuple[Operation, ...] = ()  # empty: any operation
    conditions: tuple[Condition, ...] = ()

    @property
    def uses_l7(self) -> bool:
        return any(o.uses_l7 for o in self.operations) or any(c.uses_l7 for c in self.conditions)

    def match(self, peer: Peer, req: Request, *, ignore_l7: bool = False) -> bool:
        if self.sources and not any(s.match(peer) for s in self.sources):
            return False
        if self.operations and not any(o.match(req, ignore_l7=ignore_l7) for o in self.operations):
            return False
        return all(c.match(peer, req) for c in self.conditions if not (ignore_l7 and c.uses_l7))


@dataclass(frozen=True)
class Policy:
    name: str  # "namespace/name"
    action: Action
    rules: tuple[Rule, ...]

    @property
    def uses_l7(self) -> bool:
        return any(r.uses_l7 for r in self.rules)

    def match(self, peer: Peer, req: Request) -> bool:
        tcp = req.protocol == "tcp"
        for rule in self.rules:
            if tcp and rule.uses_l7:
                if self.action is Action.DENY and rule.match(peer, req, ignore_l7=True):
                    return True
                continue  # ALLOW/AUDIT with L7 fields on TCP: never matches
            if rule.match(peer, req):
                return True
        return False


def decide(policies: Sequence[Policy], peer: Peer, req: Request) -> Decision:
    audited = tuple(p.name for p in policies if p.action is Action.AUDIT and p.match(peer, req))
    for p in policies:
        if p.action is Action.DENY and p.match(peer, req):
            return Deny(f"denied by policy {p.name}", p.name, audited)
    allows = [p for p in policies if p.action is Action.ALLOW]
    if not allows:
        return Allow(audited)
    for p in allows:
        if p.match(peer, req):
            return Allow(audited, p.name)
    return Deny("no ALLOW policy matched", None, audited)


# ---- compiling an Istio-shaped spec -------------------------------------------


def _str_list(obj: Mapping[str, Any], key: str, where: str) -> list[str] | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AuthzPolicyError(f"{where}.{key}: expected a list of non-empty strings")
    return value


def _networks(values: list[str] | None, where: str) -> tuple[IpNetwork, ...] | None:
    if values is None:
        return None
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as exc:
        raise AuthzPolicyError(f"{where}: {exc}") from None


def _ports(values: list[str] | None, where: str) -> frozenset[int] | None:
    if values is None:
        return None
    out = set()
    for v in values:
        if not v.isdigit() or not 1 <= int(v) <= 65535:
            raise AuthzPolicyError(f"{where}: {v!r} is not a port (1-65535, as a string)")
        out.add(int(v))
    return frozenset(out)


def _principal(p: str) -> str:
    return p.removeprefix("spiffe://")


def _source(src: Mapping[str, Any], where: str) -> Source:
    unknown = set(src) - {
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        "requestPrincipals",
        "notRequestPrincipals",
    }
    if unknown:
        raise AuthzPolicyError(f"{where}: unknown field(s) {sorted(unknown)}")
    for unsupported in ("requestPrincipals", "notRequestPrincipals"):
        if unsupported in src:
            raise AuthzPolicyError(
                f"{where}.{unsupported}: JWT request principals are not supported by Synchro"
            )
    principals = _str_list(src, "principals", where)
    not_principals = _str_list(src, "notPrincipals", where)
    ip_blocks = _str_list(src, "ipBlocks", where) or _str_list(src, "remoteIpBlocks", where)
    not_ip_blocks = _str_list(src, "notIpBlocks", where) or _str_list(
        src, "notRemoteIpBlocks", where
    )
    return Source(
        principals=_Strings.build(
            None if principals is None else [_principal(p) for p in principals]
        ),
        not_principals=_Strings.build(
            None if not_principals is None else [_principal(p) for p in not_principals]
        ),
        namespaces=_Strings.build(_str_list(src, "namespaces", where)),
        not_namespaces=_Strings.build(_str_list(src, "notNamespaces", where)),
        ip_blocks=_networks(ip_blocks, f"{where}.ipBlocks"),
        not_ip_blocks=_networks(not_ip_blocks, f"{where}.notIpBlocks"),
    )


def _operation(op: Mapping[str, Any], where: str) -> Operation:
    unknown = set(op) - {
        "hosts",
        "notHosts",
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    }
    if unknown:
        raise AuthzPolicyError(f"{where}: unknown field(s) {sorted(unknown)}")
    return Operation(
        hosts=_Strings.build(_str_list(op, "hosts", where), fold_case=True),
        not_hosts=_Strings.build(_str_list(op, "notHosts", where), fold_case=True),
        ports=_ports(_str_list(op, "ports", where), f"{where}.ports"),
        not_ports=_ports(_str_list(op, "notPorts", where), f"{where}.notPorts"),
        methods=_Strings.build(_str_list(op, "methods", where)),
        not_methods=_Strings.build(_str_list(op, "notMethods", where)),
        paths=_Strings.build(_str_list(op, "paths", where)),
        not_paths=_Strings.build(_str_list(op, "notPaths", where)),
    )


def _condition(cond: Mapping[str, Any], where: str) -> Condition:
    key = cond.get("key")
    if not isinstance(key, str) or not (
        key in _SOURCE_KEYS
        or (
            key.startswith("request.headers[")
            and key.endswith("]")
            and len(key) > len("request.headers[]")
        )
    ):
        raise AuthzPolicyError(
            f"{where}.key: {key!r} is not supported; expected request.headers[<name>], "
            + ", ".join(sorted(_SOURCE_KEYS))
        )
    values = _str_list(cond, "values", where)
    not_values = _str_list(cond, "notValues", where)
    if values is None and not_values is None:
        raise AuthzPolicyError(f"{where}: one of values or notValues is required")
    if key == "source.principal":
        values = None if values is None else [_principal(v) for v in values]
        not_values = None if not_values is None else [_principal(v) for v in not_values]
    if key == "source.ip" and values is not None:
        _networks(values, f"{where}.values")
    return Condition(key, _Strings.build(values), _Strings.build(not_values))


def compile_policy(name: str, spec: Mapping[str, Any]) -> Policy:
    """`name` is `namespace/name`; `spec` is the AuthorizationPolicy spec."""
    action_text = spec.get("action", "ALLOW")
    try:
        action = Action(action_text)
    except ValueError:
        raise AuthzPolicyError(
            f"spec.action: {action_text!r} is not supported; expected ALLOW, DENY or AUDIT"
        ) from None
    raw_rules = spec.get("rules")
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        raise AuthzPolicyError("spec.rules: expected a list")
    rules = []
    for i, raw in enumerate(raw_rules):
        where = f"spec.rules[{i}]"
        if not isinstance(raw, dict):
            raise AuthzPolicyError(f"{where}: expected an object")
        froms = raw.get("from") or []
        tos = raw.get("to") or []
        whens = raw.get("when") or []
        for key, value in (("from", froms), ("to", tos), ("when", whens)):
            if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
                raise AuthzPolicyError(f"{where}.{key}: expected a list of objects")
        rules.append(
            Rule(
                sources=tuple(
                    _source(f.get("source") or {}, f"{where}.from[{j}].source")
                    for j, f in enumerate(froms)
                ),
                operations=tuple(
                    _operation(t.get("operation") or {}, f"{where}.to[{j}].operation")
                    for j, t in enumerate(tos)
                ),
                conditions=tuple(_condition(c, f"{where}.when[{j}]") for j, c in enumerate(whens)),
            )
        )
    return Policy(name, action, tuple(rules))
