"""Validation core: documents in, a `ResourceSet` of valid resources and a list of
`Problem`s out. Pure: the sources (files, Kubernetes) feed it documents and
report its problems (an error line locally, a status condition in a cluster).

An invalid resource is left out and the rest still applies. Checks that need
more than one document (a route whose parent Service does not exist, two
policies claiming the same target) also live here, so that the compiler only
ever sees a consistent set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane import resources as rs


@dataclass(frozen=True, slots=True)
class SourceDoc:
    """One decoded document and where it came from, for error lines."""

    doc: Any
    origin: str = ""  # a file path, or "kubernetes"
    index: int | None = None  # position of the document in its file (0-based)


@dataclass(frozen=True, slots=True)
class Problem:
    origin: str
    index: int | None
    kind: str
    namespace: str
    name: str
    field: str
    message: str
    # Gateway API style condition: Accepted=False or ResolvedRefs=False, with a reason.
    condition: str = "Accepted"
    reason: str = "Invalid"
    api_version: str = ""

    @property
    def ref(self) -> str:
        key = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind or '?'} {key or '?'}"

    def line(self) -> str:
        """The one error line naming the file, the document and the field."""
        where = self.origin or "<input>"
        if self.index is not None:
            where += f" document {self.index + 1}"
        what = f" ({self.ref})" if self.kind or self.name else ""
        fld = f" {self.field}:" if self.field else ""
        return f"{where}{what}:{fld} {self.message} [{self.condition}=False {self.reason}]"


def _key(ns: str, name: str) -> tuple[str, str]:
    return (ns, name)


@dataclass(frozen=True)
class ResourceSet:
    """A consistent snapshot of everything the compiler reads."""

    namespaces: Mapping[str, rs.Namespace] = field(default_factory=dict)
    services: Mapping[tuple[str, str], rs.Service] = field(default_factory=dict)
    endpoint_slices: tuple[rs.EndpointSlice, ...] = ()
    pods: tuple[rs.Pod, ...] = ()
    routes: tuple[rs.Route, ...] = ()
    traffic_policies: tuple[rs.TrafficPolicy, ...] = ()
    peer_authentications: tuple[rs.PeerAuthentication, ...] = ()
    authorization_policies: tuple[rs.AuthorizationPolicy, ...] = ()
    mesh: rs.MeshConfig = field(default_factory=rs.MeshConfig)
    trust_bundle: tuple[str, ...] = ()
    # Carried from one build to the next by the caller (the controller): the
    # compiler reuses per-service results whose inputs are the same objects.
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Set by the compiler on first use (see compiler.shared); a ResourceSet is
    # never changed otherwise, so caching derived data on it is safe.
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def pod(self, namespace: str, name: str) -> rs.Pod | None:
        idx = self._cache.get("pods")
        if idx is None:
            idx = {(p.meta.namespace, p.meta.name): p for p in self.pods}
            self._cache["pods"] = idx
        result: rs.Pod | None = idx.get((namespace, name))
        return result


def _age(meta: rs.Meta) -> tuple[str, str, str]:
    # Oldest first; then "{namespace}/{name}" alphabetically (the Gateway API tie-break).
    # Documents without a timestamp (local files) tie on it.
    return (meta.creation_timestamp, meta.namespace, meta.name)


def _problem(
    sd: SourceDoc | None,
    meta: rs.Meta,
    fld: str,
    msg: str,
    *,
    condition: str = "Accepted",
    reason: str = "Invalid",
) -> Problem:
    return Problem(
        origin=sd.origin if sd else "",
        index=sd.index if sd else None,
        kind=meta.kind,
        namespace=meta.namespace,
        name=meta.name,
        field=fld,
        message=msg,
        condition=condition,
        reason=reason,
    )


class ParseCache:
    """Parsed models of the previous build, by document object: a document that
    is the very same object as last time (an unchanged file, an unchanged watch
    object) is not parsed again. Sources never mutate a published document."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[Any, rs.Resource | rs.ResourceError | None]] = {}

    def parse(
        self, doc: Any, into: dict[int, tuple[Any, rs.Resource | rs.ResourceError | None]]
    ) -> rs.Resource | None:
        hit = self.entries.get(id(doc))
        if hit is not None and hit[0] is doc:
            result = hit[1]
        else:
            try:
                result = rs.parse(doc)
            except rs.ResourceError as e:
                result = e
        into[id(doc)] = (doc, result)  # holding `doc` keeps its id unique
        if isinstance(result, rs.ResourceError):
            raise result
        return result


