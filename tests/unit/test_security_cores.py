"""The pure cores of enrollment, inbound mTLS and outbound mTLS: decisions from
their inputs, with fixed clocks and seeded randomness."""

from __future__ import annotations

import datetime as dt
import random
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane import certs
from controlplane.ca import CertificateAuthority
from controlplane.tokens import Caller
from proxy import config as pc
from proxy import upstream
from proxy.conn import Address, Protocol
from proxy.registry import Registry
from proxy.security import authz, inbound, runtime
from proxy.security.enroll import EnrollError, TLSMaterial, next_wait, parse_response
from proxy.security.identity import WorkloadCertificate, make_csr, new_key

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


# --- inbound ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "is_tls", "mesh_alpn", "action"),
    [
        ("STRICT", False, False, inbound.Action.REFUSE),
        ("STRICT", True, True, inbound.Action.TERMINATE),
        ("STRICT", True, False, inbound.Action.TERMINATE),  # no mesh cert: the handshake fails
        ("PERMISSIVE", False, False, inbound.Action.PLAINTEXT),
        ("PERMISSIVE", True, True, inbound.Action.TERMINATE),
        ("PERMISSIVE", True, False, inbound.Action.OPAQUE),  # the app's own TLS
        ("DISABLE", False, False, inbound.Action.PLAINTEXT),
        ("DISABLE", True, True, inbound.Action.OPAQUE),
        ("DISABLE", True, False, inbound.Action.OPAQUE),
    ],
)
def test_inbound_action_by_mode(
    mode: str, is_tls: bool, mesh_alpn: bool, action: inbound.Action
) -> None:
    assert inbound.inbound_action(mode, is_tls, mesh_alpn)[0] is action


def _client_hello(alpn: list[str] | None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="web.shop")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_client_hello_alpn_from_a_real_client_hello() -> None:
    hello = _client_hello(["synchro-h2", "h2"])
    assert inbound.client_hello_alpn(hello) == ["synchro-h2", "h2"]
    assert inbound.client_hello_alpn(_client_hello(None)) == []
    # Incomplete: wait for more; not TLS: nothing offered.
    assert inbound.client_hello_alpn(hello[:3]) is inbound.NEED_MORE
    assert inbound.client_hello_alpn(hello[:40]) is inbound.NEED_MORE
    assert inbound.client_hello_alpn(b"GET / HTTP/1.1\r\n") == []


@given(st.binary(max_size=600))
def test_client_hello_alpn_never_raises(data: bytes) -> None:
    result = inbound.client_hello_alpn(b"\x16\x03\x01" + data)
    assert result is inbound.NEED_MORE or isinstance(result, list)


def test_inner_protocol_from_mesh_alpn() -> None:
    assert inbound.inner_protocol("synchro-h2") is Protocol.HTTP2
    assert inbound.inner_protocol("synchro-http/1.1") is Protocol.HTTP1
    assert inbound.inner_protocol("synchro-tcp") is Protocol.TCP
    assert inbound.inner_protocol("h2") is None
    assert inbound.inner_protocol(None) is None


def test_principal_and_namespace_from_a_spiffe_id() -> None:
    assert inbound.principal_of(FRONTEND) == ("cluster.local/ns/shop/sa/frontend", "shop")
    assert inbound.principal_of("spiffe://td/other") == ("td/other", None)
    assert inbound.principal_of(None) == (None, None)


def test_xfcc_is_set_by_the_hop_and_never_by_the_client() -> None:
    value = inbound.xfcc("spiffe://cluster.local/ns/secure/sa/web", FRONTEND, "ab12")
    assert value == f"By=spiffe://cluster.local/ns/secure/sa/web;Hash=ab12;URI={FRONTEND}"
    headers = [(b"host", b"web"), (b"X-Forwarded-Client-Cert", b"URI=forged")]
    assert inbound.set_xfcc(headers, value) == [
        (b"host", b"web"),
        (b"x-forwarded-client-cert", value.encode()),
    ]
    # No verified peer: the client's claim is dropped and nothing replaces it.
    assert inbound.set_xfcc(headers, None) == [(b"host", b"web")]
    assert inbound.xfcc("by", None, None) is None


# --- authorization policies from the proxy config ------------------------------------


def _peer(principal: str | None, ns: str | None = "shop") -> authz.Peer:
    return authz.Peer(principal, ns, "10.0.0.1")


def test_config_policies_compile_with_istio_semantics() -> None:
    policy = pc.AuthorizationPolicy(
        name="secure/frontend-only",
        action="ALLOW",
        rules=(
            pc.AuthorizationRule(
                from_=(pc.Source(principals=("cluster.local/ns/shop/sa/frontend",)),),
                to=(pc.Operation(methods=("GET",), not_paths=("/admin*",)),),
                when=(pc.Condition(key="request.headers[x-env]", values=("prod",)),),
            ),
        ),
    )
    (compiled,) = runtime.compile_policies((policy,))
    ok = authz.Request(port=80, method="GET", path="/", headers={"x-env": "prod"})
    front = _peer("cluster.local/ns/shop/sa/frontend")
    assert isinstance(authz.decide([compiled], front, ok), authz.Allow)
    for peer, req in (
        (_peer("cluster.local/ns/shop/sa/intruder"), ok),
        (front, authz.Request(port=80, method="POST", path="/", headers={"x-env": "prod"})),
        (front, authz.Request(port=80, method="GET", path="/admin/x", headers={"x-env": "prod"})),
        (front, authz.Request(port=80, method="GET", path="/")),
        (front, authz.Request(port=80, protocol="tcp")),  # L7 fields on TCP fail closed
    ):
        assert isinstance(authz.decide([compiled], peer, req), authz.Deny), (peer, req)


