"""Config push: proxies long-poll for their config, and ACK or NACK it.

Transport: HTTP long-poll. A proxy asks `GET /v1/config?...&version=V` with the
version it runs; the controller answers at once when the proxy's compiled config
has another version, otherwise it holds the request until one appears (or
answers 304 after `wait` seconds). Chosen over server-sent events or a custom
stream because:
- every poll states what the proxy runs, so the controller's view heals by
  itself after a controller restart or a lost response: nothing to replay;
- each answer is one ordinary HTTP response: gzip, ETag and the version header
  work unchanged, and the compressed bytes of a version are computed once and
  sent to every proxy of that version (configs are the same for all Pods of a
  workload, and the services part for the whole mesh);
- no long-lived streaming state or heartbeats: intermediaries' idle timeouts
  never see a silent stream, and a new controller replica needs no handover.
The cost is one request per change per proxy, with latency of the held request
(immediate), well inside the one-second budget.

`Debouncer` and `ProxyTracker` are pure cores (clock passed in); `PushHub` is
the asyncio adapter.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane import compiler
from controlplane.validation import Problem, ResourceSet
from proxy import config as pc

DEBOUNCE_SECONDS = 0.05
MAX_DEBOUNCE_SECONDS = 0.1
# A proxy between two polls is still connected for this long.
CONNECTED_GRACE_SECONDS = 5.0


class PushError(Exception):
    """A request the push server cannot serve (unknown proxy, bad parameters)."""


# --- debounce (pure) -------------------------------------------------------------


@dataclass(slots=True)
class Debouncer:
    """Fold bursts of changes: fire `delay` after the last change, but never more
    than `max_delay` after the first one (so a steady stream still gets through)."""

    delay: float = DEBOUNCE_SECONDS
    max_delay: float = MAX_DEBOUNCE_SECONDS
    first: float | None = None
    last: float | None = None

    def change(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def deadline(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.delay, self.first + self.max_delay)

    def due(self, now: float) -> bool:
        d = self.deadline()
        return d is not None and now >= d

    def fire(self) -> None:
        self.first = self.last = None


# --- proxy status (pure) -----------------------------------------------------------


@dataclass(slots=True)
class ProxyState:
    namespace: str
    pod: str
    service_account: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    polls: int = 0  # polls in flight
    last_seen: float = 0.0
    sent: str = ""  # last version sent
    acked: str = ""  # last version ACKed (applied)
    nack_version: str = ""
    nack_error: str = ""
    nack_at: float = 0.0
    acked_at: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.pod}.{self.namespace}"


class ProxyTracker:
    """What each proxy runs, as its polls and ACKs tell; clock passed in."""

    def __init__(self) -> None:
        self.proxies: dict[tuple[str, str], ProxyState] = {}

    def get(self, namespace: str, pod: str) -> ProxyState:
        key = (namespace, pod)
        st = self.proxies.get(key)
        if st is None:
            st = ProxyState(namespace, pod)
            self.proxies[key] = st
        return st

    def poll_started(
        self,
        namespace: str,
        pod: str,
        have: str,
        now: float,
        *,
        service_account: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> ProxyState:
        st = self.get(namespace, pod)
        st.polls += 1
        st.last_seen = now
        if service_account:
            st.service_account = service_account
        if labels:
            st.labels = dict(labels)
        if have and have != st.acked:
            # A poll names what the proxy runs: after a controller restart this
            # is the only ACK it will get for that version.
            st.acked, st.acked_at = have, now
        return st

    def poll_ended(self, namespace: str, pod: str, now: float, sent: str | None) -> None:
        st = self.get(namespace, pod)
        st.polls = max(0, st.polls - 1)
        st.last_seen = now
        if sent:
            st.sent = sent

    def ack(self, namespace: str, pod: str, version: str, now: float) -> None:
        st = self.get(namespace, pod)
        st.acked, st.acked_at, st.last_seen = version, now, now
        if st.nack_version == version:
            st.nack_version = st.nack_error = ""

    def nack(self, namespace: str, pod: str, version: str, error: str, now: float) -> None:
        st = self.get(namespace, pod)
        st.nack_version, st.nack_error, st.nack_at, st.last_seen = version, error, now, now

    def connected(self, st: ProxyState, now: float) -> bool:
        return st.polls > 0 or now - st.last_seen <= CONNECTED_GRACE_SECONDS

    def forget_stale(self, now: float, older_than: float = 3600.0) -> None:
        for key, st in list(self.proxies.items()):
            if st.polls == 0 and now - st.last_seen > older_than:
                del self.proxies[key]

    def rows(
        self, now: float, current: Callable[[ProxyState], str], wall_offset: float = 0.0
    ) -> list[dict[str, Any]]:
        """One row per proxy for GET /v1/proxies; `current` gives the version it should run."""
        out = []
        for st in sorted(self.proxies.values(), key=lambda s: (s.namespace, s.pod)):
            want = current(st)  # may fill in the workload from the resources
            out.append(
                {
                    "proxy": st.id,
                    "namespace": st.namespace,
                    "pod": st.pod,
                    "workload": st.service_account or st.labels.get("app", ""),
                    "connected": self.connected(st, now),
                    "version": st.acked,
                    "expected_version": want,
                    "sent_version": st.sent,
                    "synced": bool(st.acked) and st.acked == want,
                    "state": _state(st, want),
                    "last_nack": (
                        {
                            "version": st.nack_version,
                            "error": st.nack_error,
                            "at": st.nack_at + wall_offset,
                        }
                        if st.nack_version
                        else None
                    ),
                    "last_seen": st.last_seen + wall_offset,
                }
            )
        return out


def _state(st: ProxyState, want: str) -> str:
    if st.acked and st.acked == want:
        return "SYNCED"
    if st.nack_version and st.nack_version == want:
        return "NACKED"
    if st.sent == want:
        return "SENT"
    return "STALE"


# --- the asyncio hub ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    resources: ResourceSet
    problems: tuple[Problem, ...]
    generation: int


@dataclass(frozen=True, slots=True)
class Rendered:
    version: str
    gzipped: bytes
    prefix: str  # shared by every config of one snapshot: not a copy
    tail: str

    @property
    def body(self) -> bytes:
        return (self.prefix + self.tail).encode()


class _GzipPrefix:
    """The shared prefix compressed once; each config only compresses its tail
    on a copy of the compressor (the gzip CRC and length carry over), so a new
    version costs kilobytes of compression, not megabytes."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # Level 1: most of the gain (the JSON repeats itself a lot) for a fraction of the CPU.
        self.compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        self.head = self.compressor.compress(prefix.encode())

    def finish(self, tail: str) -> bytes:
        c = self.compressor.copy()
        return self.head + c.compress(tail.encode()) + c.flush()


