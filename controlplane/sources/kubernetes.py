"""KubernetesSource: list + watch every kind the mesh reads, informer style.

Per collection an `Informer` lists (pages of 500), then watches from the list's
resourceVersion with bookmarks; a 410 Gone (the history was compacted) means a
relist, any other error a retry after exponential backoff with full jitter
(from the last resourceVersion when there is one). `InformerCache` is the pure
core: it applies lists and events and says when to relist. A collection whose
API is not installed (404: no Gateway API CRDs, say) counts as empty and is
looked for again later. The source publishes after every collection has listed
once, so no proxy ever sees a half-listed cluster.

`LeaseElector` (pure) and `StatusWriter` elect, with a coordination.k8s.io
Lease, the one replica that writes status conditions of invalid resources; all
replicas serve proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import random
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from controlplane.validation import Problem, SourceDoc

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
FIELD_MANAGER = "synchro-controller"
CONTROLLER_NAME = "synchro.dev/controller"


@dataclass(frozen=True, slots=True)
class Collection:
    path: str  # e.g. /api/v1/services
    api_version: str
    kind: str
    params: tuple[tuple[str, str], ...] = ()


COLLECTIONS: tuple[Collection, ...] = (
    Collection("/api/v1/namespaces", "v1", "Namespace"),
    Collection("/api/v1/services", "v1", "Service"),
    Collection("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
    Collection("/api/v1/pods", "v1", "Pod"),
    Collection(
        "/api/v1/namespaces/synchro-system/configmaps",
        "v1",
        "ConfigMap",
        (("fieldSelector", "metadata.name=synchro-config"),),
    ),
    Collection(
        "/apis/gateway.networking.k8s.io/v1/httproutes", "gateway.networking.k8s.io/v1", "HTTPRoute"
    ),
    Collection(
        "/apis/gateway.networking.k8s.io/v1/grpcroutes", "gateway.networking.k8s.io/v1", "GRPCRoute"
    ),
    Collection(
        "/apis/synchro.dev/v1alpha1/trafficpolicies", "synchro.dev/v1alpha1", "TrafficPolicy"
    ),
    Collection(
        "/apis/synchro.dev/v1alpha1/peerauthentications",
        "synchro.dev/v1alpha1",
        "PeerAuthentication",
    ),
    Collection(
        "/apis/synchro.dev/v1alpha1/authorizationpolicies",
        "synchro.dev/v1alpha1",
        "AuthorizationPolicy",
    ),
)

PLURALS = {c.kind: c.path.rsplit("/", 1)[1] for c in COLLECTIONS}


class KubeError(Exception):
    """An API call that failed; `code` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def backoff_delay(
    attempt: int, rng: random.Random, *, base: float = 0.2, cap: float = 30.0
) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2 ** min(attempt, 30))))


# --- the pure informer cache -------------------------------------------------------------


def _obj_key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class InformerCache:
    """The objects of one collection and the resourceVersion to watch from."""

    def __init__(self, api_version: str, kind: str) -> None:
        self.api_version = api_version
        self.kind = kind
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = False

    def _typed(self, obj: dict[str, Any]) -> dict[str, Any]:
        # List items carry no apiVersion/kind; documents need them.
        obj.setdefault("apiVersion", self.api_version)
        obj.setdefault("kind", self.kind)
        return obj

    def replace(self, items: list[dict[str, Any]], resource_version: str) -> bool:
        """A (re)list; True when the content changed."""
        new = {_obj_key(o): self._typed(o) for o in items if isinstance(o, dict)}
        changed = not self.synced or _versions(new) != _versions(self.objects)
        self.objects, self.resource_version, self.synced = new, resource_version, True
        return changed

    def apply(self, event: Any) -> str:
        """One watch event: "changed", "unchanged", "relist" (410 Gone) or "error"."""
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            return "error"
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            return "relist" if obj.get("code") == 410 else "error"
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return "unchanged"
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return "error"
        key = _obj_key(obj)
        if rv:
            self.resource_version = rv
        if kind == "DELETED":
            return "changed" if self.objects.pop(key, None) is not None else "unchanged"
        self.objects[key] = self._typed(obj)
        return "changed"


