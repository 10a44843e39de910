"""Golden metrics and the service graph, from the proxies' own counters (pure).

Inputs are Prometheus text expositions of many proxies (`parse_exposition`),
taken at two instants (`Scrape`); `compute(old, new)` returns per-service
requests/s, success rate and p50/p99, and the graph's edges (source workload ->
destination) with the same figures. No I/O, no clock: times are arguments.

Every request is counted once, preferably where its caller saw it:

- `reporter="source"` series (the caller's proxy) always count;
- `reporter="destination"` series whose source is known are dropped: that
  source is meshed and reported the request itself;
- `reporter="destination"` series with an unknown source count for the part
  that no caller reported: per group of services and the workloads behind them,
  what the destinations saw beyond what the sources reported (callers without a
  proxy, or meshed ones the destination could not identify). Without a way to
  tie a destination workload to a service (no `destination_service` label and
  no `services_of` entry) all of it counts, as in Istio's graph.

Success: no 5xx answer, an answer at all (code 0 is a reset or a local
failure), and for gRPC status OK. Quantiles follow Prometheus'
`histogram_quantile` (linear interpolation inside the bucket), so the figures
agree with PromQL on the same counters.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prometheus_client.parser import text_string_to_metric_families

REQUESTS_SAMPLE = "synchro_requests_total"
BUCKET_SAMPLE = "synchro_request_duration_seconds_bucket"
CERT_SAMPLE = "synchro_certificate_expiry_timestamp_seconds"
CONFIG_SAMPLE = "synchro_config_info"
UNKNOWN = "unknown"
# Scrapes of caller and callee are a few milliseconds apart, so their counts
# differ by the requests in flight; an excess below this share of what the
# destinations saw (and below MIN_EXCESS requests) is that skew, not callers.
EXCESS_SHARE = 0.05
MIN_EXCESS = 2.0


class GoldenError(ValueError):
    """An exposition or a pair of scrapes that cannot be used."""


class Key(NamedTuple):
    """The labels golden metrics group by (everything else is summed)."""

    reporter: str
    source_namespace: str
    source_workload: str
    destination_namespace: str
    destination_service: str  # "namespace/name" as the proxies label it, or ""
    destination_workload: str


Buckets = Mapping[float, float]  # upper bound -> cumulative count


@dataclass(frozen=True, slots=True)
class TargetSample:
    """One proxy's cumulative counters at one instant."""

    requests: Mapping[tuple[Key, bool], float]  # (key, success) -> count
    latency: Mapping[Key, Buckets]
    certificate_expiry: float | None = None  # seconds since the epoch
    config_version: str = ""  # the config the proxy says it runs


@dataclass(frozen=True, slots=True)
class Scrape:
    """Every target's counters at `time` (seconds, any monotonic clock)."""

    time: float
    samples: Mapping[str, TargetSample]  # target id -> its counters
    errors: Mapping[str, str] = field(default_factory=dict)  # target id -> why not scraped


def _known(value: str) -> bool:
    return bool(value) and value != UNKNOWN


def success(response_code: str, grpc_status: str) -> bool:
    try:
        code = int(response_code or "0")
    except ValueError:
        return False
    if code == 0 or 500 <= code <= 599:
        return False
    return grpc_status in ("", "0", "OK")


def _key(labels: Mapping[str, str]) -> Key:
    namespace, workload = labels.get("source_namespace", ""), labels.get("source_workload", "")
    if not _known(workload):
        # A caller with a mesh identity has a proxy that reported the request
        # itself; its ServiceAccount stands in for the workload it did not name.
        _, _, path = labels.get("source_principal", "").partition("://")
        parts = path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            namespace, workload = namespace or parts[2], parts[4]
    return Key(
        labels.get("reporter", ""),
        namespace,
        workload,
        labels.get("destination_namespace", ""),
        labels.get("destination_service", ""),
        labels.get("destination_workload", ""),
    )


def _relevant(text: str) -> str:
    # The per-request byte histograms are as large as the rest together; the
    # parser need not see them. TYPE lines keep the families typed.
    keep = []
    for line in text.splitlines():
        if line.startswith((REQUESTS_SAMPLE, BUCKET_SAMPLE, CERT_SAMPLE, CONFIG_SAMPLE)) or (
            line.startswith(
                ("# TYPE synchro_request", "# TYPE " + CERT_SAMPLE, "# TYPE synchro_config")
            )
        ):
            keep.append(line)
    return "\n".join(keep) + "\n"


