"""Issue 5's remaining traffic gaps in network namespaces: RequestMirror for
gRPC (HTTP/2) through the client Pod's sidecar, with real ClusterIPs, a real
grpcio client and real gRPC servers in the workload Pods. Reuses the Pods and
proxy of tests/netns/test_traffic_netns.py (one set for this module)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from proxy import config as pc
from tests.netns import test_traffic_netns as traffic
from tests.netns.test_traffic_netns import ECHO, GRPC, SHADOW, World, _grpc_client

# The same Pods and proxy fixtures (a set of its own for this module).
world = traffic.world
mesh = traffic.mesh

pytestmark = pytest.mark.timeout(240)


def settle(read: Callable[[], int]) -> int:
    """The count once it stopped moving (copies are fire-and-forget)."""
    last = read()
    for _ in range(20):
        time.sleep(0.1)
        now = read()
        if now == last:
            break
        last = now
    return last


def _mirrored(mesh: World, mirror_port: int, percent: float) -> pc.Service:
    route = pc.Route(
        kind="grpc",
        name="shop/echo",
        rule=0,
        backends=(pc.WeightedBackend("shop/echo", GRPC),),
        filters=(
            pc.Filter(
                "RequestMirror",
                request_mirror=pc.RequestMirror(
                    service="shop/shadow", port=mirror_port, percent=percent
                ),
            ),
        ),
    )
    return mesh.service(
        "shop/echo", ECHO, ("a",), port=GRPC, target=GRPC, protocol="grpc", routes=(route,)
    )


def test_grpc_calls_are_mirrored_at_their_percentage(mesh: World) -> None:
    mesh.behave("c", grpc_unavailable=True)  # the mirror's answers are ignored
    shadow = mesh.service("shop/shadow", SHADOW, ("c",), port=GRPC, target=GRPC, protocol="grpc")
    mesh.apply([_mirrored(mesh, GRPC, 30.0), shadow])
    out = _grpc_client(mesh, 1000)
    assert out["errors"] == {}, out
    assert out["answers"] == {"a": 1000}
    copies = settle(lambda: int(mesh.stats("c")["grpc_calls"]))
    assert abs(copies / 1000 - 0.30) <= 0.04, copies
    assert int(mesh.stats("a")["grpc_calls"]) == 1000


def test_dead_grpc_mirror_fails_no_call(mesh: World) -> None:
    # The shadow's endpoint port has no server: every copy fails to connect.
    dead = mesh.service("shop/shadow", SHADOW, ("c",), port=GRPC, target=50099, protocol="grpc")
    mesh.apply([_mirrored(mesh, GRPC, 100.0), dead])
    out = _grpc_client(mesh, 200)
    assert out["errors"] == {}, out
    assert out["answers"] == {"a": 200}
