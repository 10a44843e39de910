"""Consistent hashing follows the backend a route chose (its own TrafficPolicy),
as Istio applies the destination host's DestinationRule behind a VirtualService."""

from __future__ import annotations

import random

from proxy import config as pc
from proxy.conn import Address, Direction
from proxy.engine import Call, Engine
from proxy.registry import Registry

VIP = "10.96.0.10"
STICKY = pc.TrafficPolicy(
    load_balancer=pc.LoadBalancer(
        type="ring_hash", consistent_hash=pc.ConsistentHash(header="x-user")
    )
)


def service(key: str, vip: str, ips: list[str], **kw: object) -> pc.Service:
    ns, name = key.split("/")
    port = pc.ServicePort(
        port=80, protocol="http", endpoints=tuple(pc.Endpoint(ip=ip, port=8080) for ip in ips)
    )
    return pc.Service(name=name, namespace=ns, cluster_ips=(vip,), ports=(port,), **kw)  # type: ignore[arg-type]


def picks(e: Engine, user: bytes, n: int = 20) -> set[str]:
    seen = set()
    for i in range(n):
        c = e.request(
            Direction.OUTBOUND, Address(VIP, 80), b"GET", b"/", [(b"x-user", user)], now=i
        )
        assert isinstance(c, Call)
        target = c.next_address(i)
        assert isinstance(target, Address)
        seen.add(target.host)
        c.result(i + 0.001, status=200)
        c.finish(i + 0.001)
    return seen


def test_a_route_backend_with_consistent_hash_is_sticky_per_header() -> None:
    route = pc.Route(
        kind="http", name="bank/accounts", rule=0, backends=(pc.WeightedBackend("bank/v1", 80, 1),)
    )
    replicas = ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"]
    e = Engine(rng=random.Random(3))
    config = pc.ProxyConfig(
        version="1",
        mesh=pc.MeshSettings(),
        services=(
            service("bank/accounts", VIP, ["10.0.9.9"], routes=(route,)),
            service("bank/v1", "10.96.0.11", replicas, policy=STICKY),
        ),
    )
    e.apply(Registry(config))
    chosen = {user: picks(e, user) for user in (b"alice", b"bob", b"carol", b"dave", b"erin")}
    assert all(len(seen) == 1 for seen in chosen.values()), chosen
    assert len(set().union(*chosen.values())) > 1  # users spread over the replicas