def sample_from_series(series: Iterable[tuple[str, Mapping[str, str], float]]) -> TargetSample:
    """(sample name, labels, value) triples -> one target's counters. Series
    from a Prometheus query come this way; `parse_exposition` feeds it too."""
    requests: dict[tuple[Key, bool], float] = defaultdict(float)
    latency: dict[Key, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    expiry: float | None = None
    version = ""
    for name, labels, value in series:
        if name == REQUESTS_SAMPLE:
            ok = success(labels.get("response_code", ""), labels.get("grpc_status", ""))
            requests[(_key(labels), ok)] += value
        elif name == BUCKET_SAMPLE:
            try:
                le = float(labels.get("le", "nan"))
            except ValueError:
                le = math.nan
            if math.isnan(le):
                raise GoldenError(f"{BUCKET_SAMPLE} without a valid le label")
            latency[_key(labels)][le] += value
        elif name == CERT_SAMPLE and value > 0:
            expiry = value
        elif name == CONFIG_SAMPLE and value > 0:
            version = labels.get("version", "")
    return TargetSample(dict(requests), {k: dict(v) for k, v in latency.items()}, expiry, version)


def parse_exposition(text: str) -> TargetSample:
    """A proxy's `/metrics` (Prometheus text format) -> its request counters."""
    try:
        families = list(text_string_to_metric_families(_relevant(text)))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise GoldenError(f"not a Prometheus text exposition: {exc}") from None
    return sample_from_series((s.name, s.labels, s.value) for f in families for s in f.samples)


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets; None when empty."""
    points = sorted(buckets.items())
    if not points or points[-1][0] != math.inf or len(points) < 2:
        return None
    total = points[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below, running = 0.0, 0.0, 0.0
    for i, (le, raw) in enumerate(points):
        count = max(raw, running)  # summed deltas can dip; buckets are monotonic
        running = count
        if count >= rank:
            if le == math.inf:
                return points[-2][0]
            if i == 0 and le <= 0:
                return le
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return points[-2][0]


# --- deltas between two scrapes ------------------------------------------------------


def _delta(new: float, old: float | None) -> float:
    if old is None:
        return new  # the series appeared since the old scrape: all of it is new
    return new - old if new >= old else new  # a restart reset the counter


def _deltas(
    old: Scrape, new: Scrape
) -> tuple[dict[tuple[Key, bool], float], dict[Key, dict[float, float]], set[Key]]:
    requests: dict[tuple[Key, bool], float] = defaultdict(float)
    latency: dict[Key, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    present: set[Key] = set()
    # A target seen only once has no window to count over (it may be new, or
    # its previous scrape failed): Prometheus' rate() leaves it out too.
    for target in sorted(new.samples.keys() & old.samples.keys()):
        a, b = old.samples[target], new.samples[target]
        for rk, value in b.requests.items():
            requests[rk] += _delta(value, a.requests.get(rk))
            present.add(rk[0])
        for key, buckets in b.latency.items():
            before = a.latency.get(key)
            if before is not None and any(v < before.get(le, 0.0) for le, v in buckets.items()):
                before = None  # reset: count everything since
            for le, value in buckets.items():
                latency[key][le] += value - (before.get(le, 0.0) if before else 0.0)
    return requests, latency, present


# --- choosing which reporter counts each request ---------------------------------------


class _Groups:
    """Union-find over "svc:<ns/name>" and "wl:<ns>/<workload>" names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _wl(namespace: str, workload: str) -> str:
    return f"wl:{namespace}/{workload}"


def _dst_services(key: Key, services_of: Mapping[tuple[str, str], Sequence[str]]) -> list[str]:
    if key.destination_service:
        return [key.destination_service]
    return sorted(services_of.get((key.destination_namespace, key.destination_workload), ()))


@dataclass(frozen=True, slots=True)
class _Flow:
    key: Key
    weight: float  # 1 for source-reported; the counted share for destination-reported
    service: str


def _flows(
    keys: Iterable[Key],
    totals: Mapping[Key, float],
    services_of: Mapping[tuple[str, str], Sequence[str]],
) -> list[_Flow]:
    groups = _Groups()
    src_keys: list[Key] = []
    dst_unknown: list[Key] = []
    dst_known: list[Key] = []
    for k in keys:
        if k.reporter == "source":
            src_keys.append(k)
            if k.destination_service:
                groups.find("svc:" + k.destination_service)
            if _known(k.destination_workload):
                groups.find(_wl(k.destination_namespace, k.destination_workload))
                if k.destination_service:
                    groups.union(
                        "svc:" + k.destination_service,
                        _wl(k.destination_namespace, k.destination_workload),
                    )
        elif k.reporter == "destination":
            (dst_known if _known(k.source_workload) else dst_unknown).append(k)
            me = _wl(k.destination_namespace, k.destination_workload)
            for s in _dst_services(k, services_of):
                groups.union(me, "svc:" + s)

    def group_of(k: Key) -> str:
        if k.reporter == "source":
            if _known(k.destination_workload):
                return groups.find(_wl(k.destination_namespace, k.destination_workload))
            return groups.find("svc:" + k.destination_service) if k.destination_service else ""
        return groups.find(_wl(k.destination_namespace, k.destination_workload))

    reported: dict[str, float] = defaultdict(float)  # by the sources
    seen: dict[str, float] = defaultdict(float)  # by the destinations
    unknown: dict[str, float] = defaultdict(float)  # by destinations, from unknown callers
    for k in src_keys:
        if g := group_of(k):
            reported[g] += totals.get(k, 0.0)
    for k in dst_known:
        seen[group_of(k)] += totals.get(k, 0.0)
    for k in dst_unknown:
        g = group_of(k)
        seen[g] += totals.get(k, 0.0)
        unknown[g] += totals.get(k, 0.0)

    flows = [_Flow(k, 1.0, k.destination_service) for k in src_keys]
    for k in dst_unknown:
        g = group_of(k)
        services = _dst_services(k, services_of)
        weight = 1.0
        if services and unknown[g] > 0:
            excess = min(unknown[g], max(0.0, seen[g] - reported[g]))
            if reported[g] > 0 and excess < max(MIN_EXCESS, EXCESS_SHARE * seen[g]):
                excess = 0.0
            weight = excess / unknown[g]
        elif services and reported[g] > 0:
            weight = 0.0  # idle now, and its callers report this group themselves
        flows.append(_Flow(k, weight, services[0] if services else ""))
    return flows


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    requests: float  # in the window
    rps: float
    success_rate: float | None  # None without requests
    p50: float | None  # seconds
    p99: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": round(self.requests, 3),
            "rps": round(self.rps, 3),
            "success_rate": None if self.success_rate is None else round(self.success_rate, 4),
            "p50_ms": None if self.p50 is None else round(self.p50 * 1000, 2),
            "p99_ms": None if self.p99 is None else round(self.p99 * 1000, 2),
        }


