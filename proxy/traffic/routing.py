"""Route matching and weighted backend choice (Gateway API HTTPRoute/GRPCRoute).

The control plane sends a service's routes already in precedence order; this
module compiles them once per config into matchers (regexes compiled, weights
summed) and answers, per request, which route applies and which backend it
sends to. Filters that rewrite the request are pure functions here too.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from proxy.config import (
    Filter,
    HeaderModifier,
    PathModifier,
    RequestRedirect,
    Route,
    RouteMatch,
    WeightedBackend,
)


@dataclass(frozen=True, slots=True)
class RequestView:
    """What route matching looks at. Header names are lower-case."""

    method: str
    path: str  # without the query string
    query: str
    headers: Mapping[str, str]

    @classmethod
    def from_target(cls, method: str, target: str, headers: Mapping[str, str]) -> RequestView:
        path, _, query = target.partition("?")
        return cls(method, path or "/", query, headers)


def _path_prefix_matches(prefix: str, path: str) -> bool:
    """Gateway API PathPrefix: element-wise, so /foo matches /foo and /foo/bar,
    not /foobar; a trailing slash in the prefix is ignored."""
    prefix = prefix.rstrip("/")
    if not prefix:
        return True
    return path == prefix or path.startswith(prefix + "/")


Predicate = Callable[[RequestView], bool]


def _path_predicate(kind: str, value: str) -> Predicate:
    if kind == "Exact":
        return lambda r: r.path == value
    if kind == "PathPrefix":
        return lambda r: _path_prefix_matches(value, r.path)
    rx = re.compile(value)
    return lambda r: rx.fullmatch(r.path) is not None


def _header_predicate(name: str, kind: str, value: str) -> Predicate:
    if kind == "Exact":
        return lambda r: r.headers.get(name) == value
    rx = re.compile(value)

    def check(r: RequestView) -> bool:
        got = r.headers.get(name)
        return got is not None and rx.fullmatch(got) is not None

    return check


def _query_predicate(wanted: Sequence[tuple[str, str, re.Pattern[str] | None]]) -> Predicate:
    def check(r: RequestView) -> bool:
        params: dict[str, str] = {}
        for k, v in parse_qsl(r.query, keep_blank_values=True):
            params.setdefault(k, v)  # Gateway API: the first value counts
        for name, value, rx in wanted:
            got = params.get(name)
            if got is None or (got != value if rx is None else rx.fullmatch(got) is None):
                return False
        return True

    return check


def _grpc_predicate(service: str, method: str, kind: str) -> Predicate:
    if kind == "Exact":
        return lambda r: _grpc_exact(service, method, r.path)
    srx, mrx = re.compile(service or ".*"), re.compile(method or ".*")
    return lambda r: _grpc_regex(srx, mrx, r.path)


def _compile_match(match: RouteMatch) -> Predicate:
    checks: list[Predicate] = []
    if match.path is not None:
        checks.append(_path_predicate(match.path.type, match.path.value))
    if match.method is not None:
        method = match.method
        checks.append(lambda r: r.method == method)
    checks.extend(_header_predicate(h.name.lower(), h.type, h.value) for h in match.headers)
    if match.query_params:
        checks.append(
            _query_predicate(
                [
                    (q.name, q.value, None if q.type == "Exact" else re.compile(q.value))
                    for q in match.query_params
                ]
            )
        )
    if match.grpc is not None:
        checks.append(_grpc_predicate(match.grpc.service, match.grpc.method, match.grpc.type))
    if not checks:
        return lambda r: True
    if len(checks) == 1:
        return checks[0]
    return lambda r: all(c(r) for c in checks)


def _split_grpc(path: str) -> tuple[str, str] | None:
    parts = path.split("/")
    if len(parts) != 3 or parts[0]:
        return None
    return parts[1], parts[2]


def _grpc_exact(service: str, method: str, path: str) -> bool:
    sm = _split_grpc(path)
    return sm is not None and (not service or sm[0] == service) and (not method or sm[1] == method)


def _grpc_regex(srx: re.Pattern[str], mrx: re.Pattern[str], path: str) -> bool:
    sm = _split_grpc(path)
    return sm is not None and srx.fullmatch(sm[0]) is not None and mrx.fullmatch(sm[1]) is not None


@dataclass(frozen=True)
class CompiledRoute:
    route: Route
    matches: Predicate
    backends: tuple[WeightedBackend, ...]
    cumulative: tuple[int, ...]  # running weight totals, for bisect

    def choose_backend(self, rng: random.Random) -> WeightedBackend | None:
        """A backend by weight; None when the rule has none (or all weigh 0),
        which the adapter answers with 500 as the Gateway API asks."""
        if not self.cumulative or self.cumulative[-1] == 0:
            return None
        x = rng.random() * self.cumulative[-1]
        return self.backends[bisect.bisect_right(self.cumulative, x)]


class RouteTable:
    """A service's routes, compiled; `match` returns the first that fits."""

    def __init__(self, routes: Sequence[Route]) -> None:
        compiled = []
        for route in routes:
            running, cumulative = 0, []
            for b in route.backends:
                running += b.weight
                cumulative.append(running)
            compiled.append(
                CompiledRoute(
                    route, _compile_match(route.match), tuple(route.backends), tuple(cumulative)
                )
            )
        self.routes: tuple[CompiledRoute, ...] = tuple(compiled)

    def match(self, req: RequestView, port: int | None = None) -> CompiledRoute | None:
        for r in self.routes:
            if (r.route.port is None or port is None or r.route.port == port) and r.matches(req):
                return r
        return None


