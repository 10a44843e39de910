"""`synchro_certificate_expiry_timestamp_seconds` follows the proxy's workload
certificate: set at enrollment, moved forward at each renewal. Real controller
(its CA signs 4 s certificates here, so the sidecar renews about every 2 s), the
proxy's real enrollment client and security runtime, /metrics as exposed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.certs import load_token_key
from controlplane.tokens import LocalTokens
from tests.integration.controller_harness import ControllerProcess
from tests.integration.mesh_harness import MeshProxy, has_cert

LIFETIME = 4


@pytest.fixture
def proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MeshProxy]:
    config = tmp_path / "config"
    config.mkdir()
    monkeypatch.setenv("SYNCHRO_CERT_LIFETIME", str(LIFETIME))  # read by the controller process
    controller = ControllerProcess(config, tmp_path)
    controller.start()
    try:
        tokens = LocalTokens(load_token_key(tmp_path / "token-key.pem"))
        with MeshProxy(
            controller, tokens, tmp_path, namespace="shop", service_account="web",
            labels={"app": "web"},
        ) as p:  # fmt: skip
            p.wait_ready(has_cert, "enrolled")
            yield p
    finally:
        controller.stop()


def exposed_expiry(p: MeshProxy) -> float:
    assert p.ctx is not None
    text = p.call(lambda: p.ctx.telemetry.exposition()[0].decode())  # type: ignore[union-attr]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "synchro_certificate_expiry_timestamp_seconds":
                return float(sample.value)
    raise AssertionError("synchro_certificate_expiry_timestamp_seconds not exposed")


def test_expiry_metric_is_the_certificates_and_follows_renewal(proxy: MeshProxy) -> None:
    first = proxy.call(lambda: proxy.enrollment.current)
    assert first is not None
    assert exposed_expiry(proxy) == first.not_after.timestamp()
    assert time.time() < exposed_expiry(proxy) <= time.time() + LIFETIME + 1
    deadline = time.monotonic() + 4 * LIFETIME
    while proxy.call(lambda: proxy.enrollment.renewals) < 1:
        assert time.monotonic() < deadline, "no renewal"
        time.sleep(0.1)
    renewed = proxy.call(lambda: proxy.enrollment.current)
    assert renewed is not None and renewed.not_after > first.not_after
    assert exposed_expiry(proxy) == renewed.not_after.timestamp()