class PushHub:
    """The current snapshot, and long-poll waiters that wake when it changes."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, cache_size: int = 256
    ) -> None:
        self.clock = clock
        self.wall_offset = time.time() - clock()
        self.snapshot = Snapshot(ResourceSet(), (), 0)
        self.tracker = ProxyTracker()
        self._changed = asyncio.Event()
        self._rendered: OrderedDict[str, Rendered] = OrderedDict()
        self._cache_size = cache_size
        self.has_snapshot = asyncio.Event()
        self.closing = False

    def close(self) -> None:
        """Shutting down: answer every held poll now (304) so that the proxies
        move on to another replica or retry, instead of holding up the exit."""
        self.closing = True
        self._changed.set()

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.has_snapshot.set()
        # Wake every waiter; each re-checks its own version and waits again if unchanged.
        self._changed.set()
        self._changed = asyncio.Event()

    def info(
        self,
        namespace: str,
        pod: str,
        *,
        labels: Mapping[str, str] | None = None,
        service_account: str | None = None,
    ) -> compiler.ProxyInfo:
        return compiler.proxy_info(
            self.snapshot.resources, namespace, pod, labels=labels, service_account=service_account
        )

    def config_for(self, info: compiler.ProxyInfo) -> pc.ProxyConfig:
        return compiler.compile(self.snapshot.resources, info)

    def render(self, config: pc.ProxyConfig) -> Rendered:
        hit = self._rendered.get(config.version)
        if hit is not None:
            self._rendered.move_to_end(config.version)
            return hit
        resources = self.snapshot.resources
        prefix, tail = compiler.render_parts(resources, config)
        gz = resources._cache.get("gzip_prefix")
        if not isinstance(gz, _GzipPrefix) or gz.prefix is not prefix:
            gz = _GzipPrefix(prefix)
            if prefix:
                resources._cache["gzip_prefix"] = gz
        rendered = Rendered(config.version, gz.finish(tail), prefix, tail)
        self._rendered[config.version] = rendered
        while len(self._rendered) > self._cache_size:
            self._rendered.popitem(last=False)
        return rendered

    async def render_async(self, config: pc.ProxyConfig) -> Rendered:
        hit = self._rendered.get(config.version)
        if hit is not None:
            return hit
        # Big configs take tens of milliseconds to serialize: keep the loop serving.
        return await asyncio.to_thread(self.render, config)

    def current_version(self, st: ProxyState) -> str:
        info = self.info(
            st.namespace, st.pod, labels=st.labels, service_account=st.service_account or None
        )
        # What the resources know about the Pod beats the proxy's own report.
        if self.snapshot.resources.pod(st.namespace, st.pod) is not None:
            st.service_account = st.service_account or info.service_account
            st.labels = st.labels or dict(info.labels)
        return self.config_for(info).version

    async def poll(
        self,
        namespace: str,
        pod: str,
        *,
        have: str,
        nacked: str,
        wait: float,
        labels: Mapping[str, str] | None = None,
        service_account: str | None = None,
    ) -> Rendered | None:
        """The proxy's config once its version differs from `have` and `nacked`;
        None when `wait` seconds pass without one."""
        now = self.clock()
        self.tracker.poll_started(
            namespace, pod, have, now, service_account=service_account or "", labels=labels
        )
        sent: str | None = None
        try:
            deadline = now + wait
            while True:
                if self.has_snapshot.is_set():
                    changed = self._changed
                    info = self.info(namespace, pod, labels=labels, service_account=service_account)
                    config = self.config_for(info)
                    if config.version not in (have, nacked):
                        rendered = await self.render_async(config)
                        sent = rendered.version
                        return rendered
                else:
                    changed = self._changed
                remaining = deadline - self.clock()
                if remaining <= 0 or self.closing:
                    return None
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    return None
        finally:
            self.tracker.poll_ended(namespace, pod, self.clock(), sent)

    def ack(self, namespace: str, pod: str, version: str, error: str | None) -> None:
        now = self.clock()
        if error:
            self.tracker.nack(namespace, pod, version, error, now)
        else:
            self.tracker.ack(namespace, pod, version, now)

    def proxies(self) -> list[dict[str, Any]]:
        now = self.clock()
        self.tracker.forget_stale(now)
        return self.tracker.rows(now, self.current_version, self.wall_offset)


def pod_document(namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A Pod manifest from the local runtime's report (PUT /v1/pods/{ns}/{name}).

    Accepts either a full Pod manifest or the short form
    {ip, labels, serviceAccount, ready, meshed, ports: {name: number}, zone}.
    """
    if body.get("kind") == "Pod":
        doc = dict(body)
        meta = dict(doc.get("metadata") or {})
        meta["namespace"], meta["name"] = namespace, name
        doc["metadata"] = meta
        return doc
    labels = dict(body.get("labels") or {})
    if body.get("zone"):
        labels.setdefault("topology.kubernetes.io/zone", body["zone"])
    annotations = {"synchro.dev/status": "{}"} if body.get("meshed") else {}
    ports = body.get("ports") or {}
    if not isinstance(ports, dict):
        raise PushError("ports: expected an object {name: number}")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "serviceAccountName": body.get("serviceAccount") or "default",
            "containers": [
                {
                    "name": "app",
                    "ports": [{"name": k, "containerPort": v} for k, v in ports.items()],
                }
            ],
        },
        "status": {
            "podIP": body.get("ip") or "",
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True" if body.get("ready", True) else "False"}
            ],
        },
    }
