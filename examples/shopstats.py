"""What the shop demo shows, from real traffic: shared by `sudo make demo`
(examples/demo.py), tests/netns/test_shop_demo.py (the local mesh) and
tests/kind/test_shop.py (a kind cluster), so the three agree on what "the demo
works" means.

`collect(runner)` drives the shop wherever it runs: a `Runner` runs a command
in a Pod (`synchro exec` locally, `kubectl exec` in a cluster). It scrapes every
proxy's `/metrics` (port 15020, always plaintext), sends a bounded load through
the frontend (examples/load.py inside its Pod), scrapes again, and makes one
gRPC call to payments from an allowed and from a refused caller
(examples/pay.py). `figures(...)` and `checks(...)` are pure: per service the
requests/s and success as callers saw them (after the mesh's retries) and as
the Pods answered (every try, before retries), the canary split, the edges with
their mTLS mode, and the pass/fail checks the tests assert and the demo prints.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

SHOP = Path(__file__).resolve().parent / "shop"
REQUESTS = "synchro_requests_total"
RETRIES = "synchro_retries_total"
METRICS_URL = "http://127.0.0.1:15020/metrics"
NAMESPACE = "shop"
RATINGS = f"{NAMESPACE}/ratings"
PAYMENTS = f"{NAMESPACE}/payments"
FLAKY = f"{NAMESPACE}/ratings-flaky"
MUTUAL_TLS = "mutual_tls"
# The HTTPRoute in examples/shop/25-catalog-canary.yaml.
CANARY = {"v1": 90.0, "v2": 10.0}
CANARY_TOLERANCE = 5.0  # percentage points: 600 requests at 10% vary by ~1.2
RATINGS_SUCCESS_MIN = 0.99

Labels = tuple[tuple[str, str], ...]
# (pod, argv) -> what argv printed on stdout, run in the Pod's app container;
# a non-zero exit is not an error (a refused gRPC call exits 1).
Runner = Callable[[str, Sequence[str]], str]


# --- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    pod: str
    name: str
    labels: Labels
    value: float

    def label(self, key: str) -> str:
        return dict(self.labels).get(key, "")


def parse_metrics(pod: str, text: str) -> list[Sample]:
    """The request and retry counters of one proxy's /metrics."""
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (REQUESTS, RETRIES):
                out.append(Sample(pod, s.name, tuple(sorted(s.labels.items())), s.value))
    return out


def delta(before: Iterable[Sample], after: Iterable[Sample]) -> list[Sample]:
    """What the counters gained between two scrapes (a restarted proxy counts from 0)."""
    old = {(s.pod, s.name, s.labels): s.value for s in before}
    out = []
    for s in after:
        gained = s.value - old.get((s.pod, s.name, s.labels), 0.0)
        if gained < 0:
            gained = s.value
        if gained > 0:
            out.append(Sample(s.pod, s.name, s.labels, gained))
    return out


def ok(sample: Sample) -> bool:
    """Success as `synchro top` counts it: no 5xx, and gRPC status OK (or none)."""
    code = sample.label("response_code")
    return bool(code) and not code.startswith("5") and sample.label("grpc_status") in ("", "0")


# --- which Services a workload's Pods serve -------------------------------------------------


def workload_services(docs: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """`ns/workload` -> the `ns/service`s whose selector matches its Pod template
    (the proxies label inbound requests with the workload, not the Service)."""
    services: list[tuple[str, str, Mapping[str, Any]]] = []
    templates: dict[str, Mapping[str, Any]] = {}
    for doc in docs:
        if not isinstance(doc, Mapping):
            continue
        meta = doc.get("metadata") or {}
        ns = str(meta.get("namespace") or "default")
        name = str(meta.get("name") or "")
        spec = doc.get("spec") or {}
        if doc.get("kind") == "Service" and spec.get("selector"):
            services.append((ns, name, spec["selector"]))
        elif doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet"):
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            templates[f"{ns}/{name}"] = labels
    out: dict[str, set[str]] = {}
    for workload, labels in templates.items():
        ns = workload.split("/", 1)[0]
        out[workload] = {
            f"{sns}/{sname}"
            for sns, sname, selector in services
            if sns == ns and all(labels.get(k) == v for k, v in selector.items())
        }
    return out


def load_manifests(directory: Path = SHOP) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict))
    return docs