@dataclass(frozen=True, slots=True)
class Node:
    id: str  # "<namespace>/<workload>", "svc:<namespace>/<name>" or "unknown"
    kind: str  # "workload" | "service" | "unknown"
    namespace: str
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "namespace": self.namespace, "name": self.name}


UNKNOWN_NODE = Node(UNKNOWN, "unknown", "", UNKNOWN)


@dataclass(frozen=True, slots=True)
class Edge:
    source: str  # node ids
    destination: str
    service: str  # "namespace/name", or "" when the proxies did not know it
    stats: Stats

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "service": self.service,
            **self.stats.to_json(),
        }


@dataclass(frozen=True, slots=True)
class ServiceStats:
    namespace: str
    name: str  # the Service, or the destination workload when no service was known
    stats: Stats

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, **self.stats.to_json()}


@dataclass(frozen=True, slots=True)
class Golden:
    window: float  # seconds between the two scrapes
    services: tuple[ServiceStats, ...]
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]

    def graph_json(self) -> dict[str, Any]:
        return {
            "window_seconds": round(self.window, 3),
            "nodes": [n.to_json() for n in self.nodes],
            "edges": [e.to_json() for e in self.edges],
        }

    def services_json(self) -> dict[str, Any]:
        return {
            "window_seconds": round(self.window, 3),
            "services": [s.to_json() for s in self.services],
        }


