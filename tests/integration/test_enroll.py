"""Enrollment through the real controller endpoint, over HTTPS.

The controller is the real `synchro-controller` process; its CA lives in the
test's work directory (the directory of its serving certificate), and tokens are
minted with the token key it created there, as `synchro up` does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from controlplane.certs import load_token_key
from controlplane.tokens import LocalTokens
from proxy.security.enroll import EnrollError, Enrollment, EnrollSettings
from proxy.security.identity import make_csr, new_key
from tests.integration.controller_harness import ControllerProcess

SHOP_FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    work = tmp_path_factory.mktemp("enroll")
    config = work / "config"
    config.mkdir()
    old = os.environ.get("SYNCHRO_CERT_LIFETIME")
    os.environ["SYNCHRO_CERT_LIFETIME"] = "4"  # renewal after ~2 s
    c = ControllerProcess(config, work)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        if old is None:
            os.environ.pop("SYNCHRO_CERT_LIFETIME", None)
        else:
            os.environ["SYNCHRO_CERT_LIFETIME"] = old


@pytest.fixture(scope="module")
def tokens(controller: ControllerProcess) -> LocalTokens:
    return LocalTokens(load_token_key(controller.workdir / "token-key.pem"))


def post(controller: ControllerProcess, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        controller.url + "/v1/certificates",
        data=data,
        method="POST",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, context=controller.ssl, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def csr_for(spiffe_id: str) -> str:
    return make_csr(new_key(), spiffe_id).decode()


def wait_log(controller: ControllerProcess, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = controller.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the controller log:\n{controller.log()[-3000:]}")


def test_the_ca_root_key_is_stored_private(controller: ControllerProcess) -> None:
    for name in ("root-key.pem", "token-key.pem"):
        mode = stat.S_IMODE((controller.workdir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))


def test_a_good_token_and_csr_get_a_chain_that_verifies(
    controller: ControllerProcess, tokens: LocalTokens
) -> None:
    status, body = post(
        controller, {"csr": csr_for(SHOP_FRONTEND), "token": tokens.mint("shop", "frontend")}
    )
    assert status == 200, body
    assert body["spiffe_id"] == SHOP_FRONTEND
    leaf, *intermediates = (x509.load_pem_x509_certificate(c.encode()) for c in body["chain"])
    roots = [x509.load_pem_x509_certificate(c.encode()) for c in body["trust_bundle"]]
    assert (controller.workdir / "root.pem").read_text() in body["trust_bundle"]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SHOP_FRONTEND]
    # The chain verifies against the bundle with a verifier we did not write
    # (OpenSSL, which also enforces the CA's URI name constraints).
    work = controller.workdir
    (work / "leaf.pem").write_text(body["chain"][0])
    (work / "inter.pem").write_text("".join(body["chain"][1:]))
    (work / "bundle.pem").write_text("".join(body["trust_bundle"]))
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(work / "bundle.pem"),
            "-untrusted",
            str(work / "inter.pem"),
            str(work / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)
    assert len(intermediates) == 1 and len(roots) == 1
    # The pushed proxy config carries the same roots as its trust bundle.
    cfg = controller.get("/v1/config?namespace=shop&pod=frontend-0&wait=0")
    assert cfg["trust_bundle"] == body["trust_bundle"]


def test_bad_tokens_are_401_with_a_log_line(
    controller: ControllerProcess, tokens: LocalTokens
) -> None:
    forger = LocalTokens(ec.generate_private_key(ec.SECP256R1()))
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cases = {
        "audience": tokens.mint("shop", "frontend", audience="kubernetes"),
        "Signature": forger.mint("shop", "frontend"),
        "expired": tokens.mint("shop", "frontend", now=old, ttl=dt.timedelta(hours=1)),
        "token rejected": "not-a-jwt",
    }
    for reason, token in cases.items():
        status, body = post(controller, {"csr": csr_for(SHOP_FRONTEND), "token": token})
        assert status == 401, (reason, body)
        assert reason in body["error"], (reason, body)
        wait_log(controller, "certificate refused (401) for unauthenticated")
    status, body = post(controller, {"csr": csr_for(SHOP_FRONTEND)})
    assert status == 401 and "token" in body["error"]


def test_a_csr_for_another_service_account_is_403(
    controller: ControllerProcess, tokens: LocalTokens
) -> None:
    for other in (
        "spiffe://cluster.local/ns/shop/sa/admin",
        "spiffe://cluster.local/ns/payments/sa/frontend",
        "spiffe://evil.example/ns/shop/sa/frontend",
    ):
        status, body = post(
            controller, {"csr": csr_for(other), "token": tokens.mint("shop", "frontend")}
        )
        assert status == 403, (other, body)
        assert other in body["error"] and SHOP_FRONTEND in body["error"]
    wait_log(controller, "certificate refused (403) for shop/frontend")


def _csr(key: Any, sans: list[x509.GeneralName] | None) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_garbage_is_400(controller: ControllerProcess, tokens: LocalTokens) -> None:
    token = tokens.mint("shop", "frontend")
    p256 = ec.generate_private_key(ec.SECP256R1())
    uri = x509.UniformResourceIdentifier(SHOP_FRONTEND)
    cases: list[tuple[bytes | dict[str, Any], str]] = [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        ({"token": token}, "csr"),
        ({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "token": token}, "csr"),
        ({"csr": _csr(p256, None), "token": token}, "subjectAltName"),
        (
            {"csr": _csr(p256, [uri, x509.DNSName("frontend.shop")]), "token": token},
            "exactly one",
        ),
        (
            {"csr": _csr(rsa.generate_private_key(65537, 2048), [uri]), "token": token},
            "P-256",
        ),
        (b"x" * 70000, "larger"),
    ]
    for body, expected in cases:
        status, answer = post(controller, body)
        assert status == 400, (expected, answer)
        assert expected in answer["error"], (expected, answer)
    wait_log(controller, "certificate refused (400)")
    # The controller is still serving after all that.
    assert controller.get("/healthz/ready")["ready"]


def test_a_proxy_enrolls_and_renews_with_a_fresh_key(
    controller: ControllerProcess, tokens: LocalTokens, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(tokens.mint("shop", "frontend", pod="frontend-0"))
    settings = EnrollSettings.from_env(
        {
            "SYNCHRO_CONTROLLER": f"127.0.0.1:{controller.port}",
            "SYNCHRO_CONTROLLER_CA": str(controller.cert),
            "POD_NAMESPACE": "shop",
            "SERVICE_ACCOUNT": "frontend",
            "SYNCHRO_TOKEN_FILE": str(token_file),
        }
    )
    assert settings is not None and settings.spiffe_id == SHOP_FRONTEND

    async def scenario() -> None:
        enrollment = Enrollment(settings)
        assert enrollment.ready_reason() is not None  # not ready without a certificate
        enrollment.start()
        try:
            deadline = time.monotonic() + 10
            while enrollment.material is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            first = enrollment.material
            assert first is not None, enrollment.last_error
            assert enrollment.ready_reason() is None
            assert first.spiffe_id == SHOP_FRONTEND
            while enrollment.renewals < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            second = enrollment.material
            assert second is not None and second is not first, enrollment.status()
            assert second.cert.chain_pem[0] != first.cert.chain_pem[0]
            assert second.cert.key.public_key() != first.cert.key.public_key()
            # Renewal came at about half the 4 s life, not when the old one expired.
            assert second.cert.not_after - first.cert.not_after < dt.timedelta(seconds=4)
        finally:
            await enrollment.stop()

    asyncio.run(scenario())


def test_a_refused_enrollment_says_why(
    controller: ControllerProcess, tokens: LocalTokens, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(tokens.mint("shop", "frontend"))
    settings = EnrollSettings(
        controller=controller.url,
        namespace="shop",
        service_account="admin",  # not what the token says
        token_file=token_file,
        controller_ca=str(controller.cert),
    )

    async def scenario() -> None:
        with pytest.raises(EnrollError, match="403"):
            await Enrollment(settings).enroll_once()
        token_file.unlink()
        with pytest.raises(EnrollError, match="token"):
            await Enrollment(settings).enroll_once()

    asyncio.run(scenario())


def test_a_real_synchro_proxy_enrolls_and_is_ready_only_with_a_certificate(
    controller: ControllerProcess, tokens: LocalTokens, tmp_path: Path
) -> None:
    from tests.integration import proxy_harness

    token_file = tmp_path / "token"
    env = {
        "SYNCHRO_CONTROLLER": f"127.0.0.1:{controller.port}",
        "SYNCHRO_CONTROLLER_CA": str(controller.cert),
        "POD_NAMESPACE": "shop",
        "POD_NAME": "frontend-1",
        "SERVICE_ACCOUNT": "frontend",
        "SYNCHRO_TOKEN_FILE": str(token_file),
    }
    # No token yet: the proxy has its config but no certificate, so it is not ready.
    with pytest.raises(RuntimeError, match=r"not ready(.|\n)*ServiceAccount token"):
        proxy_harness.start_proxy(env=env, ready_timeout=3.0)
    token_file.write_text(tokens.mint("shop", "frontend", pod="frontend-1"))
    proxy = proxy_harness.start_proxy(env=env, ready_timeout=15.0)
    try:
        dump = proxy.admin_json("/config_dump")
        security = dump["security"]
        assert security["spiffe_id"] == SHOP_FRONTEND
        assert security["enrollment"]["not_after"] is not None
        assert security["enrollment"]["trust_bundle_roots"] == 1
        # Renewal (the controller issues 4 s certificates) keeps it ready.
        deadline = time.monotonic() + 10
        while proxy.admin_json("/config_dump")["security"]["enrollment"]["renewals"] < 1:
            assert time.monotonic() < deadline, proxy.log()[-3000:]
            time.sleep(0.2)
        status, _ = proxy.get("/healthz/ready")
        assert status == 200
    finally:
        proxy.stop()
