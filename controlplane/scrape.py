"""Where the dashboard's numbers come from: the proxies' `/metrics`, or Prometheus.

`ProxyScraper` fetches every proxy's `:15020/metrics` (bounded concurrency,
a timeout per target) every `interval` seconds while someone is looking (a
dashboard or `synchro top` asked within `idle_after` seconds), keeps the
scrapes of the last `window` seconds, and hands the oldest and newest to
`golden.compute`. Targets are the proxies subscribed to the push hub (their
Pod IPs from the cluster's resources) plus static `--scrape-target` URLs.

`PrometheusSource` asks a Prometheus server instead (`--prometheus-url`): the
same counters summed by the labels golden metrics need, at now and now -
window, so both sources go through the same `golden.compute`.

`GoldenView` puts a source together with the controller's proxy list for the
dashboard's JSON (see controlplane/dashboard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from controlplane import golden
from proxy import ports
from proxy.telemetry.telemetry import workload_name

if TYPE_CHECKING:
    from controlplane.server import Controller
    from controlplane.validation import ResourceSet

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024  # a proxy's exposition is far smaller; a bigger body is not one


class ScrapeError(Exception):
    """A target or a Prometheus server that could not be read."""


@dataclass(frozen=True, slots=True)
class Target:
    id: str  # "<pod>.<namespace>" for proxies the controller knows, else the URL
    url: str
    namespace: str = ""
    pod: str = ""


@dataclass(slots=True)
class TargetStatus:
    ok: bool = False
    error: str = ""
    last_scrape: float = 0.0  # wall clock of the last success
    certificate_expiry: float | None = None
    config_version: str = ""


def metrics_url(ip: str, port: int = ports.STATUS_PORT) -> str:
    host = f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    return f"http://{host}:{port}/metrics"


def controller_targets(controller: Controller, port: int = ports.STATUS_PORT) -> list[Target]:
    """Every proxy subscribed to the controller whose Pod has an IP."""
    resources = controller.hub.snapshot.resources
    out = []
    for row in controller.hub.proxies():
        pod = resources.pod(row["namespace"], row["pod"])
        if pod is None or not pod.ip:
            continue
        try:
            url = metrics_url(pod.ip, port)
        except ValueError:
            continue
        out.append(Target(row["proxy"], url, row["namespace"], row["pod"]))
    return out


def services_of(resources: ResourceSet) -> dict[tuple[str, str], list[str]]:
    """(namespace, workload) -> the Services selecting its Pods ("namespace/name"),
    with workload names as the proxies derive them from their Pod names."""
    out: dict[tuple[str, str], set[str]] = {}
    for (ns, name), svc in resources.services.items():
        if not svc.selector:
            continue
        for pod in resources.pods:
            labels = pod.meta.labels
            if pod.meta.namespace == ns and all(
                labels.get(k) == v for k, v in svc.selector.items()
            ):
                out.setdefault((ns, workload_name(pod.meta.name)), set()).add(f"{ns}/{name}")
    return {k: sorted(v) for k, v in out.items()}


class Source(Protocol):
    async def window(self) -> tuple[golden.Scrape, golden.Scrape] | None: ...

    def touch(self) -> None: ...

    def statuses(self) -> Mapping[str, TargetStatus]: ...


class ProxyScraper:
    def __init__(
        self,
        targets: Callable[[], Sequence[Target]],
        *,
        interval: float = 2.0,
        window: float = 10.0,
        timeout: float = 2.0,
        concurrency: int = 16,
        idle_after: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if interval <= 0 or window < interval or timeout <= 0 or concurrency < 1:
            raise ValueError(
                "scrape interval and timeout must be positive, window >= interval, concurrency >= 1"
            )
        self.targets = targets
        self.interval, self.window_seconds, self.timeout = interval, window, timeout
        self.idle_after = idle_after
        self.clock, self.wall = clock, wall
        self.history: deque[golden.Scrape] = deque()
        self.status: dict[str, TargetStatus] = {}
        self._limit = asyncio.Semaphore(concurrency)
        self._verify = verify
        self._client: httpx.AsyncClient | None = None
        # Scrape from the start: whoever opens the dashboard first sees rates at once.
        self._touched = clock()
        self._wake = asyncio.Event()
        # httpx logs every request at INFO: one line per proxy every interval.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    # --- one round ------------------------------------------------------------------

    async def _fetch(self, client: httpx.AsyncClient, t: Target) -> golden.TargetSample:
        async with self._limit:
            try:
                async with client.stream(
                    "GET", t.url, headers={"accept": "text/plain;version=0.0.4"}
                ) as resp:
                    if resp.status_code != 200:
                        raise ScrapeError(f"HTTP {resp.status_code}")
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BODY:
                            raise ScrapeError(f"exposition larger than {MAX_BODY} bytes")
            except httpx.HTTPError as exc:
                raise ScrapeError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        # Parsing is CPU work; a thread keeps the controller's loop answering polls.
        return await asyncio.to_thread(golden.parse_exposition, body.decode("utf-8", "replace"))

    async def scrape_once(self) -> golden.Scrape:
        targets = list(self.targets())
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(max_keepalive_connections=64),
                verify=self._verify,
                trust_env=False,
            )
        when = self.clock()
        results = await asyncio.gather(
            *(self._fetch(self._client, t) for t in targets), return_exceptions=True
        )
        samples: dict[str, golden.TargetSample] = {}
        errors: dict[str, str] = {}
        status: dict[str, TargetStatus] = {}
        for t, r in zip(targets, results, strict=True):
            st = self.status.get(t.id) or TargetStatus()
            if isinstance(r, golden.TargetSample):
                samples[t.id] = r
                st = TargetStatus(True, "", self.wall(), r.certificate_expiry, r.config_version)
            elif isinstance(r, (ScrapeError, golden.GoldenError)):
                errors[t.id] = str(r)
                st = TargetStatus(
                    False, str(r), st.last_scrape, st.certificate_expiry, st.config_version
                )
            elif isinstance(r, BaseException):
                log.error("scraping %s failed", t.url, exc_info=r)
                errors[t.id] = f"internal error: {r!r}"
            status[t.id] = st
        self.status = status
        scrape = golden.Scrape(when, samples, errors)
        self.history.append(scrape)
        while self.history and self.history[0].time < when - 3 * self.window_seconds:
            self.history.popleft()
        return scrape

    # --- the loop ---------------------------------------------------------------------

    def touch(self) -> None:
        """Someone looked: keep scraping (start again at once if idle)."""
        idle = not self._active()
        self._touched = self.clock()
        if idle:
            self._wake.set()

    def _active(self) -> bool:
        return self.clock() - self._touched <= self.idle_after

    async def run(self) -> None:
        while True:
            if not self._active():
                self._wake.clear()
                await self._wake.wait()
            started = self.clock()
            try:
                await self.scrape_once()
            except Exception:  # one bad round must not end the scraping
                log.exception("scrape round failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), max(0.0, self.interval - (self.clock() - started))
                )
            self._wake.clear()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- reading ------------------------------------------------------------------------

    async def window(self) -> tuple[golden.Scrape, golden.Scrape] | None:
        """The oldest scrape within the window and the newest; None until two exist."""
        self.touch()
        if len(self.history) < 2:
            return None
        newest = self.history[-1]
        if self.clock() - newest.time > 3 * self.window_seconds:
            return None  # stale from an idle spell; fresh scrapes are under way
        older = [s for s in list(self.history)[:-1] if s.time >= newest.time - self.window_seconds]
        oldest = older[0] if older else self.history[-2]
        if newest.time - oldest.time > 3 * self.window_seconds:
            return None
        # A proxy that joined (or first answered) within the window counts from
        # its first scrape in it rather than not at all: its rate is low for one
        # window, never inflated.
        samples = dict(oldest.samples)
        for s in older[1:]:
            for target, sample in s.samples.items():
                samples.setdefault(target, sample)
        return golden.Scrape(oldest.time, samples, oldest.errors), newest

    def statuses(self) -> Mapping[str, TargetStatus]:
        return self.status


# --- Prometheus ---------------------------------------------------------------------------

_BY = (
    "reporter,source_workload,source_namespace,destination_service,"
    "destination_workload,destination_namespace"
)
QUERIES = {
    golden.REQUESTS_SAMPLE: f"sum by (instance,{_BY},response_code,grpc_status) "
    f"({golden.REQUESTS_SAMPLE})",
    golden.BUCKET_SAMPLE: f"sum by (instance,{_BY},le) ({golden.BUCKET_SAMPLE})",
}
CERT_QUERY = golden.CERT_SAMPLE


class PrometheusSource:
    """Golden metrics from a Prometheus server that scrapes the proxies."""

    def __init__(
        self,
        url: str,
        *,
        window: float = 60.0,
        timeout: float = 5.0,
        wall: Callable[[], float] = time.time,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--prometheus-url {url!r}: expected http(s)://host:port")
        if window <= 0:
            raise ValueError("the Prometheus window must be positive")
        self.url = url.rstrip("/")
        self.window_seconds = window
        self.wall = wall
        self._client = httpx.AsyncClient(timeout=timeout, verify=verify, trust_env=False)
        self._status: dict[str, TargetStatus] = {}

    async def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        try:
            resp = await self._client.get(
                self.url + "/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}
            )
            data = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ScrapeError(f"Prometheus {self.url}: {exc}") from None
        if not isinstance(data, dict) or data.get("status") != "success":
            error = data.get("error") if isinstance(data, dict) else None
            raise ScrapeError(f"Prometheus {self.url}: {error or 'unexpected answer'}")
        result = data.get("data", {}).get("result", [])
        return result if isinstance(result, list) else []

    async def _scrape_at(self, at: float) -> golden.Scrape:
        series: dict[str, list[tuple[str, Mapping[str, str], float]]] = {}
        for name, promql in QUERIES.items():
            for item in await self.query(promql, at):
                labels = item.get("metric") or {}
                try:
                    value = float(item["value"][1])
                except (KeyError, IndexError, TypeError, ValueError):
                    continue
                series.setdefault(str(labels.get("instance", "")), []).append((name, labels, value))
        samples = {target: golden.sample_from_series(s) for target, s in series.items()}
        return golden.Scrape(at, samples)

    async def window(self) -> tuple[golden.Scrape, golden.Scrape] | None:
        now = self.wall()
        old = await self._scrape_at(now - self.window_seconds)
        new = await self._scrape_at(now)
        try:
            for item in await self.query(CERT_QUERY, now):
                labels = item.get("metric") or {}
                st = TargetStatus(True, "", now, float(item["value"][1]))
                for key in (labels.get("instance"), _pod_id(labels)):
                    if key:
                        self._status[key] = st
        except (ScrapeError, KeyError, IndexError, TypeError, ValueError):
            pass  # certificate state is a bonus; golden metrics still stand
        return old, new

    def touch(self) -> None:
        pass

    def statuses(self) -> Mapping[str, TargetStatus]:
        return self._status

    async def run(self) -> None:
        await asyncio.Event().wait()  # nothing to do between queries

    async def aclose(self) -> None:
        await self._client.aclose()


def _pod_id(labels: Mapping[str, str]) -> str:
    pod = labels.get("pod") or labels.get("kubernetes_pod_name") or ""
    ns = labels.get("namespace") or labels.get("kubernetes_namespace") or ""
    return f"{pod}.{ns}" if pod and ns else ""


# --- the view the dashboard serves --------------------------------------------------------


class GoldenView:
    """A source of scrapes plus, when there is one, the controller's proxy list."""

    def __init__(self, source: ProxyScraper | PrometheusSource, controller: Controller | None):
        self.source = source
        self.controller = controller
        self._cache: tuple[float, float, golden.Golden | None] | None = None

    async def golden(self) -> golden.Golden | None:
        pair = await self.source.window()
        if pair is None:
            return None
        old, new = pair
        if self._cache is not None and self._cache[:2] == (old.time, new.time):
            return self._cache[2]  # several pages poll the same pair of scrapes
        mapping: dict[tuple[str, str], list[str]] = {}
        workloads: list[tuple[str, str]] = []
        if self.controller is not None:
            mapping = services_of(self.controller.hub.snapshot.resources)
            workloads = [
                (row["namespace"], workload_name(row["pod"]))
                for row in self.controller.hub.proxies()
            ]
        try:
            result: golden.Golden | None = await asyncio.to_thread(
                golden.compute, old, new, services_of=mapping, workloads=workloads
            )
        except golden.GoldenError as exc:
            log.warning("golden metrics: %s", exc)
            result = None
        self._cache = (old.time, new.time, result)
        return result

    def proxies(self, now: float | None = None) -> list[dict[str, Any]]:
        """The controller's proxy rows with what their metrics tell (certificate
        expiry, scrape health); static targets as rows of their own."""
        statuses = dict(self.source.statuses())
        rows: list[dict[str, Any]] = []
        if self.controller is not None:
            for row in self.controller.hub.proxies():
                st = statuses.pop(row["proxy"], None)
                rows.append({**row, "workload": workload_name(row["pod"]), **_scrape_fields(st)})
        for target, st in sorted(statuses.items()):
            rows.append({"proxy": target, "namespace": "", "pod": "", **_scrape_fields(st)})
        return rows


def _scrape_fields(st: TargetStatus | None) -> dict[str, Any]:
    if st is None:
        return {"scraped": None, "scrape_error": None, "certificate_expiry": None}
    return {
        "scraped": st.ok,
        "scrape_error": st.error or None,
        "certificate_expiry": st.certificate_expiry,
        "metrics_config_version": st.config_version or None,
    }