def build(
    docs: Iterable[SourceDoc],
    trust_bundle: tuple[str, ...] = (),
    *,
    cache: ParseCache | None = None,
    memo: dict[str, Any] | None = None,
) -> tuple[ResourceSet, list[Problem]]:
    """Parse and check every document. `cache` and `memo` (kept by the caller
    between builds) only make it faster; the result is the same without them."""
    problems: list[Problem] = []
    parsed: dict[tuple[str, str, str], tuple[rs.Resource, SourceDoc]] = {}
    pc_ = cache or ParseCache()
    fresh: dict[int, tuple[Any, rs.Resource | rs.ResourceError | None]] = {}
    for sd in docs:
        api, kind, ns, name = rs.doc_identity(sd.doc)
        try:
            res = pc_.parse(sd.doc, fresh)
        except rs.ResourceError as e:
            problems.append(
                Problem(
                    sd.origin,
                    sd.index,
                    kind,
                    ns or ("default" if kind not in ("Namespace", "") else ""),
                    name,
                    e.field,
                    e.message,
                    api_version=api,
                )
            )
            continue
        if res is None:
            continue
        meta = res.meta
        if meta is None:  # MeshConfig without metadata never comes from parse
            continue
        ident = (meta.kind, meta.namespace, meta.name)
        if ident in parsed:
            first = parsed[ident][1]
            problems.append(
                _problem(
                    sd,
                    meta,
                    "metadata.name",
                    f"duplicate of {first.origin or 'an earlier document'}"
                    + (f" document {first.index + 1}" if first.index is not None else "")
                    + "; this one is ignored",
                    reason="Duplicate",
                )
            )
            continue
        parsed[ident] = (res, sd)
    pc_.entries = fresh
    result, problems = _assemble(parsed, problems, trust_bundle)
    if memo is not None:
        result = dataclasses.replace(result, memo=memo)
    return result, problems


def _assemble(
    parsed: dict[tuple[str, str, str], tuple[rs.Resource, SourceDoc]],
    problems: list[Problem],
    trust_bundle: tuple[str, ...],
) -> tuple[ResourceSet, list[Problem]]:
    namespaces: dict[str, rs.Namespace] = {}
    services: dict[tuple[str, str], rs.Service] = {}
    slices: list[rs.EndpointSlice] = []
    pods: list[rs.Pod] = []
    routes: list[tuple[rs.Route, SourceDoc]] = []
    tps: list[tuple[rs.TrafficPolicy, SourceDoc]] = []
    pas: list[tuple[rs.PeerAuthentication, SourceDoc]] = []
    azs: list[rs.AuthorizationPolicy] = []
    mesh = rs.MeshConfig()
    for res, sd in parsed.values():
        if isinstance(res, rs.Namespace):
            namespaces[res.meta.name] = res
        elif isinstance(res, rs.Service):
            services[_key(res.meta.namespace, res.meta.name)] = res
        elif isinstance(res, rs.EndpointSlice):
            slices.append(res)
        elif isinstance(res, rs.Pod):
            pods.append(res)
        elif isinstance(res, rs.MeshConfig):
            mesh = res
        elif isinstance(res, rs.Route):
            routes.append((res, sd))
        elif isinstance(res, rs.TrafficPolicy):
            tps.append((res, sd))
        elif isinstance(res, rs.PeerAuthentication):
            pas.append((res, sd))
        elif isinstance(res, rs.AuthorizationPolicy):
            azs.append(res)
    ok_routes = _check_routes(routes, services, problems)
    ok_tps = _check_traffic_policies(tps, services, problems)
    ok_pas = _check_peer_authentications(pas, problems)
    result = ResourceSet(
        namespaces=namespaces,
        services=services,
        endpoint_slices=tuple(sorted(slices, key=lambda s: (s.meta.namespace, s.meta.name))),
        pods=tuple(sorted(pods, key=lambda p: (p.meta.namespace, p.meta.name))),
        routes=tuple(ok_routes),
        traffic_policies=tuple(ok_tps),
        peer_authentications=tuple(ok_pas),
        authorization_policies=tuple(sorted(azs, key=lambda a: _age(a.meta))),
        mesh=mesh,
        trust_bundle=trust_bundle,
    )
    return result, problems


