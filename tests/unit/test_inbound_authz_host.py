"""The inbound adapter hands the request's host to authorization whatever the
case of its field name: HTTP/1 clients send `Host`, HTTP/2 `:authority`."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.conn import Address, Direction, Downstream, Protocol, ProxyContext
from proxy.security import authz, inbound
from proxy.security.runtime import MeshSecurity, attach

DENY_BY_HOST = {
    "action": "DENY",
    "rules": [
        {"to": [{"operation": {"hosts": ["records.records.svc*"], "paths": ["/internal*"]}}]}
    ],
}


def downstream() -> Downstream:
    none: Any = None
    return Downstream(
        reader=none,
        writer=none,
        preread=b"",
        direction=Direction.INBOUND,
        protocol=Protocol.HTTP1,
        original_dst=Address("10.0.0.2", 8443),
        peer=Address("10.0.0.9", 40000),
        upstream=Address("127.0.0.1", 8443),
    )


@pytest.mark.parametrize(
    ("name", "host", "denied"),
    [
        (b"Host", b"records.records.svc.cluster.local", True),
        (b"host", b"records.records.svc:80", True),
        (b"HOST", b"records.records", False),
        (b":authority", b"records.records.svc", True),
    ],
)
def test_hosts_in_a_policy_see_the_host_field_in_any_case(
    name: bytes, host: bytes, denied: bool
) -> None:
    ctx = ProxyContext()
    security = MeshSecurity()
    security.policies = (authz.compile_policy("records/by-host", DENY_BY_HOST),)
    attach(ctx, security)
    out = inbound.http_request(
        ctx, downstream(), b"GET", b"/internal/x", [(b"Accept", b"*/*"), (name, host)]
    )
    assert isinstance(out, authz.Deny) is denied, out