# --- the figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceFigures:
    service: str
    requests: float  # as callers sent them (reporter=source), after retries
    succeeded: float
    tries: float  # as the Pods answered them (reporter=destination), every try
    tries_succeeded: float
    retries: float
    seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def success(self) -> float | None:
        return self.succeeded / self.requests if self.requests else None

    @property
    def tries_success(self) -> float | None:
        return self.tries_succeeded / self.tries if self.tries else None


@dataclass(frozen=True)
class Edge:
    source: str  # the caller's identity (its ServiceAccount), as the receiving proxy saw it
    destination: str  # ns/workload
    requests: float
    succeeded: float
    security: tuple[str, ...]  # connection_security_policy values


@dataclass(frozen=True)
class Figures:
    seconds: float
    load: Mapping[str, Any]
    services: tuple[ServiceFigures, ...]
    edges: tuple[Edge, ...]
    canary: Mapping[str, float]  # version -> percent of frontend's answers
    failed_tries_since_start: Mapping[str, float]  # ns/workload -> 5xx answered, all time

    def service(self, name: str) -> ServiceFigures | None:
        return next((s for s in self.services if s.service == name), None)


def _caller(sample: Sample) -> str:
    principal = sample.label("source_principal")
    if principal:
        return principal.rsplit("/sa/", 1)[-1]
    return sample.label("source_workload") or "unknown"


def figures(
    load: Mapping[str, Any],
    before: Iterable[Sample],
    after: Sequence[Sample],
    manifests: Iterable[Mapping[str, Any]],
) -> Figures:
    seconds = float(load.get("seconds") or 0.0)
    window = delta(before, after)
    served_by = workload_services(manifests)
    caller: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    retries: dict[str, float] = defaultdict(float)
    for s in window:
        if s.name == RETRIES:
            retries[s.label("destination_service")] += s.value
        elif s.label("reporter") == "source" and s.label("destination_service"):
            row = caller[s.label("destination_service")]
            row[0] += s.value
            row[1] += s.value if ok(s) else 0.0
    called = set(caller)
    tries: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    edges: dict[tuple[str, str], list[Any]] = {}
    for s in window:
        if s.name != REQUESTS or s.label("reporter") != "destination":
            continue
        workload = f"{s.label('destination_namespace')}/{s.label('destination_workload')}"
        # A try counts for the Service the caller named (catalog, not catalog-v1).
        for service in served_by.get(workload, set()) & called:
            row = tries[service]
            row[0] += s.value
            row[1] += s.value if ok(s) else 0.0
        edge = edges.setdefault((_caller(s), workload), [0.0, 0.0, set()])
        edge[0] += s.value
        edge[1] += s.value if ok(s) else 0.0
        edge[2].add(s.label("connection_security_policy") or "none")
    services = tuple(
        ServiceFigures(
            name,
            caller[name][0],
            caller[name][1],
            tries[name][0],
            tries[name][1],
            retries.get(name, 0.0),
            seconds,
        )
        for name in sorted(called)
    )
    versions: Mapping[str, int] = load.get("catalog_versions") or {}
    total = sum(versions.values())
    canary = {v: 100.0 * n / total for v, n in sorted(versions.items())} if total else {}
    failed: dict[str, float] = defaultdict(float)
    for s in after:
        if s.name == REQUESTS and s.label("reporter") == "destination" and not ok(s):
            failed[f"{s.label('destination_namespace')}/{s.label('destination_workload')}"] += (
                s.value
            )
    return Figures(
        seconds,
        load,
        services,
        tuple(
            Edge(src, dst, n, good, tuple(sorted(sec)))
            for (src, dst), (n, good, sec) in sorted(edges.items())
        ),
        canary,
        dict(failed),
    )


# --- the checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100.0 * v:.1f}%"


