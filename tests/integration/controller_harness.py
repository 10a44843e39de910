"""Run `synchro-controller` (discovery + push API) as a real subprocess over HTTPS
on a free loopback port, with a throwaway self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.proxy_harness import free_port


def write_self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synchro-controller test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "api.crt", directory / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class ControllerProcess:
    config_dir: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.cert, self.key = write_self_signed(self.workdir)
        self.ssl = ssl.create_default_context(cafile=str(self.cert))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"controller-{self.starts}.log"

    def log(self) -> str:
        return "".join(
            (self.workdir / f"controller-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
            if (self.workdir / f"controller-{i}.log").exists()
        )

    def start(self, timeout: float = 20.0) -> None:
        self.starts += 1
        cmd = [
            sys.executable,
            "-m",
            "controlplane.main",
            "--no-webhook",
            "--config-dir",
            str(self.config_dir),
            "--api-listen",
            f"127.0.0.1:{self.port}",
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
        ]
        out = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"controller exited early:\n{self.log()}")
            with suppress(OSError, ValueError):
                if self.get("/healthz/ready").get("ready"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"controller not ready in {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no goodbye to the proxies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, context=self.ssl, timeout=10) as resp:
            return json.loads(resp.read())

    def get(self, path: str) -> Any:
        return self.request("GET", path)


@contextmanager
def run_controller(config_dir: Path, workdir: Path) -> Iterator[ControllerProcess]:
    c = ControllerProcess(config_dir, workdir)
    try:
        c.start()
        yield c
    finally:
        c.stop()
