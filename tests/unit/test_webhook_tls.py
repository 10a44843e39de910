"""The controller's self-signed webhook certificate and its caBundle."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from kubernetes.client import V1ObjectMeta, V1Secret
from kubernetes.client.exceptions import ApiException

from controlplane import webhook_tls as tls

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NAMES = tls.service_dns_names()


def verify(cert: tls.ServingCert, name: str, when: dt.datetime) -> None:
    leaf, *chain = x509.load_pem_x509_certificates(cert.cert_pem)
    store = Store([x509.load_pem_x509_certificate(cert.ca_pem)])
    verifier = PolicyBuilder().store(store).time(when).build_server_verifier(x509.DNSName(name))
    verifier.verify(leaf, chain)


def test_service_names() -> None:
    assert "synchro-controller.synchro-system.svc" in NAMES
    assert tls.service_dns_names("s", "ns")[-1] == "s.ns.svc.cluster.local"


def test_serving_cert_verifies_for_every_service_name() -> None:
    cert = tls.self_signed(NAMES, NOW)
    for name in NAMES:
        verify(cert, name, NOW + dt.timedelta(days=1))
    with pytest.raises(VerificationError):
        verify(cert, "evil.example", NOW)
    with pytest.raises(VerificationError):
        verify(cert, NAMES[2], NOW + dt.timedelta(days=400))


def test_other_ca_does_not_verify() -> None:
    cert = tls.self_signed(NAMES, NOW)
    other_pem, _ = tls.make_ca("other", NOW)
    with pytest.raises(VerificationError):
        verify(tls.ServingCert(other_pem, cert.cert_pem, cert.key_pem), NAMES[2], NOW)


def test_is_usable() -> None:
    cert = tls.self_signed(NAMES, NOW)
    assert tls.is_usable(cert, NAMES, NOW)
    assert not tls.is_usable(cert, [*NAMES, "new.name"], NOW)
    assert not tls.is_usable(cert, NAMES, NOW + tls.SERVING_VALIDITY - dt.timedelta(days=10))
    assert not tls.is_usable(tls.ServingCert(b"x", b"y", b"z"), NAMES, NOW)


def test_secret_round_trip() -> None:
    cert = tls.self_signed(NAMES, NOW)
    assert tls.from_secret_data(tls.to_secret_data(cert)) == cert  # type: ignore[arg-type]
    assert tls.from_secret_data({"tls.crt": "x"}) is None
    assert tls.from_secret_data(None) is None


def test_ca_bundle_patch() -> None:
    ca = b"-----BEGIN CERTIFICATE-----\n...\n"
    bundle = base64.b64encode(ca).decode()
    config = {
        "webhooks": [
            {"name": "a", "clientConfig": {"service": {"name": "s"}}},
            {"name": "b", "clientConfig": {"caBundle": bundle}},
            {"name": "c", "clientConfig": {"caBundle": "old"}},
        ]
    }
    ops = tls.ca_bundle_patch(config, ca)
    assert ops == [
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": bundle},
        {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": bundle},
    ]
    assert tls.ca_bundle_patch({"webhooks": None}, ca) == []


def test_memory_file_serves_tls() -> None:
    cert = tls.self_signed(["localhost"], dt.datetime.now(dt.UTC))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(
        tls.memory_file("tls.crt", cert.cert_pem), tls.memory_file("tls.key", cert.key_pem)
    )


class FakeCoreV1:
    """An in-memory stand-in for the Secret calls of CoreV1Api (no API server here)."""

    def __init__(self, race_with: V1Secret | None = None) -> None:
        self.secrets: dict[str, V1Secret] = {}
        self.race_with = race_with
        self.writes = 0

    def read_namespaced_secret(self, name: str, namespace: str) -> V1Secret:
        if name not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        return self.secrets[name]

    def create_namespaced_secret(self, namespace: str, body: Any) -> V1Secret:
        if self.race_with is not None:
            # Another replica created it between our read and our create.
            self.secrets[body.metadata.name] = self.race_with
            self.race_with = None
            raise ApiException(status=409, reason="AlreadyExists")
        self.writes += 1
        body.metadata.resource_version = "1"
        self.secrets[body.metadata.name] = body
        return body

    def replace_namespaced_secret(self, name: str, namespace: str, body: Any) -> V1Secret:
        self.writes += 1
        self.secrets[name] = body
        return body


def test_ensure_creates_then_reuses() -> None:
    api = FakeCoreV1()
    first = tls.ensure_serving_cert(api, "synchro-system", NAMES)
    second = tls.ensure_serving_cert(api, "synchro-system", NAMES)
    assert first == second
    assert api.writes == 1


def test_ensure_uses_the_winner_of_a_race() -> None:
    winner = tls.self_signed(NAMES, dt.datetime.now(dt.UTC))
    secret = V1Secret(metadata=V1ObjectMeta(name=tls.SECRET_NAME), data=tls.to_secret_data(winner))
    api = FakeCoreV1(race_with=secret)
    assert tls.ensure_serving_cert(api, "synchro-system", NAMES) == winner


def test_ensure_renews_a_certificate_for_other_names() -> None:
    api: Any = FakeCoreV1()
    old = tls.ensure_serving_cert(api, "synchro-system", ["old.svc"])
    new = tls.ensure_serving_cert(api, "synchro-system", NAMES)
    assert new != old
    assert api.writes == 2