def checks(fig: Figures, allowed: Mapping[str, Any], denied: Mapping[str, Any]) -> list[Check]:
    """What the demo promises, each with the numbers behind it."""
    out = []
    requests = int(fig.load.get("requests") or 0)
    errors = int(fig.load.get("frontend_errors") or 0)
    out.append(Check("frontend answers", errors == 0, f"{requests - errors}/{requests} checkouts"))
    v2 = fig.canary.get("v2", 0.0)
    split = ", ".join(f"{v} {p:.1f}%" for v, p in fig.canary.items()) or "no answers"
    out.append(
        Check(
            "canary split 90/10",
            set(fig.canary) <= set(CANARY) and abs(v2 - CANARY["v2"]) <= CANARY_TOLERANCE,
            split,
        )
    )
    ratings = fig.service(RATINGS)
    seen = ratings.success if ratings else None
    flaky = fig.failed_tries_since_start.get(FLAKY, 0.0)
    out.append(
        Check(
            "retries hide the flaky ratings replica",
            seen is not None and seen >= RATINGS_SUCCESS_MIN and flaky > 0,
            f"callers saw {_pct(seen)}, Pods answered "
            f"{_pct(ratings.tries_success if ratings else None)}, "
            f"{int(ratings.retries if ratings else 0)} retries; "
            f"{int(flaky)} failures of ratings-flaky since the mesh came up",
        )
    )
    payments: Mapping[str, int] = fig.load.get("payments_status") or {}
    out.append(
        Check(
            "payments over gRPC",
            payments == {"OK": requests},
            f"{json.dumps(dict(payments))} of {requests}",
        )
    )
    out.append(
        Check(
            "payments authorization",
            allowed.get("status") == "OK" and denied.get("status") == "PERMISSION_DENIED",
            f"frontend: {allowed.get('status')}, catalog: {denied.get('status')} "
            f"{denied.get('details') or ''}".rstrip(),
        )
    )
    plain = [e for e in fig.edges if e.security != (MUTUAL_TLS,)]
    to_payments = [
        e for e in fig.edges if e.destination == PAYMENTS and e.source == "frontend" and e.succeeded
    ]
    out.append(
        Check(
            "mTLS on every edge",
            bool(fig.edges) and not plain and bool(to_payments),
            f"{len(fig.edges) - len(plain)} of {len(fig.edges)} edges mutual_tls"
            + (
                f"; not: {', '.join(f'{e.source}->{e.destination}' for e in plain)}"
                if plain
                else ""
            ),
        )
    )
    return out


# --- driving the shop -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pods:
    """Pod names as the runner knows them: one caller of each kind, and all to scrape."""

    frontend: str
    refused: str  # a Pod the AuthorizationPolicy does not let call payments
    scrape: tuple[str, ...]


@dataclass
class Run:
    load: dict[str, Any]
    before: list[Sample] = field(default_factory=list)
    after: list[Sample] = field(default_factory=list)
    allowed: dict[str, Any] = field(default_factory=dict)
    denied: dict[str, Any] = field(default_factory=dict)

    def figures(self, manifests: Iterable[Mapping[str, Any]] | None = None) -> Figures:
        docs = load_manifests() if manifests is None else manifests
        return figures(self.load, self.before, self.after, docs)

    def checks(self, manifests: Iterable[Mapping[str, Any]] | None = None) -> list[Check]:
        return checks(self.figures(manifests), self.allowed, self.denied)


def scrape(run: Runner, pods: Iterable[str]) -> list[Sample]:
    # A few at a time: each is a `synchro exec` or `kubectl exec` of its own.
    def one(pod: str) -> list[Sample]:
        return parse_metrics(pod, run(pod, ["curl", "-s", "-m", "5", METRICS_URL]))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [s for samples in pool.map(one, pods) for s in samples]


def pay(run: Runner, pod: str) -> dict[str, Any]:
    text = run(pod, ["python3", "-m", "examples.pay"]).strip()
    try:
        answer = json.loads(text.splitlines()[-1]) if text else {}
    except ValueError:
        answer = {}
    return answer if isinstance(answer, dict) else {"status": text}


def collect(run: Runner, pods: Pods, *, requests: int = 600, concurrency: int = 8) -> Run:
    before = scrape(run, pods.scrape)
    argv = ["python3", "-m", "examples.load", "--requests", str(requests)]
    load = json.loads(run(pods.frontend, [*argv, "--concurrency", str(concurrency)]))
    after = scrape(run, pods.scrape)
    return Run(load, before, after, pay(run, pods.frontend), pay(run, pods.refused))
