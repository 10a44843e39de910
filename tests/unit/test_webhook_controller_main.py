"""`synchro-controller` start-up: flags and the one-line errors for bad ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane import main as controller


def run(argv: list[str], capsys: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code = controller.main(argv)
    return code, capsys.readouterr().err


def test_host_port() -> None:
    assert controller.host_port("127.0.0.1:9443") == ("127.0.0.1", 9443)
    assert controller.host_port(":9443") == ("0.0.0.0", 9443)
    assert controller.host_port("[::1]:9443") == ("::1", 9443)
    for bad in ("9443", "host:", "host:99999", "host:http"):
        with pytest.raises(Exception, match="HOST:PORT"):
            controller.host_port(bad)


def test_bad_listen_address_is_a_usage_error(capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        controller.build_parser().parse_args(["--webhook-listen", "nowhere"])
    assert info.value.code == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_no_certificate_outside_a_cluster(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    code, err = run(["--webhook-listen", "127.0.0.1:0"], capsys, monkeypatch)
    assert code == 2
    assert "--tls-cert" in err and "cluster" in err


def test_cert_without_key(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cert = tmp_path / "tls.crt"
    cert.write_text("x")
    code, err = run(["--tls-cert", str(cert)], capsys, monkeypatch)
    assert code == 2
    assert "go together" in err


def test_missing_cert_file(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--tls-cert", str(tmp_path / "a"), "--tls-key", str(tmp_path / "b")]
    code, err = run(argv, capsys, monkeypatch)
    assert code == 2
    assert "no such file" in err


def test_bad_mesh_config(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("proxyConcurrency: lots\n")
    code, err = run(["--mesh-config", str(mesh)], capsys, monkeypatch)
    assert code == 2
    assert "proxyConcurrency" in err and "lots" in err


def test_env_names_from_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCHRO_SERVICE_NAME", "svc")
    monkeypatch.setenv("SYNCHRO_WEBHOOK_CONFIG", "hooks")
    monkeypatch.setenv("POD_NAMESPACE", "mesh")
    args = controller.build_parser().parse_args([])
    assert (args.webhook_service, args.webhook_configuration, args.namespace) == (
        "svc",
        "hooks",
        "mesh",
    )