# ---- filters -------------------------------------------------------------------


def apply_header_modifier(
    headers: list[tuple[str, str]], mod: HeaderModifier
) -> list[tuple[str, str]]:
    """Gateway API semantics: `set` replaces, `add` appends, `remove` deletes;
    names are case-insensitive."""
    drop = {n.lower() for n in mod.remove} | {n.lower() for n in mod.set}
    out = [(n, v) for n, v in headers if n.lower() not in drop]
    out.extend(mod.set.items())
    out.extend(mod.add.items())
    return out


def rewrite_path(path: str, modifier: PathModifier, matched_prefix: str | None) -> str:
    if modifier.type == "ReplaceFullPath":
        return modifier.value
    prefix = (matched_prefix or "/").rstrip("/")
    rest = path[len(prefix) :] if path.startswith(prefix) else path
    replacement = modifier.value.rstrip("/")
    new = replacement + rest
    if not new.startswith("/"):
        new = "/" + new
    return new


def redirect_location(
    redirect: RequestRedirect,
    *,
    scheme: str,
    host: str,
    path: str,
    query: str,
    matched_prefix: str | None,
) -> str:
    """The Location header of a RequestRedirect filter."""
    hostname, _, port_text = host.partition(":")
    new_scheme = redirect.scheme or scheme
    new_host = redirect.hostname or hostname
    if redirect.port is not None:
        port: int | None = redirect.port
    elif redirect.scheme and redirect.scheme != scheme:
        port = None  # a scheme change drops the port to the new scheme's default
    else:
        port = int(port_text) if port_text.isdigit() else None
    default = {"http": 80, "https": 443}.get(new_scheme)
    netloc = new_host if port is None or port == default else f"{new_host}:{port}"
    new_path = rewrite_path(path, redirect.path, matched_prefix) if redirect.path else path
    return f"{new_scheme}://{netloc}{new_path}" + (f"?{query}" if query else "")


def matched_prefix(route: Route) -> str | None:
    p = route.match.path
    return p.value if p is not None and p.type == "PathPrefix" else None


def filters_of(route: Route, backend: WeightedBackend | None) -> tuple[Filter, ...]:
    """Rule filters, then the chosen backend's own filters."""
    return route.filters + (backend.filters if backend is not None else ())