def test_a_policy_that_does_not_compile_denies_everything() -> None:
    broken = pc.AuthorizationPolicy(
        name="ns/broken",
        action="ALLOW",
        rules=(pc.AuthorizationRule(to=(pc.Operation(ports=("http",)),)),),
    )
    (compiled,) = runtime.compile_policies((broken,))
    assert compiled.action is authz.Action.DENY
    assert isinstance(authz.decide([compiled], _peer(None), authz.Request(port=80)), authz.Deny)


# --- outbound ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def material() -> TLSMaterial:
    ca = CertificateAuthority.generate()
    key = new_key()
    chain = ca.sign_csr(make_csr(key, FRONTEND), namespace="shop", service_account="frontend")
    return TLSMaterial.build(WorkloadCertificate.from_chain(chain, key), ca.trust_bundle_pem())


def _registry(meshed: bool, mode: str = "PERMISSIVE") -> Registry:
    ep = pc.Endpoint(
        ip="10.1.0.7", port=8080, identity="spiffe://cluster.local/ns/web/sa/web", meshed=meshed
    )
    svc = pc.Service(
        name="web",
        namespace="web",
        cluster_ips=("10.96.0.7",),
        ports=(pc.ServicePort(port=80, protocol="http", target_port=8080, endpoints=(ep,)),),
    )
    return Registry(
        pc.ProxyConfig(version="1", services=(svc,), mesh=pc.MeshSettings(default_mtls_mode=mode))
    )


def test_outbound_plan(material: TLSMaterial) -> None:
    to_pod = Address("10.1.0.7", 8080)
    p = upstream.plan(to_pod, _registry(True), "PERMISSIVE", material, "h2")
    assert isinstance(p, upstream.MutualTLS)
    assert p.expected_identity == "spiffe://cluster.local/ns/web/sa/web"
    assert p.context is material.client_for("h2")
    for address, registry, mode, mat, why in (
        (to_pod, None, "PERMISSIVE", material, "no config"),
        (to_pod, _registry(False), "PERMISSIVE", material, "no sidecar"),
        (to_pod, _registry(True), "DISABLE", material, "disabled"),
        (to_pod, _registry(True), "STRICT", None, "no workload certificate"),
        (Address("127.0.0.1", 8080), _registry(True), "PERMISSIVE", material, "no sidecar"),
    ):
        p = upstream.plan(address, registry, mode, mat, "http/1.1")
        assert isinstance(p, upstream.Plaintext) and why in p.reason, (why, p)
    # A Pod calling itself: its proxy's traffic bypasses its own inbound side.
    p = upstream.plan(
        to_pod, _registry(True), "PERMISSIVE", material, "tcp", frozenset({"10.1.0.7"})
    )
    assert isinstance(p, upstream.Plaintext) and p.reason == "own Pod"


def test_each_inner_protocol_has_its_own_client_context(material: TLSMaterial) -> None:
    assert len({id(material.client_for(p)) for p in ("http/1.1", "h2", "h2c", "tcp")}) == 3


# --- enrollment -------------------------------------------------------------------


def test_renewal_at_half_life_with_jitter_and_backoff_after_failures() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    day = dt.timedelta(hours=24)
    waits = [next_wait(now, now + day, now, 0, random.Random(i)) for i in range(200)]
    assert all(0.4 * 86400 <= w <= 0.6 * 86400 for w in waits)
    assert max(waits) - min(waits) > 3600  # jitter spreads a fleet out
    assert next_wait(None, None, now, 0, random.Random(1)) == 0.0
    later = now + day * 0.7  # past the renewal time: at once
    assert next_wait(now, now + day, later, 0, random.Random(1)) == 0.0
    backoffs = [next_wait(now, now + day, now, f, random.Random(3), cap=60) for f in range(1, 12)]
    assert all(0 <= b <= 60 for b in backoffs)


def test_parse_response_errors_are_clear() -> None:
    with pytest.raises(EnrollError, match=r"403.*another"):
        parse_response(403, {"error": "another identity"}, FRONTEND)
    with pytest.raises(EnrollError, match="chain"):
        parse_response(200, {"trust_bundle": ["x"]}, FRONTEND)
    with pytest.raises(EnrollError, match="asked for"):
        parse_response(
            200, {"chain": ["a"], "trust_bundle": ["b"], "spiffe_id": "spiffe://x"}, FRONTEND
        )
    assert parse_response(200, {"chain": ["a"], "trust_bundle": ["b"]}, FRONTEND) == (["a"], ["b"])


# --- the controller's checks ----------------------------------------------------------


def test_requested_identity_and_caller_check() -> None:
    csr = make_csr(new_key(), FRONTEND)
    assert certs.requested_identity(csr) == FRONTEND
    assert certs.check_caller(FRONTEND, Caller("shop", "frontend"), "cluster.local") == FRONTEND
    with pytest.raises(certs.Forbidden, match=r"token is spiffe://cluster\.local/ns/shop/sa/admin"):
        certs.check_caller(FRONTEND, Caller("shop", "admin"), "cluster.local")
    with pytest.raises(certs.BadRequest):
        certs.requested_identity(b"garbage")


def test_parse_body_takes_a_bearer_token() -> None:
    assert certs.parse_body(b'{"csr": "x"}', "Bearer abc") == (b"x", "abc")
    with pytest.raises(certs.Unauthenticated):
        certs.parse_body(b'{"csr": "x"}')
    with pytest.raises(certs.BadRequest):
        certs.parse_body(b'{"token": "x"}')