def _versions(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {k: str((o.get("metadata") or {}).get("resourceVersion", "")) for k, o in objs.items()}


# --- API access ---------------------------------------------------------------------------


class KubeAPI:
    """httpx against the API server, configured in-cluster or from a kubeconfig."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        verify: bool | ssl.SSLContext = True,
        cert: tuple[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            verify=verify,
            cert=cert,
            timeout=httpx.Timeout(30.0, read=None),
        )

    @classmethod
    def from_environment(cls) -> KubeAPI:
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if host and (SA_DIR / "token").exists():
            ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
            h = f"[{host}]" if ":" in host else host
            return cls(
                f"https://{h}:{port}", token=(SA_DIR / "token").read_text().strip(), verify=ctx
            )
        from kubernetes import client, config  # kubeconfig parsing only

        cfg = client.Configuration()
        config.load_kube_config(client_configuration=cfg)
        token = (cfg.api_key or {}).get("authorization", "").removeprefix("Bearer ").strip() or None
        verify: bool | ssl.SSLContext = (
            ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.ssl_ca_cert
            else bool(cfg.verify_ssl)
        )
        cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file and cfg.key_file else None
        return cls(cfg.host, token=token, verify=verify, cert=cert)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        try:
            resp = await self.client.request(
                method,
                path,
                params=httpx.QueryParams(tuple(params)),
                content=None if body is None else json.dumps(body),
                headers={"content-type": content_type},
            )
        except httpx.HTTPError as e:
            raise KubeError(f"{method} {path}: {e}") from None
        if resp.status_code >= 400:
            raise KubeError(
                f"{method} {path}: {resp.status_code} {resp.text[:200]}", resp.status_code
            )
        return resp.json()

    async def aclose(self) -> None:
        await self.client.aclose()


# --- the informer adapter ----------------------------------------------------------------------


class Informer:
    def __init__(
        self,
        api: KubeAPI,
        collection: Collection,
        on_change: Callable[[], None],
        *,
        rng: random.Random | None = None,
        watch_timeout: int = 300,
        missing_retry: float = 30.0,
    ) -> None:
        self.api = api
        self.collection = collection
        self.cache = InformerCache(collection.api_version, collection.kind)
        self.on_change = on_change
        self.rng = rng or random.Random()
        self.watch_timeout = watch_timeout
        self.missing_retry = missing_retry
        self.relists = 0

    async def list(self) -> None:
        items: list[dict[str, Any]] = []
        cont = ""
        while True:
            params = [*self.collection.params, ("limit", "500")]
            if cont:
                params.append(("continue", cont))
            page = await self.api.request("GET", self.collection.path, params=params)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                break
        self.relists += 1
        if self.cache.replace(items, str(meta.get("resourceVersion") or "")):
            self.on_change()

    async def watch(self) -> str:
        """Watch until the server ends the stream; "relist" when history is gone."""
        params = [
            *self.collection.params,
            ("watch", "1"),
            ("resourceVersion", self.cache.resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self.watch_timeout)),
        ]
        try:
            async with self.api.client.stream(
                "GET",
                self.collection.path,
                params=httpx.QueryParams(tuple(params)),
                timeout=httpx.Timeout(30.0, read=self.watch_timeout + 30.0),
            ) as resp:
                if resp.status_code == 410:
                    return "relist"
                if resp.status_code >= 400:
                    raise KubeError(
                        f"watch {self.collection.path}: {resp.status_code}", resp.status_code
                    )
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise KubeError(f"watch {self.collection.path}: bad event line") from None
                    outcome = self.cache.apply(event)
                    if outcome == "changed":
                        self.on_change()
                    elif outcome == "relist":
                        return "relist"
                    elif outcome == "error":
                        raise KubeError(
                            f"watch {self.collection.path}: error event {str(event)[:200]}"
                        )
        except httpx.HTTPError as e:
            raise KubeError(f"watch {self.collection.path}: {e}") from None
        return "ended"

    async def run(self) -> None:
        attempt = 0
        need_list = True
        while True:
            try:
                if need_list:
                    await self.list()
                    need_list = False
                outcome = await self.watch()
                attempt = 0
                if outcome == "relist":
                    log.info(
                        "%s: resourceVersion %s is gone (410); relisting",
                        self.collection.kind,
                        self.cache.resource_version,
                    )
                    need_list = True
            except asyncio.CancelledError:
                raise
            except KubeError as e:
                if e.code == 404 and not self.cache.synced:
                    # The API is not installed: empty for now, look again later.
                    log.info(
                        "%s: not served by this cluster (%s); retrying in %.0fs",
                        self.collection.kind,
                        e,
                        self.missing_retry,
                    )
                    if self.cache.replace([], ""):
                        self.on_change()
                    self.cache.synced = True
                    need_list = True
                    await asyncio.sleep(self.missing_retry)
                    continue
                delay = backoff_delay(attempt, self.rng)
                attempt += 1
                need_list = need_list or not self.cache.resource_version
                log.warning("%s: %s; retrying in %.2fs", self.collection.kind, e, delay)
                await asyncio.sleep(delay)


class KubernetesSource:
    name = "kubernetes"

    def __init__(
        self,
        api: KubeAPI,
        collections: Sequence[Collection] = COLLECTIONS,
        *,
        rng: random.Random | None = None,
        watch_timeout: int = 300,
    ) -> None:
        self.api = api
        self._publish: Callable[[str, list[SourceDoc], list[Problem]], None] | None = None
        self.informers = [
            Informer(api, c, self._changed, rng=rng, watch_timeout=watch_timeout)
            for c in collections
        ]
        self.extra_tasks: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._synced = False

    @classmethod
    def from_environment(cls) -> KubernetesSource:
        return cls(KubeAPI.from_environment())

    def documents(self) -> list[SourceDoc]:
        return [
            SourceDoc(obj, "kubernetes", None)
            for inf in self.informers
            for obj in inf.cache.objects.values()
        ]

    def _changed(self) -> None:
        if not self._synced:
            self._synced = all(i.cache.synced for i in self.informers)
        if self._synced and self._publish is not None:
            self._publish(self.name, self.documents(), [])

    async def run(self, publish: Callable[[str, list[SourceDoc], list[Problem]], None]) -> None:
        self._publish = publish
        tasks = [
            asyncio.create_task(i.run(), name=f"informer-{i.collection.kind}")
            for i in self.informers
        ]
        tasks += [asyncio.create_task(t()) for t in self.extra_tasks]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()


# --- leader election (pure core + adapter) ------------------------------------------------------


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(s: str | None) -> float:
    if not s:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@dataclass(frozen=True, slots=True)
class LeaseDecision:
    action: str  # "create" | "update" | "wait"
    spec: dict[str, Any]
    leader: bool  # whether we lead once the write (if any) succeeds


def decide_lease(
    lease: dict[str, Any] | None, identity: str, now: float, duration: float
) -> LeaseDecision:
    """What to do with the Lease: create it, renew ours, take an expired one, or wait."""
    fresh = {
        "holderIdentity": identity,
        "leaseDurationSeconds": int(duration),
        "acquireTime": _rfc3339(now),
        "renewTime": _rfc3339(now),
        "leaseTransitions": 0,
    }
    if lease is None:
        return LeaseDecision("create", fresh, True)
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity") or ""
    transitions = int(spec.get("leaseTransitions") or 0)
    if holder == identity:
        return LeaseDecision(
            "update",
            {**spec, "renewTime": _rfc3339(now), "leaseDurationSeconds": int(duration)},
            True,
        )
    renewed = _parse_time(spec.get("renewTime"))
    held_for = float(spec.get("leaseDurationSeconds") or duration)
    if not holder or now > renewed + held_for:
        return LeaseDecision("update", {**fresh, "leaseTransitions": transitions + 1}, True)
    return LeaseDecision("wait", spec, False)


class LeaderElection:
    def __init__(
        self,
        api: KubeAPI,
        *,
        namespace: str = "synchro-system",
        name: str = "synchro-controller",
        identity: str | None = None,
        duration: float = 15.0,
        renew_every: float = 5.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.api = api
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}"
        self.duration, self.renew_every = duration, renew_every
        self.clock = clock or time.time
        self.is_leader = False

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"

    async def try_once(self) -> bool:
        try:
            lease = await self.api.request("GET", f"{self.path}/{self.name}")
        except KubeError as e:
            if e.code != 404:
                raise
            lease = None
        d = decide_lease(lease, self.identity, self.clock(), self.duration)
        try:
            if d.action == "create":
                await self.api.request(
                    "POST",
                    self.path,
                    body={
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": d.spec,
                    },
                )
            elif d.action == "update" and lease is not None:
                body = {**lease, "spec": d.spec}
                await self.api.request("PUT", f"{self.path}/{self.name}", body=body)
        except KubeError as e:
            if e.code == 409:  # another replica wrote first
                self.is_leader = False
                return False
            raise
        if d.leader != self.is_leader:
            log.info("leader election: %s %s", self.identity, "leads" if d.leader else "follows")
        self.is_leader = d.leader
        return d.leader

    async def run(self) -> None:
        while True:
            try:
                await self.try_once()
            except KubeError as e:
                log.warning("leader election: %s", e)
                self.is_leader = False
            await asyncio.sleep(self.renew_every)


# --- status conditions ---------------------------------------------------------------------------


def status_patch(
    p: Problem | None,
    kind: str,
    generation: int,
    now: float,
    parent_refs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A merge patch setting Accepted (or ResolvedRefs) on one resource."""
    cond = {
        "type": p.condition if p else "Accepted",
        "status": "False" if p else "True",
        "reason": p.reason if p else "Accepted",
        "message": (
            f"{p.field}: {p.message}"
            if p and p.field
            else p.message
            if p
            else "accepted by synchro"
        ),
        "observedGeneration": generation,
        "lastTransitionTime": _rfc3339(now),
    }
    if kind in ("HTTPRoute", "GRPCRoute"):
        parents = [
            {"parentRef": ref, "controllerName": CONTROLLER_NAME, "conditions": [cond]}
            for ref in (parent_refs or [{}])
        ]
        return {"status": {"parents": parents}}
    return {"status": {"conditions": [cond]}}


class StatusWriter:
    """Writes Accepted=False for invalid resources (and True again once fixed),
    only while this replica holds the Lease."""

    def __init__(
        self, api: KubeAPI, *, leader_election: bool = True, elector: LeaderElection | None = None
    ) -> None:
        import time

        self.api = api
        self.elector = elector or (LeaderElection(api) if leader_election else None)
        self._pending: dict[tuple[str, str, str], Problem | None] = {}
        self._written: dict[tuple[str, str, str], str] = {}
        self._wake = asyncio.Event()
        self.clock = time.time

    def report(self, problems: Sequence[Problem]) -> None:
        current: dict[tuple[str, str, str], Problem | None] = {}
        for p in problems:
            if (
                p.origin == "kubernetes"
                and p.kind in PLURALS
                and p.kind not in ("Namespace", "Service", "EndpointSlice", "Pod", "ConfigMap")
            ):
                current.setdefault((p.kind, p.namespace, p.name), p)
        for key in self._written:
            if key not in current:
                current[key] = None  # fixed: back to Accepted=True
        self._pending = current
        self._wake.set()

    def _leading(self) -> bool:
        return self.elector is None or self.elector.is_leader

    async def flush(self) -> None:
        if not self._leading():
            return
        for key, p in list(self._pending.items()):
            kind, ns, name = key
            want = p.line() if p else ""
            if p is None and key not in self._written:
                continue  # never reported, nothing to clear
            if p is not None and self._written.get(key) == want:
                continue  # already written
            group_version = (
                "synchro.dev/v1alpha1"
                if kind in ("TrafficPolicy", "PeerAuthentication", "AuthorizationPolicy")
                else "gateway.networking.k8s.io/v1"
            )
            path = f"/apis/{group_version}/namespaces/{ns}/{PLURALS[kind]}/{name}/status"
            try:
                await self.api.request(
                    "PATCH",
                    path,
                    body=status_patch(p, kind, 0, self.clock()),
                    content_type="application/merge-patch+json",
                )
            except KubeError as e:
                log.warning("status of %s %s/%s: %s", kind, ns, name, e)
                continue
            if p is None:
                self._written.pop(key, None)
            else:
                self._written[key] = want
        self._pending = {k: v for k, v in self._pending.items() if v is not None}

    async def run(self) -> None:
        if self.elector is not None:
            self._elector_task = asyncio.create_task(self.elector.run(), name="leader-election")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 5.0)
            self._wake.clear()
            await self.flush()
