"""Metadata exchange for metrics labels (proxy.telemetry.telemetry.PEER_WORKLOAD):
the caller's sidecar names its workload only over mesh mTLS; the callee's
sidecar believes it only from a verified identity, only once, and always strips
it. Outbound records name the destination Pod from the pushed endpoints.
The end-to-end check (two sidecars, real mTLS, Prometheus) is in
tests/netns/test_telemetry_netns.py."""

from __future__ import annotations

from hpack import NeverIndexedHeaderTuple

from proxy import config as pc
from proxy.conn import Direction
from proxy.headers import forward_request
from proxy.registry import Registry
from proxy.security.runtime import MeshSecurity
from proxy.telemetry.telemetry import (
    PEER_WORKLOAD,
    Telemetry,
    TelemetrySettings,
    replace_trace_headers,
)

CLIENT = "spiffe://cluster.local/ns/tel/sa/client"


class Transport:
    """Answers `get_extra_info("ssl_object")` as an asyncio transport does."""

    def __init__(self, tls: bool) -> None:
        self.tls = tls

    def get_extra_info(self, name: str, default: object = None) -> object:
        return object() if name == "ssl_object" and self.tls else default


def telemetry(workload: str = "client") -> Telemetry:
    return Telemetry(TelemetrySettings(workload=workload, namespace="tel"))


REQUEST = [b"GET", b" ", b"/x", b" HTTP/1.1\r\n", b"Host: server\r\n", b"\r\n"]


def test_named_only_over_mtls() -> None:
    t = telemetry()
    assert t.tag_http1(REQUEST, Transport(tls=False)) is REQUEST
    assert t.tag_http1(REQUEST, None) is REQUEST
    tagged = b"".join(t.tag_http1(REQUEST, Transport(tls=True)))
    assert tagged == b"GET /x HTTP/1.1\r\nx-synchro-peer-workload: client\r\nHost: server\r\n\r\n"
    h2 = [(b":method", b"GET"), (b":path", b"/")]
    assert t.tag_http2(h2, Transport(tls=False)) is h2
    assert t.tag_http2(h2, Transport(tls=True)) == [*h2, (PEER_WORKLOAD, b"client")]


def test_a_proxy_without_a_usable_workload_name_sends_nothing() -> None:
    for name in ("", "Bad Name", "a\r\nx-evil: 1"):
        assert telemetry(name).tag_http1(REQUEST, Transport(tls=True)) is REQUEST


def inbound(peer: str | None, headers: list[tuple[bytes, bytes]]) -> tuple[str, list[bytes]]:
    t = telemetry("server")
    rec, _ = t.begin(Direction.INBOUND, "http", headers)
    t.note_peer(rec, peer)
    out = t.take_peer_workload(rec, peer, headers)
    return rec.source_workload, [n.lower() for n, _ in out]


def test_believed_from_a_verified_peer_and_always_stripped() -> None:
    headers = [(b"host", b"server"), (b"X-Synchro-Peer-Workload", b"client")]
    assert inbound(CLIENT, headers) == ("client", [b"host"])
    # Plaintext: not believed, still removed before the app sees it.
    assert inbound(None, headers) == ("", [b"host"])


def test_twice_or_malformed_is_not_believed() -> None:
    twice = [(PEER_WORKLOAD, b"forged"), (b"host", b"s"), (PEER_WORKLOAD, b"client")]
    assert inbound(CLIENT, twice) == ("", [b"host"])
    assert inbound(CLIENT, [(PEER_WORKLOAD, b"UPPER case")]) == ("", [])


def test_no_field_no_copy() -> None:
    t = telemetry("server")
    rec, _ = t.begin(Direction.INBOUND, "http", [])
    headers = [(b"host", b"server")]
    assert t.take_peer_workload(rec, CLIENT, headers) is headers


def test_outbound_records_name_the_destination_pod() -> None:
    config = pc.ProxyConfig(
        version="1",
        services=(
            pc.Service(
                name="server",
                namespace="tel",
                cluster_ips=("10.96.0.10",),
                ports=(
                    pc.ServicePort(
                        port=80,
                        target_port=8080,
                        endpoints=(
                            pc.Endpoint(
                                ip="10.213.0.3",
                                port=8080,
                                identity="spiffe://cluster.local/ns/tel/sa/server",
                                meshed=True,
                                pod="tel/server-0",
                            ),
                        ),
                    ),
                ),
            ),
        ),
    )

    class Snapshot:
        def __init__(self) -> None:
            self.config = config
            self.registry = Registry(config)

    security = MeshSecurity()
    security.on_config(Snapshot())
    t = telemetry()
    t.describe_upstream = security.describe_upstream
    rec, _ = t.begin(Direction.OUTBOUND, "http", [])
    rec.upstream_host = "10.213.0.3:8080"
    t.end(rec)
    assert (rec.destination_workload, rec.destination_namespace, rec.destination_principal) == (
        "server",
        "tel",
        "spiffe://cluster.local/ns/tel/sa/server",
    )
    unknown, _ = t.begin(Direction.OUTBOUND, "http", [])
    unknown.upstream_host = "192.0.2.1:80"
    t.end(unknown)
    assert unknown.destination_workload == ""


def test_an_apps_own_field_never_leaves_its_sidecar() -> None:
    """Over mTLS the callee believes the field, so the caller's sidecar must not
    forward one the app wrote, whether or not it adds its own."""
    forged = (PEER_WORKLOAD, b"payments")
    h2 = [(b":method", b"GET"), (b":path", b"/"), forged]
    assert telemetry().tag_http2(h2, Transport(tls=True)) == [*h2[:2], (PEER_WORKLOAD, b"client")]
    assert telemetry("Bad Name").tag_http2(h2, Transport(tls=True)) == h2[:2]
    # HTTP/1: the forwarded head never has the app's copy (any case).
    lines, _ = forward_request(
        [(b"Host", b"server"), (b"X-Synchro-Peer-Workload", b"payments")],
        new_request_id=lambda: b"id",
        default_host=b"server",
    )
    assert not any(line.lower().startswith(PEER_WORKLOAD) for line in lines), lines


def test_filtering_keeps_never_indexed_fields_never_indexed() -> None:
    """RFC 7541 7.1.3: a field the client marked never-indexed stays so on the
    next hop, also when telemetry filters the list it belongs to."""
    secret = NeverIndexedHeaderTuple(b"authorization", b"Bearer x")
    t = telemetry("server")
    rec, _ = t.begin(Direction.INBOUND, "http", [])
    out = t.take_peer_workload(rec, CLIENT, [secret, (PEER_WORKLOAD, b"client")])
    assert out == [secret] and type(out[0]) is NeverIndexedHeaderTuple
    replaced = replace_trace_headers([secret, (b"traceparent", b"old")], [(b"traceparent", b"new")])
    assert type(replaced[0]) is NeverIndexedHeaderTuple