def _check_routes(
    routes: list[tuple[rs.Route, SourceDoc]],
    services: Mapping[tuple[str, str], rs.Service],
    problems: list[Problem],
) -> list[rs.Route]:
    ok = []
    for route, sd in sorted(routes, key=lambda r: _age(r[0].meta)):
        bad = False
        for i, p in enumerate(route.parent_refs):
            fld = f"spec.parentRefs[{i}]"
            if p.kind != "Service" or p.group not in ("", "core"):
                problems.append(
                    _problem(
                        sd,
                        route.meta,
                        f"{fld}.kind",
                        f"only Service parents (the GAMMA pattern) are supported, got {p.group or 'core'}/{p.kind}",
                        reason="NotAllowedByListeners",
                    )
                )
                bad = True
                continue
            svc = services.get(_key(p.namespace, p.name))
            if svc is None:
                problems.append(
                    _problem(
                        sd,
                        route.meta,
                        f"{fld}.name",
                        f"Service {p.namespace}/{p.name} does not exist",
                        reason="NoMatchingParent",
                    )
                )
                bad = True
            elif p.port is not None and all(sp.port != p.port for sp in svc.ports):
                problems.append(
                    _problem(
                        sd,
                        route.meta,
                        f"{fld}.port",
                        f"Service {p.namespace}/{p.name} has no port {p.port}",
                        reason="NoMatchingParent",
                    )
                )
                bad = True
        for ri, rule in enumerate(route.rules):
            for bi, b in enumerate(rule.backends):
                fld = f"spec.rules[{ri}].backendRefs[{bi}]"
                if b.port is None:
                    problems.append(
                        _problem(sd, route.meta, f"{fld}.port", "required for a Service backend")
                    )
                    bad = True
                elif _key(b.namespace, b.name) not in services:
                    # Kept: Gateway API answers requests for a missing backend with
                    # 500 (HTTP) / UNAVAILABLE (gRPC) rather than dropping the rule.
                    problems.append(
                        _problem(
                            sd,
                            route.meta,
                            f"{fld}.name",
                            f"Service {b.namespace}/{b.name} does not exist",
                            condition="ResolvedRefs",
                            reason="BackendNotFound",
                        )
                    )
        if not bad:
            ok.append(route)
    return ok


def _check_traffic_policies(
    tps: list[tuple[rs.TrafficPolicy, SourceDoc]],
    services: Mapping[tuple[str, str], rs.Service],
    problems: list[Problem],
) -> list[rs.TrafficPolicy]:
    ok = []
    claimed: dict[tuple[str, str | None], rs.TrafficPolicy] = {}
    for tp, sd in sorted(tps, key=lambda t: _age(t[0].meta)):
        if tp.target is not None and _key(tp.meta.namespace, tp.target) not in services:
            problems.append(
                _problem(
                    sd,
                    tp.meta,
                    "spec.targetRef.name",
                    f"Service {tp.meta.namespace}/{tp.target} does not exist",
                    condition="ResolvedRefs",
                    reason="TargetNotFound",
                )
            )
            # Kept: it applies as soon as the Service appears.
        slot = (tp.meta.namespace, tp.target)
        if slot in claimed:
            what = f"Service {tp.target}" if tp.target else f"namespace {tp.meta.namespace}"
            problems.append(
                _problem(
                    sd,
                    tp.meta,
                    "spec.targetRef",
                    f"{what} already has TrafficPolicy {claimed[slot].meta.name} (older wins)",
                    reason="Conflicted",
                )
            )
            continue
        claimed[slot] = tp
        ok.append(tp)
    return ok


def _check_peer_authentications(
    pas: list[tuple[rs.PeerAuthentication, SourceDoc]], problems: list[Problem]
) -> list[rs.PeerAuthentication]:
    ok = []
    wide: dict[str, rs.PeerAuthentication] = {}
    for pa, sd in sorted(pas, key=lambda t: _age(t[0].meta)):
        if pa.selector is None:
            if pa.meta.namespace in wide:
                problems.append(
                    _problem(
                        sd,
                        pa.meta,
                        "spec.selector",
                        f"namespace {pa.meta.namespace} already has a policy without selector ({wide[pa.meta.namespace].meta.name}; older wins)",
                        reason="Conflicted",
                    )
                )
                continue
            wide[pa.meta.namespace] = pa
        ok.append(pa)
    return ok
