"""KubernetesSource, leader election and status writes against the FAKE API
server in fake_apiserver.py (list/watch JSON, bookmarks, 410 Gone)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from controlplane import compiler
from controlplane.server import Controller
from controlplane.sources.kubernetes import (
    COLLECTIONS,
    InformerCache,
    KubeAPI,
    KubernetesSource,
    LeaderElection,
    StatusWriter,
    decide_lease,
)
from controlplane.validation import Problem, SourceDoc
from tests.integration.fake_apiserver import FakeAPIServer, run_fake_apiserver

SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
TPS = "/apis/synchro.dev/v1alpha1/trafficpolicies"


def service(name: str, ip: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "shop",
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {
            "clusterIP": ip,
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def endpoint_slice(svc: str, ips: list[str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{svc}-x",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
        "ports": [{"name": "http", "port": 8080}],
    }


@pytest.fixture
def fake() -> Iterator[FakeAPIServer]:
    with run_fake_apiserver(bookmark_interval=0.1) as f:
        yield f


async def until(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return v


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


class Published:
    def __init__(self) -> None:
        self.calls: list[list[SourceDoc]] = []

    def __call__(self, source: str, docs: list[SourceDoc], problems: list[Problem]) -> None:
        assert source == "kubernetes" and problems == []
        self.calls.append(docs)

    def names(self, kind: str) -> set[str]:
        return (
            {d.doc["metadata"]["name"] for d in self.calls[-1] if d.doc["kind"] == kind}
            if self.calls
            else set()
        )


def test_list_then_watch_with_bookmarks_and_relist_on_410(fake: FakeAPIServer) -> None:
    fake.put(SERVICES, service("a", "10.96.0.1"))

    async def scenario() -> None:
        api = KubeAPI(fake.url)
        src = KubernetesSource(api, rng=random.Random(1), watch_timeout=5)
        pub = Published()
        task = asyncio.create_task(src.run(pub))
        try:
            # Published only once every collection has listed, with kinds filled in.
            await until(lambda: pub.calls, "first publish")
            assert pub.names("Service") == {"a"}
            assert all(d.doc["apiVersion"] and d.doc["kind"] for d in pub.calls[-1])
            svc_informer = next(i for i in src.informers if i.collection.path == SERVICES)
            assert svc_informer.relists == 1

            # Watch: additions, changes and deletions arrive.
            fake.put(SERVICES, service("b", "10.96.0.2"))
            await until(lambda: pub.names("Service") == {"a", "b"}, "watch ADDED")
            fake.delete(SERVICES, "shop", "a")
            await until(lambda: pub.names("Service") == {"b"}, "watch DELETED")

            # Bookmarks move the resourceVersion on without any change to services.
            before = int(svc_informer.cache.resource_version)
            for i in range(3):
                fake.put(SLICES, endpoint_slice("b", [f"10.1.0.{i}"]))
            await until(lambda: int(svc_informer.cache.resource_version) > before + 2, "bookmark")
            calls = len(pub.calls)

            # 410 Gone: the history is compacted; the informer relists and goes on.
            fake.compact()
            await until(lambda: svc_informer.relists >= 2, "relist after 410")
            fake.put(SERVICES, service("c", "10.96.0.3"))
            await until(lambda: pub.names("Service") == {"b", "c"}, "watch after relist")
            assert len(pub.calls) > calls
            assert any("watch=1" in r and "allowWatchBookmarks=true" in r for r in fake.requests)

            # Errors on watch: backoff with jitter, then the watch resumes.
            fake.fail_next_watches = 2
            fake.compact()
            fake.put(SERVICES, service("d", "10.96.0.4"))
            await until(lambda: "d" in pub.names("Service"), "recovery after errors")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.aclose()

    run(scenario)


def test_controller_compiles_from_the_cluster(fake: FakeAPIServer) -> None:
    fake.put(SERVICES, service("web", "10.96.0.10"))
    fake.put(SLICES, endpoint_slice("web", ["10.1.0.1", "10.1.0.2"]))
    fake.put(
        TPS,
        {
            "apiVersion": "synchro.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"retry": {"attempts": 99}},
        },
    )

    async def scenario() -> None:
        api = KubeAPI(fake.url)
        src = KubernetesSource(api, watch_timeout=5)
        writer = StatusWriter(api, leader_election=False)
        ctl = Controller([src], on_problems=writer.report)
        src.extra_tasks.append(writer.run)
        async with ctl.running():
            await until(lambda: ctl.hub.has_snapshot.is_set(), "first snapshot")
            cfg = compiler.compile(ctl.hub.snapshot.resources, compiler.ProxyInfo("shop"))
            (web,) = cfg.services
            assert web.cluster_ips == ("10.96.0.10",)
            assert [e.ip for e in web.ports[0].endpoints] == ["10.1.0.1", "10.1.0.2"]
            # The invalid policy got a status condition through the API.
            await until(lambda: fake.status_patches, "status patch")
            path, body = fake.status_patches[0]
            assert path == "/apis/synchro.dev/v1alpha1/namespaces/shop/trafficpolicies/bad/status"
            (cond,) = body["status"]["conditions"]
            assert (cond["type"], cond["status"], cond["reason"]) == (
                "Accepted",
                "False",
                "Invalid",
            )
            assert cond["message"].startswith("spec.retry.attempts:")

            # Scaling the endpoints reaches the compiled config.
            fake.put(SLICES, endpoint_slice("web", ["10.1.0.3"]))

            def eps() -> list[str]:
                c = compiler.compile(ctl.hub.snapshot.resources, compiler.ProxyInfo("shop"))
                return [e.ip for e in c.services[0].ports[0].endpoints]

            await until(lambda: eps() == ["10.1.0.3"], "new endpoints")
            # Fixing the policy sets Accepted=True again.
            fake.put(
                TPS,
                {
                    "apiVersion": "synchro.dev/v1alpha1",
                    "kind": "TrafficPolicy",
                    "metadata": {"name": "bad", "namespace": "shop"},
                    "spec": {"retry": {"attempts": 2}},
                },
            )
            await until(lambda: len(fake.status_patches) >= 2, "status cleared")
            assert fake.status_patches[-1][1]["status"]["conditions"][0]["status"] == "True"
        await api.aclose()

    run(scenario)


def test_lease_decisions() -> None:
    d = decide_lease(None, "a", 1000.0, 15)
    assert (d.action, d.leader, d.spec["holderIdentity"]) == ("create", True, "a")
    held = {"spec": d.spec}
    assert decide_lease(held, "b", 1005.0, 15).action == "wait"
    renew = decide_lease(held, "a", 1005.0, 15)
    assert renew.action == "update" and renew.leader
    take = decide_lease(held, "b", 1016.0, 15)  # expired: renewTime + 15 s passed
    assert (
        take.action == "update"
        and take.leader
        and take.spec["holderIdentity"] == "b"
        and take.spec["leaseTransitions"] == 1
    )


def test_leader_election_over_a_lease(fake: FakeAPIServer) -> None:
    async def scenario() -> None:
        api = KubeAPI(fake.url)
        now = [1000.0]
        a = LeaderElection(api, identity="a", duration=15, clock=lambda: now[0])
        b = LeaderElection(api, identity="b", duration=15, clock=lambda: now[0])
        assert await a.try_once() and not await b.try_once()
        now[0] += 10
        assert await a.try_once() and not await b.try_once()  # renewed in time
        now[0] += 16  # a stops renewing
        assert await b.try_once() and b.is_leader
        assert not await a.try_once() and not a.is_leader
        await api.aclose()

    run(scenario)


def test_informer_cache_core() -> None:
    c = InformerCache("v1", "Service")
    assert c.replace([{"metadata": {"name": "a", "namespace": "n", "resourceVersion": "5"}}], "10")
    assert not c.replace(
        [{"metadata": {"name": "a", "namespace": "n", "resourceVersion": "5"}}], "11"
    )
    assert c.objects[("n", "a")]["kind"] == "Service"
    assert (
        c.apply({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}})
        == "unchanged"
    )
    assert c.resource_version == "20"
    assert c.apply({"type": "ERROR", "object": {"kind": "Status", "code": 410}}) == "relist"
    assert c.apply({"type": "ERROR", "object": {"kind": "Status", "code": 500}}) == "error"
    assert (
        c.apply({"type": "DELETED", "object": {"metadata": {"name": "zz", "namespace": "n"}}})
        == "unchanged"
    )
    assert (
        c.apply(
            {
                "type": "DELETED",
                "object": {"metadata": {"name": "a", "namespace": "n", "resourceVersion": "21"}},
            }
        )
        == "changed"
    )
    assert c.apply("garbage") == "error" and c.apply({"type": "WEIRD", "object": {}}) == "error"
    assert {col.kind for col in COLLECTIONS} >= {
        "Service",
        "EndpointSlice",
        "Pod",
        "HTTPRoute",
        "TrafficPolicy",
    }
