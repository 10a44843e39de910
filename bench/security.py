"""Security benchmarks: mTLS between sidecars, TLS handshakes, certificate issuance.

    python3 bench/security.py [--seconds S] [--json PATH]

1. TLS connections per second per core on the inbound side: `openssl s_time
   -new` (a full handshake with a client certificate, then one GET of 1 KiB)
   against a synchro-proxy sidecar in STRICT mode in front of nginx, and against
   HAProxy terminating TLS the same way; the server's CPU seconds come from
   /proc, so the figure is connections per CPU-second of the server.
2. Certificates issued per second through the API: h2load POSTs CSRs (one CSR,
   signed again each time, with a valid token) to `POST /v1/certificates` of a
   real synchro-controller over HTTPS; we report the wall-clock rate and the
   rate per CPU-second of the controller (target >= 1,000/s).

The mTLS request path (client sidecar -> mTLS -> server sidecar -> nginx vs two
HAProxies doing TLS between them) is a path of bench/proxy.py:
`--path synchro-mtls --path haproxy-tls`; its launchers live here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import ipaddress
import json
import os
import re
import shutil
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import (
    LOOPBACK,
    BenchError,
    HostPort,
    Placement,
    Proc,
    Processes,
    free_port,
    parse_h2load,
    plan_placement,
    run_tool,
    tree_cpu_seconds,
    wait_for_http,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[1]
TRUST_DOMAIN = "cluster.local"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/nginx"


def _command(name: str, module: str) -> list[str]:
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synchro-controller bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
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
    return cert_path, key_path


@dataclass
class Controller:
    """A real synchro-controller (API only) with its CA in `directory`."""

    proc: Proc
    address: HostPort
    directory: Path
    api_cert: Path

    @classmethod
    def start(cls, procs: Processes, workdir: Path, cpus: frozenset[int]) -> Controller:
        directory = workdir / "controller"
        (directory / "config").mkdir(parents=True, exist_ok=True)
        cert, key = _self_signed(directory)
        port = free_port()
        argv = [
            *_command("synchro-controller", "controlplane.main"),
            "--no-webhook",
            "--log-level=warning",
            f"--config-dir={directory / 'config'}",
            f"--api-listen={LOOPBACK}:{port}",
            f"--tls-cert={cert}",
            f"--tls-key={key}",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHRO_")}
        proc = procs.start("synchro-controller", argv, cpus=cpus, cwd=REPO, env=env)
        c = cls(proc, (LOOPBACK, port), directory, cert)
        c.wait_ready()
        return c

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.api_cert))

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                raise BenchError(f"synchro-controller exited:\n{self.proc.log_tail()}")
            try:
                conn = http.client.HTTPSConnection(*self.address, timeout=1, context=self._ssl())
                conn.request("GET", "/healthz/ready")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError(f"synchro-controller not ready:\n{self.proc.log_tail()}")

    @property
    def url(self) -> str:
        return f"https://{self.address[0]}:{self.address[1]}"

    def token(self, namespace: str, service_account: str) -> str:
        from controlplane.certs import load_token_key
        from controlplane.tokens import LocalTokens

        tokens = LocalTokens(load_token_key(self.directory / "token-key.pem"))
        return tokens.mint(namespace, service_account, ttl=dt.timedelta(hours=2))

    def issue(self, namespace: str, service_account: str) -> tuple[list[str], list[str], bytes]:
        """(chain, trust bundle, key PEM) for a workload, through the API."""
        from proxy.security.identity import make_csr, new_key

        key = new_key()
        spiffe = f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"
        body = json.dumps(
            {"csr": make_csr(key, spiffe).decode(), "token": self.token(namespace, service_account)}
        )
        conn = http.client.HTTPSConnection(*self.address, timeout=10, context=self._ssl())
        conn.request("POST", "/v1/certificates", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        if resp.status != 200:
            raise BenchError(f"certificate refused: {answer}")
        from cryptography.hazmat.primitives import serialization

        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return answer["chain"], answer["trust_bundle"], key_pem

    def sidecar_env(self, workdir: Path, namespace: str, service_account: str) -> dict[str, str]:
        token = workdir / f"token-{namespace}-{service_account}"
        token.write_text(self.token(namespace, service_account))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHRO_")}
        env.update(
            {
                "SYNCHRO_CONTROLLER": self.url,
                "SYNCHRO_CONTROLLER_CA": str(self.api_cert),
                "POD_NAMESPACE": namespace,
                "POD_NAME": f"{service_account}-0",
                "SERVICE_ACCOUNT": service_account,
                "SYNCHRO_TOKEN_FILE": str(token),
            }
        )
        return env


# --- the two sidecars with mTLS between them -------------------------------------------


def _configs(workdir: Path, protocol: str, server_inbound: int) -> tuple[Path, Path]:
    from proxy import config as pc

    endpoint = pc.Endpoint(ip=LOOPBACK, port=server_inbound, identity=SERVER_ID, meshed=True)
    service = pc.Service(
        name="nginx",
        namespace="bench",
        ports=(
            pc.ServicePort(
                port=server_inbound,
                protocol="http" if protocol == "http1" else "http2",
                endpoints=(endpoint,),
            ),
        ),
    )
    client = pc.ProxyConfig(version="bench", services=(service,))
    server = pc.ProxyConfig(
        version="bench",
        inbound=pc.Inbound(peer_authentication=pc.PeerAuthentication(mode="STRICT")),
    )
    paths = workdir / f"mtls-client-{protocol}.json", workdir / f"mtls-server-{protocol}.json"
    paths[0].write_text(json.dumps(client.to_dict()))
    paths[1].write_text(json.dumps(server.to_dict()))
    return paths


def start_server_sidecar(
    procs: Processes,
    workdir: Path,
    controller: Controller,
    protocol: str,
    upstream: HostPort,
    cpus: frozenset[int],
) -> tuple[Proc, int]:
    inbound, status = free_port(), free_port()
    _, server_cfg = _configs(workdir, protocol, inbound)
    argv = [
        *_command("synchro-proxy", "proxy.main"),
        "--outbound-listen=",
        f"--inbound-listen={LOOPBACK}:{inbound}",
        f"--status-listen={LOOPBACK}:{status}",
        "--admin-listen=",
        f"--static-destination={upstream[0]}:{upstream[1]}",
        f"--config-file={server_cfg}",
        "--log-level=warning",
    ]
    env = controller.sidecar_env(workdir, "bench", "nginx")
    proc = procs.start(f"sidecar-server-{protocol}", argv, cpus=cpus, cwd=REPO, env=env)
    wait_for_http((LOOPBACK, status), "/healthz/ready", proc=proc, timeout_s=30)
    return proc, inbound


def start_client_sidecar(
    procs: Processes,
    workdir: Path,
    controller: Controller,
    protocol: str,
    server_inbound: int,
    cpus: frozenset[int],
) -> tuple[Proc, int]:
    outbound, status = free_port(), free_port()
    client_cfg, _ = _configs(workdir, protocol, server_inbound)
    argv = [
        *_command("synchro-proxy", "proxy.main"),
        f"--outbound-listen={LOOPBACK}:{outbound}",
        "--inbound-listen=",
        f"--status-listen={LOOPBACK}:{status}",
        "--admin-listen=",
        f"--static-destination={LOOPBACK}:{server_inbound}",
        f"--config-file={client_cfg}",
        "--log-level=warning",
    ]
    env = controller.sidecar_env(workdir, "bench", "client")
    proc = procs.start(f"sidecar-client-{protocol}", argv, cpus=cpus, cwd=REPO, env=env)
    wait_for_http((LOOPBACK, status), "/healthz/ready", proc=proc, timeout_s=30)
    return proc, outbound


# --- HAProxy doing TLS on both sides of its hop ------------------------------------------


def haproxy_tls_configs(
    workdir: Path, controller: Controller, protocol: str, upstream: HostPort
) -> tuple[Path, Path, int, int]:
    """A client-side HAProxy (plain in, TLS with a client certificate out) and a
    server-side one (TLS in, client certificate required, plain to nginx)."""
    pem = {}
    for who in ("client", "nginx"):
        chain, bundle, key = controller.issue("bench", who)
        path = workdir / f"haproxy-{who}.pem"
        path.write_bytes("".join(chain).encode() + key)
        pem[who] = path
    ca = workdir / "haproxy-ca.pem"
    ca.write_text("".join(bundle))
    front, back = free_port(), free_port()
    h2 = protocol == "h2c"
    alpn = "h2" if h2 else "http/1.1"
    common = "global\n    nbthread 1\n    maxconn 4096\n\ndefaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n"
    client = common + (
        f"frontend bench\n    bind {LOOPBACK}:{front}{' proto h2' if h2 else ''}\n    default_backend mesh\n\n"
        f"backend mesh\n    server peer {LOOPBACK}:{back} ssl verify required ca-file {ca} "
        f"crt {pem['client']} alpn {alpn} ssl-min-ver TLSv1.2\n"
    )
    server = common + (
        f"frontend mesh\n    bind {LOOPBACK}:{back} ssl crt {pem['nginx']} ca-file {ca} "
        f"verify required alpn {alpn} ssl-min-ver TLSv1.2\n    default_backend nginx\n\n"
        f"backend nginx\n    server nginx {upstream[0]}:{upstream[1]}{' proto h2' if h2 else ''}\n"
    )
    paths = (
        workdir / f"haproxy-tls-client-{protocol}.cfg",
        workdir / f"haproxy-tls-server-{protocol}.cfg",
    )
    paths[0].write_text(client)
    paths[1].write_text(server)
    return paths[0], paths[1], front, back


def start_haproxy(procs: Processes, name: str, cfg: Path, port: int, cpus: frozenset[int]) -> Proc:
    exe = shutil.which("haproxy")
    if not exe:
        raise BenchError("haproxy not installed (apt-get install haproxy)")
    proc = procs.start(name, [exe, "-db", "-f", str(cfg)], cpus=cpus)
    wait_for_port((LOOPBACK, port), proc=proc)
    return proc


# --- 1. TLS connections per second per core ----------------------------------------------


_S_TIME = re.compile(r"(\d+) connections in ([\d.]+)s")


def s_time(port: int, cert: Path, key: Path, seconds: float, cpus: frozenset[int]) -> int:
    out = run_tool(
        [
            "openssl",
            "s_time",
            "-connect",
            f"{LOOPBACK}:{port}",
            "-new",
            "-time",
            str(int(seconds)),
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-www",
            "/1k.bin",
        ],
        cpus=cpus,
        timeout_s=seconds + 30,
    )
    found = _S_TIME.findall(out)
    if not found:
        raise BenchError(f"openssl s_time printed no result:\n{out[-1500:]}")
    return int(found[0][0])


def handshakes(
    procs: Processes,
    workdir: Path,
    placement: Placement,
    controller: Controller,
    nginx: HostPort,
    seconds: float,
) -> dict[str, Any]:
    chain, _, key = controller.issue("bench", "client")
    cert_path, key_path = workdir / "s_time.crt", workdir / "s_time.key"
    cert_path.write_text("".join(chain))
    key_path.write_bytes(key)
    out: dict[str, Any] = {}
    sidecar, inbound = start_server_sidecar(
        procs, workdir, controller, "http1", nginx, placement.proxy
    )
    _, server_cfg, _, back = haproxy_tls_configs(workdir, controller, "http1", nginx)
    haproxy = start_haproxy(procs, "haproxy-tls-server", server_cfg, back, placement.proxy)
    for name, proc, port in (("synchro-proxy", sidecar, inbound), ("haproxy", haproxy, back)):
        s_time(port, cert_path, key_path, 1, placement.load)  # warm-up
        cpu0 = tree_cpu_seconds([proc.pid])
        t0 = time.monotonic()
        n = s_time(port, cert_path, key_path, seconds, placement.load)
        wall = time.monotonic() - t0
        cpu = tree_cpu_seconds([proc.pid]) - cpu0
        out[name] = {
            "connections": n,
            "per_second": n / wall,
            "server_cpu_s": cpu,
            "per_core_second": n / cpu if cpu > 0 else None,
        }
    return out


# --- 2. certificates issued per second ---------------------------------------------------


def issuance(
    workdir: Path, placement: Placement, controller: Controller, seconds: float
) -> dict[str, Any]:
    from proxy.security.identity import make_csr, new_key

    spiffe = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/load"
    body = workdir / "csr.json"
    body.write_text(
        json.dumps(
            {
                "csr": make_csr(new_key(), spiffe).decode(),
                "token": controller.token("bench", "load"),
            }
        )
    )
    url = f"{controller.url}/v1/certificates"
    base = ["h2load", "--h1", "-c", "32", "-d", str(body), "-H", "content-type: application/json"]
    run_tool([*base, "-n", "500", url], cpus=placement.load, timeout_s=60)  # warm-up
    cpu0 = tree_cpu_seconds([controller.proc.pid])
    text = run_tool(
        [*base, "-D", str(int(seconds)), url], cpus=placement.load, timeout_s=seconds + 60
    )
    cpu = tree_cpu_seconds([controller.proc.pid]) - cpu0
    result = parse_h2load(text)
    issued = result.requests - result.non_2xx - result.errors
    return {
        "issued": issued,
        "failed": result.non_2xx + result.errors,
        "per_second": issued / result.duration_s if result.duration_s else None,
        "controller_cpu_s": cpu,
        "per_core_second": issued / cpu if cpu > 0 else None,
    }


# --- main ------------------------------------------------------------------------------------


def start_nginx(procs: Processes, workdir: Path, cpus: frozenset[int]) -> HostPort:
    from bench.proxy import BODY_PATH, BODY_SIZE, nginx_config

    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    www = workdir / "www"
    (workdir / "nginx-tmp").mkdir(exist_ok=True)
    www.mkdir(exist_ok=True)
    (www / BODY_PATH.lstrip("/")).write_bytes(b"x" * BODY_SIZE)
    for p in (workdir, www, www / BODY_PATH.lstrip("/")):
        p.chmod(0o755)
    h1, h2 = free_port(), free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, h1, h2))
    proc = procs.start(
        "nginx", [exe, "-e", "stderr", "-p", str(workdir), "-c", str(conf)], cpus=cpus
    )
    wait_for_http((LOOPBACK, h1), BODY_PATH, proc=proc)
    return (LOOPBACK, h1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/security.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = p.parse_args(argv)
    if not 1 <= args.seconds <= 600:
        print("bench/security.py: --seconds must be 1-600", file=sys.stderr)
        return 2
    for tool in ("openssl", "h2load", "haproxy", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench/security.py: {tool} not installed", file=sys.stderr)
            return 2
    placement = plan_placement([] if args.no_pin else sorted(os.sched_getaffinity(0)))
    try:
        with (
            tempfile.TemporaryDirectory(prefix="synchro-bench-sec-") as tmp,
            Processes(Path(tmp)) as procs,
        ):
            workdir = Path(tmp)
            print("starting nginx and synchro-controller ...", file=sys.stderr)
            nginx = start_nginx(procs, workdir, placement.backend)
            controller = Controller.start(procs, workdir, placement.proxy)
            print("TLS connections (handshake + 1 KiB GET) ...", file=sys.stderr)
            hs = handshakes(procs, workdir, placement, controller, nginx, args.seconds)
            print("certificate issuance ...", file=sys.stderr)
            certs = issuance(workdir, placement, controller, args.seconds)
    except BenchError as exc:
        print(f"bench/security.py: {exc}", file=sys.stderr)
        return 2
    print("TLS connections per second (openssl s_time -new, client certificate, one GET):")
    for name, r in hs.items():
        per_core = r["per_core_second"]
        print(
            f"  {name:14s} {r['per_second']:8.0f}/s wall   {per_core:8.0f}/s per server core"
            if per_core
            else f"  {name:14s} not measured"
        )
    print("Certificates issued through POST /v1/certificates (h2load, 32 connections):")
    print(
        f"  {certs['per_second']:8.0f}/s wall   {certs['per_core_second'] or 0:8.0f}/s per "
        f"controller core   ({certs['failed']} failed)   target >= 1,000/s: "
        f"{'pass' if (certs['per_second'] or 0) >= 1000 else 'miss'}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"handshakes": hs, "certificates": certs}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- launchers for bench/proxy.py's paths -------------------------------------------------


def launch_synchro_mtls(ctx: Any, protocol: str, upstream: HostPort) -> Any:
    """Client sidecar -> mTLS -> server sidecar (STRICT) -> nginx; both proxies counted."""
    from bench.proxy import Hop

    workdir = ctx.workdir / f"mtls-{protocol}"
    controller = Controller.start(ctx.procs, workdir, ctx.placement.backend)
    server, inbound = start_server_sidecar(
        ctx.procs, workdir, controller, protocol, upstream, ctx.placement.proxy
    )
    client, outbound = start_client_sidecar(
        ctx.procs, workdir, controller, protocol, inbound, ctx.placement.proxy
    )
    return Hop(front=(LOOPBACK, outbound), procs=(client, server))


def launch_haproxy_tls(ctx: Any, protocol: str, upstream: HostPort) -> Any:
    """Two HAProxies with mutual TLS between them, as the sidecar pair's baseline."""
    from bench.proxy import Hop

    workdir = ctx.workdir / f"haproxy-tls-{protocol}"
    controller = Controller.start(ctx.procs, workdir, ctx.placement.backend)
    client_cfg, server_cfg, front, back = haproxy_tls_configs(
        workdir, controller, protocol, upstream
    )
    server = start_haproxy(
        ctx.procs, f"haproxy-tls-server-{protocol}", server_cfg, back, ctx.placement.proxy
    )
    client = start_haproxy(
        ctx.procs, f"haproxy-tls-client-{protocol}", client_cfg, front, ctx.placement.proxy
    )
    ctx.procs.stop(controller.proc)  # only needed to issue the certificates
    return Hop(front=(LOOPBACK, front), procs=(client, server))