@dataclass(slots=True)
class _Acc:
    ok: float = 0.0
    failed: float = 0.0
    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))

    def stats(self, window: float) -> Stats:
        n = self.ok + self.failed
        return Stats(
            requests=n,
            rps=n / window,
            success_rate=self.ok / n if n > 0 else None,
            p50=quantile(0.5, self.buckets) if n > 0 else None,
            p99=quantile(0.99, self.buckets) if n > 0 else None,
        )


def _split(service: str) -> tuple[str, str]:
    ns, sep, name = service.partition("/")
    return (ns, name) if sep else ("", service)


def _destination(k: Key, service: str, only: Mapping[str, tuple[str, str]]) -> Node:
    """The workload called when known (or the only one behind the service),
    else the service: a canary's caller sees one service, not which version."""
    if _known(k.destination_workload):
        ns = k.destination_namespace or _split(service)[0]
        return Node(f"{ns}/{k.destination_workload}", "workload", ns, k.destination_workload)
    if service in only:
        ns, wl = only[service]
        return Node(f"{ns}/{wl}", "workload", ns, wl)
    if service:
        ns, name = _split(service)
        return Node(f"svc:{service}", "service", ns, name)
    return UNKNOWN_NODE


def _source(k: Key) -> Node:
    if k.reporter == "source" or _known(k.source_workload):
        ns, wl = k.source_namespace, k.source_workload or UNKNOWN
        return Node(f"{ns}/{wl}", "workload", ns, wl)
    return UNKNOWN_NODE


def compute(
    old: Scrape,
    new: Scrape,
    *,
    services_of: Mapping[tuple[str, str], Sequence[str]] | None = None,
    workloads: Iterable[tuple[str, str]] = (),
) -> Golden:
    """Golden metrics over the window between two scrapes.

    `services_of`: (namespace, workload) -> the Services ("namespace/name") in
    front of it, from the cluster's resources; it ties destination-reported
    series to the services their callers name. `workloads`: (namespace,
    workload) pairs shown as graph nodes even without traffic (known proxies).
    """
    window = new.time - old.time
    if not window > 0:
        raise GoldenError(f"scrapes out of order: window {window:g}s")
    requests, latency, present = _deltas(old, new)
    totals: dict[Key, float] = defaultdict(float)
    for (k, _ok), v in requests.items():
        totals[k] += v
    flows = _flows(sorted(present), totals, services_of or {})
    behind: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for workload, names in (services_of or {}).items():
        for name in names:
            behind[name].add(workload)
    only = {name: next(iter(w)) for name, w in behind.items() if len(w) == 1}

    edges: dict[tuple[str, str, str], _Acc] = defaultdict(_Acc)
    services: dict[tuple[str, str], _Acc] = defaultdict(_Acc)
    nodes: dict[str, Node] = {}
    for ns, wl in workloads:
        nodes[f"{ns}/{wl}"] = Node(f"{ns}/{wl}", "workload", ns, wl)
    for f in flows:
        src, dst = _source(f.key), _destination(f.key, f.service, only)
        if f.weight <= 0 and f.key.reporter != "source":
            continue
        nodes.setdefault(src.id, src)
        nodes.setdefault(dst.id, dst)
        svc = _split(f.service) if f.service else (dst.namespace, dst.name)
        for acc in (edges[(src.id, dst.id, f.service)], services[svc]):
            acc.ok += requests.get((f.key, True), 0.0) * f.weight
            acc.failed += requests.get((f.key, False), 0.0) * f.weight
            for le, v in latency.get(f.key, {}).items():
                acc.buckets[le] += v * f.weight
    return Golden(
        window=window,
        services=tuple(
            ServiceStats(ns, name, acc.stats(window))
            for (ns, name), acc in sorted(services.items())
        ),
        nodes=tuple(nodes[i] for i in sorted(nodes)),
        edges=tuple(
            Edge(s, d, svc, acc.stats(window)) for (s, d, svc), acc in sorted(edges.items())
        ),
    )
