"""`synchro up`: a whole mesh on one machine, supervised in the background.

`synchro up DIR` starts a supervisor process (`python -m synchro.local.mesh
supervise ...`, its own session, like `docker compose up -d`) and follows its
progress through a status file until every Pod is ready or one fails. The
supervisor owns everything the mesh is made of:

- a node network namespace with a bridge (`synchro.local.netns.Node`); every
  Pod is a namespace on it. Nothing is added to the host's own namespace: the
  mesh is an island, reachable through `synchro exec`;
- `synchro-controller` inside the node namespace: the webhook on
  127.0.0.1:9443 (HTTPS, a certificate from a CA generated per mesh), the
  controller API on the bridge address `<gateway>:15012` (HTTPS, same CA), which
  is the proxies' `SYNCHRO_CONTROLLER`, and `--config-dir DIR`, so the
  controller's FileSource applies edits in DIR by itself;
- each Pod: sent as an AdmissionReview to the real webhook over HTTPS (when its
  namespace is meshed or the Pod opts in), the returned JSON Patch applied with
  `jsonpatch`, its hosts file written, then run by `synchro.local.pod`; it is
  reported to the controller (`PUT /v1/pods/{ns}/{name}`, the Pod manifest with
  `status.podIP` and the Ready condition) when it starts and whenever its
  readiness changes, and deleted from it when it stops;
- the node's Service fallback (`servicenat`) and every Pod's hosts file, both
  rewritten when Services, endpoints or readiness change;
- the one opening onto the host: a relay (synchro/local/relay.py) from
  127.0.0.1:15014 (`--dashboard-port`; 0: none) to the controller's dashboard
  in the node namespace, so a browser on the host can open it; a taken port is
  reported and the mesh comes up without it;
- a watch of DIR: a Pod added, removed or changed in a file (replicas, a new
  template) is started, stopped or replaced; a container that exits is
  restarted with back-off (a Job's Pod completes instead).

State lives in `/run/synchro/<mesh>/` (`mesh.json`: what to clean up;
`status.json`: Pods, phases, containers' environment; `logs/`: one file per
container per Pod, `logs/<ns>/<pod>/<container>.log`). `synchro down`
asks the supervisor to stop (SIGTERM) and then removes whatever is left by the
recorded prefix, so a killed supervisor is cleaned up the same way.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from proxy import ports
from synchro.local import hosts, netns, probes, relay, servicenat
from synchro.local.manifests import (
    ManifestError,
    Manifests,
    PodSpec,
    load,
    local_key,
    signature,
)
from synchro.local.netns import LocalError, Node, Process, base_env, wrap_argv
from synchro.local.pod import (
    Pod,
    PodStartError,
    probe_once,
    resolve_command,
    spawn_step,
    start_pod,
)
from synchro.local.podplan import APP, INIT, SIDECAR, PodSpecError, Probe, Step

log = logging.getLogger(__name__)

RUN_ROOT = Path(os.environ.get("SYNCHRO_RUN_DIR", "/run/synchro"))
DEFAULT_MESH = "synchro"
DEFAULT_SUBNET = "10.213.0.0/24"
WEBHOOK_ADDRESS = ("127.0.0.1", ports.WEBHOOK_PORT)
API_PORT = 15012
DASHBOARD_HOST = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = ports.CONTROLLER_METRICS_PORT
CONTROLLER_CA_ENV = "SYNCHRO_CONTROLLER_CA"
CONTROLLER_CA_FILE = "controller-ca.crt"
INJECTED_ANNOTATION = "synchro.dev/status"
TICK_SECONDS = 0.5
PROBE_SECONDS = 1.0
RESTART_BACKOFF_MAX = 30.0

_MESH_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
_FAILED_CONTAINER = re.compile(r"^[^/\s]+/([A-Za-z0-9._-]+)")


class MeshError(Exception):
    """Something about a local mesh that the user must know; the message says what."""


# --- where a mesh keeps its state ------------------------------------------------------


@dataclass(frozen=True)
class MeshPaths:
    name: str
    root: Path = RUN_ROOT

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def info(self) -> Path:
        return self.dir / "mesh.json"

    @property
    def status(self) -> Path:
        return self.dir / "status.json"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def pods_logs(self) -> Path:
        # synchro.local.pod writes <key>/<container>.log here; logs/<ns>/<pod> links to it.
        return self.dir / "pods"

    @property
    def tls(self) -> Path:
        return self.dir / "tls"

    @property
    def supervisor_log(self) -> Path:
        return self.dir / "supervisor.log"

    @property
    def controller_log(self) -> Path:
        return self.logs / "synchro-system" / "synchro-controller" / "synchro-controller.log"


def check_name(name: str) -> str:
    if not _MESH_NAME.match(name):
        raise MeshError(
            f"mesh name {name!r}: lowercase letters, digits and '-', at most 16, starting "
            "with a letter"
        )
    return name


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def proc_start_time(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int | None, start: int | None) -> bool:
    """Whether `pid` is still the process that started at `start` (and not a zombie)."""
    if pid is None or start is None or proc_start_time(pid) != start:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def list_meshes(root: Path = RUN_ROOT) -> list[str]:
    try:
        return sorted(p.name for p in root.iterdir() if (p / "mesh.json").exists())
    except FileNotFoundError:
        return []


def resolve_mesh(name: str | None, root: Path = RUN_ROOT) -> MeshPaths:
    """The mesh a command means: the named one, or the only one that exists."""
    if name:
        paths = MeshPaths(check_name(name), root)
        if not paths.info.exists():
            raise MeshError(f"no mesh named {name!r} is up (nothing in {paths.dir})")
        return paths
    meshes = list_meshes(root)
    if not meshes:
        raise MeshError("no mesh is up; start one with `synchro up DIR`")
    if len(meshes) > 1:
        raise MeshError(f"several meshes are up ({', '.join(meshes)}); pick one with --mesh")
    return MeshPaths(meshes[0], root)


# --- TLS for the webhook and the controller API ------------------------------------------


def write_tls(directory: Path, ip_sans: Sequence[str]) -> tuple[Path, Path, Path]:
    """A CA and a serving certificate signed by it (names: localhost, the
    controller's in-cluster names, and `ip_sans`). Returns (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synchro up local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    dns = [
        "localhost",
        "synchro-controller",
        "synchro-controller.synchro-system",
        "synchro-controller.synchro-system.svc",
        "synchro-controller.synchro-system.svc.cluster.local",
    ]
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_sans]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synchro-controller")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.crt",
        directory / "tls.crt",
        directory / "tls.key",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    ca_path.chmod(0o644)  # the proxies (uid 1337) read it
    return ca_path, cert_path, key_path


# --- HTTP(S) from inside a network namespace -----------------------------------------------


class _NetnsHTTPConnection(http.client.HTTPSConnection):
    """HTTP or HTTPS whose socket lives in another network namespace."""

    def __init__(
        self, netns_name: str, host: str, port: int, context: ssl.SSLContext | None, timeout: float
    ) -> None:
        super().__init__(
            host, port, timeout=timeout, context=context or ssl.create_default_context()
        )
        self._netns = netns_name
        self._tls = context is not None

    def connect(self) -> None:
        sock = netns.netns_socket(self._netns)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        if self._tls:
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
        else:
            self.sock = sock


def netns_request(
    netns_name: str,
    method: str,
    host: str,
    port: int,
    path: str,
    body: Any = None,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One request from inside `netns_name`; JSON body in, (status, raw body) out."""
    conn = _NetnsHTTPConnection(netns_name, host, port, context, timeout)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- the supervisor ------------------------------------------------------------------------

PENDING = "Pending"
ADMITTING = "Admitting"
STARTING = "Starting"
RUNNING = "Running"
READY = "Ready"
FAILED = "Failed"
COMPLETED = "Completed"
TERMINATING = "Terminating"


@dataclass
class PodRecord:
    spec: PodSpec
    key: str
    netns: str
    meshed: bool = False
    phase: str = PENDING
    message: str = ""
    container: str = ""
    pod: Pod | None = None
    ready: bool = False
    failures: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    restart_at: dict[str, float] = field(default_factory=dict)
    # Liveness probing per container, its (re)start time, why the mesh last killed it.
    liveness: dict[str, probes.Liveness] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    kill_reason: dict[str, str] = field(default_factory=dict)
    reported: tuple[str, bool] | None = None
    since: float = field(default_factory=time.monotonic)
    ready_seconds: float | None = None
    starting: bool = True  # its start thread owns it until then

    @property
    def ip(self) -> str:
        return self.pod.ip if self.pod is not None else ""


@dataclass(frozen=True)
class Options:
    name: str
    directory: Path
    subnet: str = DEFAULT_SUBNET
    timeout: float = 60.0  # for each Pod to become ready
    parallel: int = 4
    grace: float = 2.0  # SIGTERM to SIGKILL when stopping a Pod
    dashboard_port: int = DEFAULT_DASHBOARD_PORT  # on the host's 127.0.0.1; 0: none


class Supervisor:
    def __init__(self, options: Options, paths: MeshPaths) -> None:
        self.options = options
        self.paths = paths
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.node: Node | None = None
        self.prefix = netns.new_prefix(options.name)
        self.records: dict[str, PodRecord] = {}
        self.manifests = Manifests()
        self.signature: tuple[Any, ...] = ()
        self.cluster_ips: dict[str, tuple[str, ...]] = {}
        self.controller: Process | None = None
        self.controller_restarts = 0
        self.controller_restart_at = 0.0
        self.ctx: ssl.SSLContext | None = None
        self.ca_path: Path | None = None
        self.phase = "starting"
        self.error = ""
        self.warnings: list[str] = []
        self.relay: relay.Relay | None = None
        self.dashboard: dict[str, str] = {"url": "", "error": ""}
        self.pool = ThreadPoolExecutor(max_workers=options.parallel, thread_name_prefix="pod")
        self.names_dirty = True
        self._nat_text = ""
        self._hairpins: set[str] = set()
        self._status_text = ""
        self._tokens: Any = None

    # --- bookkeeping ----------------------------------------------------------

    @property
    def gateway(self) -> str:
        assert self.node is not None
        return str(self.node.gateway)

    def save_info(self) -> None:
        me = os.getpid()
        ctrl = self.controller
        _write_json(
            self.paths.info,
            {
                "name": self.options.name,
                "directory": str(self.options.directory),
                "prefix": self.prefix,
                "node_netns": f"{self.prefix}-node",
                "gateway": str(self.node.gateway) if self.node else "",
                "subnet": self.options.subnet,
                "supervisor": {"pid": me, "start": proc_start_time(me)},
                "controller": {
                    "pid": ctrl.pid if ctrl else None,
                    "start": proc_start_time(ctrl.pid) if ctrl else None,
                    "api": f"{self.gateway}:{API_PORT}" if self.node else "",
                    "webhook": f"{WEBHOOK_ADDRESS[0]}:{WEBHOOK_ADDRESS[1]}",
                    "ca": str(self.ca_path or ""),
                },
                "dashboard": dict(self.dashboard),
            },
        )

    def save_status(self) -> None:
        with self.lock:
            data = {
                "phase": self.phase,
                "error": self.error,
                "warnings": list(self.warnings),
                "dashboard": dict(self.dashboard),
                "pods": [self._pod_status(r) for r in self._sorted_records()],
            }
            text = json.dumps(data, sort_keys=True)
            if text == self._status_text:
                return
            self._status_text = text
            _write_json(self.paths.status, data)

    def _sorted_records(self) -> list[PodRecord]:
        return [self.records[k] for k in sorted(self.records)]

    def _pod_status(self, r: PodRecord) -> dict[str, Any]:
        containers = []
        if r.pod is not None:
            for step in r.pod.plan.steps:
                proc = r.pod.processes.get(step.name)
                containers.append(
                    {
                        "name": step.name,
                        "kind": step.kind,
                        "env": {**base_env(), **step.env},
                        "uid": step.uid,
                        "gid": step.gid,
                        "cwd": step.cwd,
                        "mounts": [m.to_dict() for m in step.mounts],
                        "log": str(self.paths.pods_logs / r.key / f"{step.name}.log"),
                        "running": bool(proc and proc.alive()),
                        "exit_code": (
                            r.pod.exit_codes.get(step.name)
                            if proc is None
                            else proc.popen.returncode
                        ),
                        "restarts": r.restarts.get(step.name, 0),
                        "last_kill_reason": r.kill_reason.get(step.name, ""),
                    }
                )
        return {
            "ref": r.spec.ref,
            "namespace": r.spec.namespace,
            "name": r.spec.name,
            "owner": r.spec.owner,
            "key": r.key,
            "netns": r.netns,
            "ip": r.ip,
            "meshed": r.meshed,
            "phase": r.phase,
            "ready": r.ready,
            "message": r.message,
            "container": r.container,
            "ready_seconds": r.ready_seconds,
            "default_container": _default_container(r.spec),
            "containers": containers,
        }

    # --- controller ---------------------------------------------------------------

    def api(
        self, method: str, path: str, body: Any = None, timeout: float = 5.0
    ) -> tuple[int, Any]:
        assert self.node is not None
        status, raw = netns_request(
            self.node.netns,
            method,
            self.gateway,
            API_PORT,
            path,
            body,
            context=self.ctx,
            timeout=timeout,
        )
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def _mesh_config_file(self) -> Path:
        data = dict(self.manifests.mesh_config or {})
        data["controllerAddress"] = f"{self.gateway}:{API_PORT}"
        path = self.paths.dir / "mesh-config.yaml"
        path.write_text(yaml.safe_dump({k: str(v) for k, v in data.items()}))
        return path

    def start_controller(self) -> None:
        assert self.node is not None
        tls = self.paths.tls
        argv = [
            resolve_command("synchro-controller"),
            "--log-level",
            "info",
            "--webhook-listen",
            f"{WEBHOOK_ADDRESS[0]}:{WEBHOOK_ADDRESS[1]}",
            "--tls-cert",
            str(tls / "tls.crt"),
            "--tls-key",
            str(tls / "tls.key"),
            "--mesh-config",
            str(self._mesh_config_file()),
            "--config-dir",
            str(self.options.directory),
            "--api-listen",
            f"{self.gateway}:{API_PORT}",
            # The dashboard, and /v1/golden/* on the API for `synchro top`.
            "--metrics-listen",
            f"{self.gateway}:{ports.CONTROLLER_METRICS_PORT}",
        ]
        log_path = self.paths.controller_log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as logf:
            popen = subprocess.Popen(
                wrap_argv(self.node.netns, argv, None, None),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=base_env(),
                start_new_session=True,
            )
        self.controller = Process("synchro-controller", popen, log_path, self.node.netns)
        self.node.state.pids.append((popen.pid, proc_start_time(popen.pid)))
        self.node.state.save()
        self.save_info()
        log.info("synchro-controller started (pid %d)", popen.pid)

    def wait_controller(self, timeout: float = 30.0) -> None:
        assert self.node is not None and self.controller is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline and not self.stop_event.is_set():
            if not self.controller.alive():
                raise MeshError(
                    f"synchro-controller exited {self.controller.popen.returncode}:\n"
                    f"{_tail(self.controller.log())}"
                )
            try:
                status, _ = self.api("GET", "/healthz/ready", timeout=2.0)
                hook, _ = netns_request(
                    self.node.netns, "GET", *WEBHOOK_ADDRESS, "/healthz", context=self.ctx
                )
                if status == 200 and hook == 200:
                    return
                last = f"API {status}, webhook {hook}"
            except (OSError, http.client.HTTPException, LocalError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise MeshError(
            f"synchro-controller was not ready within {timeout:.0f}s ({last}):\n"
            f"{_tail(self.controller.log())}"
        )

    def start_dashboard_relay(self) -> None:
        """The controller's dashboard on the host's 127.0.0.1; a taken port is
        said (in the status, so `synchro up` prints it) and the mesh goes on."""
        port = self.options.dashboard_port
        if not port:
            return
        assert self.node is not None
        node_netns = self.node.netns
        target = relay.Target(
            self.gateway, ports.CONTROLLER_METRICS_PORT, lambda: netns.netns_socket(node_netns)
        )
        r = relay.Relay((DASHBOARD_HOST, port), target)
        try:
            r.start()
        except relay.RelayError as exc:
            log.warning("dashboard not exposed on the host: %s", exc)
            self.dashboard = {"url": "", "error": f"{exc} (use --dashboard-port)"}
        else:
            self.relay = r
            self.dashboard = {"url": r.url, "error": ""}
            log.info("dashboard relay on %s", r.url)
        self.save_info()

    def refresh_services(self) -> None:
        """ClusterIPs as the controller allocated them (what the proxies use too)."""
        try:
            status, body = self.api("GET", "/v1/services", timeout=3.0)
        except (OSError, http.client.HTTPException, LocalError) as exc:
            log.debug("services not refreshed: %s", exc)
            return
        if status != 200 or not isinstance(body, dict):
            return
        table = {
            f"{s['namespace']}/{s['name']}": tuple(s.get("cluster_ips") or ())
            for s in body.get("services", [])
            if isinstance(s, dict) and not s.get("headless")
        }
        with self.lock:
            if table != self.cluster_ips:
                self.cluster_ips = table
                self.names_dirty = True

    def report(self, r: PodRecord) -> None:
        """Tell the controller about the Pod (its endpoints come from this)."""
        if r.pod is None:
            return
        state = (r.ip, r.ready)
        if r.reported == state:
            return
        manifest = json.loads(json.dumps(r.pod.spec))
        manifest["status"] = {
            "podIP": r.ip,
            "podIPs": [{"ip": r.ip}],
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if r.ready else "False"}],
        }
        ns, name = r.spec.namespace, r.spec.name
        try:
            status, body = self.api("PUT", f"/v1/pods/{ns}/{name}", manifest)
        except (OSError, http.client.HTTPException, LocalError) as exc:
            log.warning("could not report %s to the controller: %s", r.spec.ref, exc)
            return
        if status == 200:
            r.reported = state
        else:
            log.warning("controller refused the report of %s: %s %s", r.spec.ref, status, body)

    def unreport(self, r: PodRecord) -> None:
        if r.reported is None:
            return
        with contextlib.suppress(OSError, http.client.HTTPException, LocalError):
            self.api("DELETE", f"/v1/pods/{r.spec.namespace}/{r.spec.name}")
        r.reported = None

    # --- admission --------------------------------------------------------------------

    def admit(self, spec: PodSpec) -> dict[str, Any]:
        """The Pod as the real webhook mutates it (AdmissionReview over HTTPS)."""
        assert self.node is not None
        manifest: dict[str, Any] = json.loads(json.dumps(spec.manifest))
        if not self.manifests.sends_to_webhook(spec):
            return manifest
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "name": spec.name,
                "namespace": spec.namespace,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:synchro-up"},
                "object": manifest,
                "dryRun": False,
            },
        }
        try:
            status, raw = netns_request(
                self.node.netns, "POST", *WEBHOOK_ADDRESS, "/mutate", review, context=self.ctx
            )
        except (OSError, http.client.HTTPException, LocalError) as exc:
            raise MeshError(f"{spec.ref}: the webhook did not answer: {exc}") from exc
        if status != 200:
            raise MeshError(f"{spec.ref}: the webhook answered {status}: {raw.decode()[:500]}")
        response = (json.loads(raw) or {}).get("response") or {}
        if not response.get("allowed"):
            message = (response.get("status") or {}).get("message") or "no reason given"
            raise MeshError(f"{spec.ref}: the webhook denied the Pod: {message}")
        for warning in response.get("warnings") or []:
            log.warning("%s: webhook warning: %s", spec.ref, warning)
        if response.get("patch"):
            ops = json.loads(base64.b64decode(response["patch"]))
            manifest = jsonpatch.apply_patch(manifest, ops)
        return manifest

    # --- names and the Service fallback ------------------------------------------------

    def _running(self) -> list[servicenat.RunningPod]:
        return [
            servicenat.RunningPod(r.spec, r.ip, r.ready)
            for r in self.records.values()
            if r.pod is not None and r.ip
        ]

    def write_hosts(self, r: PodRecord, *, create: bool = True) -> None:
        # Under the lock: a Pod stopped meanwhile must not get its directory back.
        with self.lock:
            if not create and (
                self.records.get(r.spec.ref) is not r or not (hosts.ETC_NETNS / r.netns).is_dir()
            ):
                return
            svcs, pods = servicenat.addresses(
                self.manifests.services, self.cluster_ips, self._running()
            )
            spec = r.spec.manifest.get("spec") or {}
            text = hosts.render(
                namespace=r.spec.namespace,
                pod=r.spec.name,
                ip=r.ip or "127.0.1.1",  # until the Pod has its address
                services=svcs,
                pods=pods,
                hostname=spec.get("hostname"),
                subdomain=spec.get("subdomain"),
            )
            hosts.write(r.netns, text, hosts.render_resolv(r.spec.namespace))

    def apply_names(self) -> None:
        """Rewrite hosts files and the node's NAT table when anything they show changed."""
        with self.lock:
            if not self.names_dirty or self.node is None:
                return
            self.names_dirty = False
            records = [r for r in self.records.values() if r.phase not in (PENDING, TERMINATING)]
            rules = servicenat.service_rules(
                self.manifests.services, self.cluster_ips, self._running()
            )
        for r in records:
            self.write_hosts(r, create=False)
        self.hairpin()
        text = servicenat.nat_table(rules)
        if text != self._nat_text:
            try:
                self.node_exec(["iptables-restore"], stdin=text)
                self._nat_text = text
            except LocalError as exc:
                # Retried when the rules change, not every tick: the same text fails the same way.
                log.error("node NAT rules not applied: %s", exc)
                self._nat_text = text

    def hairpin(self) -> None:
        """Hairpin mode on every bridge port: a Pod calling a Service that the node
        DNATs back to the same Pod gets its packets out of the port they came in
        by (what kubelet's hairpin-veth mode does)."""
        assert self.node is not None
        try:
            listing = self.node_exec(["ip", "-o", "link", "show", "master", netns.BRIDGE])
        except LocalError as exc:
            log.warning("bridge ports not listed: %s", exc)
            return
        for line in listing.splitlines():
            port = line.split(":", 2)[1].strip().split("@")[0] if line.count(":") >= 2 else ""
            if port and port not in self._hairpins:
                try:
                    self.node_exec(["bridge", "link", "set", "dev", port, "hairpin", "on"])
                    self._hairpins.add(port)
                except LocalError as exc:
                    log.warning("hairpin mode not set on %s: %s", port, exc)

    def node_exec(self, argv: Sequence[str], stdin: str | None = None) -> str:
        assert self.node is not None
        proc = subprocess.run(
            wrap_argv(self.node.netns, argv, None, None),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise LocalError(f"{' '.join(argv)} in {self.node.netns}: {proc.stderr.strip()}")
        return proc.stdout

    # --- Pods ---------------------------------------------------------------------------

    def _volume_files(self, spec: PodSpec, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """ConfigMap and Secret volumes' files, and the projected ServiceAccount
        token the injected proxy reads."""
        files: dict[str, Any] = dict(spec.volume_files)
        names = {v.get("name") for v in (manifest.get("spec") or {}).get("volumes") or []}
        if "synchro-token" not in names:
            return files
        from controlplane.tokens import LocalTokens

        if self._tokens is None:
            self._tokens = LocalTokens(_token_key(self.paths.tls / "token-key.pem"))
        token = self._tokens.mint(spec.namespace, spec.service_account, pod=spec.name)
        assert self.ca_path is not None
        # The CA of the controller's certificate rides along, as a projected
        # ServiceAccount volume carries ca.crt: the proxy sees only its volumes
        # (its data volume covers /run/synchro, where the mesh keeps the CA).
        files["synchro-token"] = {
            "synchro-token": token,
            CONTROLLER_CA_FILE: self.ca_path.read_text(),
        }
        return files

    def start(self, r: PodRecord) -> None:
        """Admit, start and wait for one Pod (in a pool thread)."""
        assert self.node is not None
        spec = r.spec
        try:
            self._set(r, ADMITTING)
            manifest = self.admit(spec)
            r.meshed = INJECTED_ANNOTATION in (
                (manifest.get("metadata") or {}).get("annotations") or {}
            )
            self._set(r, STARTING)
            self.write_hosts(r)
            overrides = _env_overrides(manifest, str(self.ca_path))
            pod = start_pod(
                self.node,
                manifest,
                namespace=spec.namespace,
                name=spec.name,
                key=r.key,
                env_overrides=overrides,
                volume_files=self._volume_files(spec, manifest),
                wait_ready=False,
                timeout=self.options.timeout,
            )
            with self.lock:
                r.pod = pod
                r.started = dict.fromkeys(pod.processes, time.monotonic())
                self.names_dirty = True
            self._link_logs(r)
            self._set(r, RUNNING)
            self.write_hosts(r)
            self.report(r)
            self._wait_ready(r)
            r.starting = False
        except (PodStartError, PodSpecError, MeshError, LocalError, OSError) as exc:
            message = str(exc)
            match = _FAILED_CONTAINER.match(message)
            with self.lock:
                if match and not r.container:
                    r.container = match.group(1)
                if isinstance(exc, PodSpecError):
                    message = f"{spec.ref}: {message}"
            self._fail(r, message)
        except Exception as exc:  # a bug here must not take the supervisor down
            log.exception("starting %s failed", spec.ref)
            self._fail(r, f"{spec.ref}: {exc!r}")

    def _wait_ready(self, r: PodRecord) -> None:
        from synchro.local.pod import wait_probe

        assert r.pod is not None
        pod = r.pod
        if not r.spec.job:
            for step in pod.plan.steps:
                if step.kind in (SIDECAR, APP) and step.readiness_probe is not None:
                    wait_probe(
                        pod,
                        step,
                        step.readiness_probe,
                        pod.processes[step.name],
                        self.options.timeout,
                    )
        time.sleep(0.2)  # a container that dies on start-up does so now, not after "ready"
        for step in pod.plan.steps:
            proc = pod.processes.get(step.name)
            if step.kind == INIT or proc is None or proc.alive():
                continue
            code = proc.popen.returncode
            if r.spec.job and step.kind == APP and code == 0:
                continue
            r.container = step.name
            raise PodStartError(
                f"{pod.name}/{step.name} exited {code} right after it started:\n{_tail(proc.log())}"
            )
        with self.lock:
            r.ready = True
            r.ready_seconds = round(time.monotonic() - r.since, 2)
            self.names_dirty = True
        self._set(r, READY)
        self.report(r)

    def _set(self, r: PodRecord, phase: str, message: str = "") -> None:
        with self.lock:
            r.phase = phase
            r.message = message
        log.info("%s: %s%s", r.spec.ref, phase, f" ({message})" if message else "")
        self.save_status()

    def _fail(self, r: PodRecord, message: str) -> None:
        log.error("%s failed: %s", r.spec.ref, message)
        with self.lock:
            r.ready = False
            if r.pod is not None and self.stop_event.is_set():
                return
        self._set(r, FAILED, message)

    def _link_logs(self, r: PodRecord) -> None:
        link = self.paths.logs / r.spec.namespace / r.spec.name
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(self.paths.pods_logs / r.key)

    def stop(self, r: PodRecord) -> None:
        """Stop one Pod and forget it (in a pool thread)."""
        self._set(r, TERMINATING)
        self.unreport(r)
        if self.node is not None:
            if r.pod is not None:
                r.pod.stop(self.options.grace, pre_stop=False)
            self.node.remove_pod(r.key)
        with self.lock:
            hosts.remove(r.netns)
            if self.records.get(r.spec.ref) is r:
                del self.records[r.spec.ref]
            self.names_dirty = True
        self.save_status()

    def replace(self, old: PodRecord, spec: PodSpec) -> None:
        self.stop(old)
        with self.lock:
            r = self._new_record(spec)
        self.start(r)

    def _new_record(self, spec: PodSpec) -> PodRecord:
        taken = {r.key for r in self.records.values()}
        key = local_key(spec.ref, taken)
        r = PodRecord(spec, key, f"{self.prefix}-{key}")
        self.records[spec.ref] = r
        return r

    def reconcile(self, manifests: Manifests) -> None:
        """Start, stop or replace Pods so that they match `manifests`."""
        with self.lock:
            self.manifests = manifests
            self.names_dirty = True
            wanted = {p.ref: p for p in manifests.pods}
            for ref, r in list(self.records.items()):
                if r.phase == TERMINATING:
                    continue
                if ref not in wanted:
                    log.info("%s: no longer in %s; stopping it", ref, self.options.directory)
                    r.phase = TERMINATING
                    self.pool.submit(self.stop, r)
                elif wanted[ref].digest != r.spec.digest:
                    log.info("%s: its template changed; replacing it", ref)
                    r.phase = TERMINATING
                    self.pool.submit(self.replace, r, wanted[ref])
            for ref, spec in wanted.items():
                if ref not in self.records:
                    self.pool.submit(self.start, self._new_record(spec))
        self.save_status()

    # --- watching ---------------------------------------------------------------------

    def check_directory(self) -> None:
        sig = signature(self.options.directory)
        if sig == self.signature:
            return
        self.signature = sig
        try:
            manifests = load(self.options.directory)
        except ManifestError as exc:
            log.error("%s; keeping the Pods as they are", exc)
            with self.lock:
                self.warnings = [str(exc)]
            self.save_status()
            return
        with self.lock:
            self.warnings = list(manifests.skipped)
        log.info("%s changed; applying it", self.options.directory)
        self.reconcile(manifests)

    def check_controller(self) -> None:
        ctrl = self.controller
        if ctrl is None or ctrl.alive() or self.stop_event.is_set():
            return
        now = time.monotonic()
        if now < self.controller_restart_at:
            return
        self.controller_restarts += 1
        log.error(
            "synchro-controller exited %s; restarting it (restart %d)",
            ctrl.popen.returncode,
            self.controller_restarts,
        )
        self.controller_restart_at = now + min(2.0**self.controller_restarts, RESTART_BACKOFF_MAX)
        self.start_controller()
        for r in list(self.records.values()):
            r.reported = None  # a new controller knows no Pods

    def check_pods(self) -> None:
        """Liveness, restarts and readiness of running Pods (the kubelet's loop)."""
        with self.lock:
            records = [
                r
                for r in self.records.values()
                if r.pod is not None and r.phase in (RUNNING, READY) and not r.starting
            ]
        for r in records:
            if self.stop_event.is_set():
                return
            self._check_pod(r)
            self.report(r)

    def _check_pod(self, r: PodRecord) -> None:
        assert r.pod is not None and self.node is not None
        pod = r.pod
        now = time.monotonic()
        dead: list[Step] = []
        for step in pod.plan.steps:
            proc = pod.processes.get(step.name)
            if step.kind != INIT and proc is not None and not proc.alive():
                dead.append(step)
        policy = probes.restart_policy(r.spec.manifest.get("spec"))
        apps = [s for s in pod.plan.steps if s.kind == APP]
        if apps and all(s in dead for s in apps):
            codes = {s.name: pod.processes[s.name].popen.returncode for s in apps}
            # A Job's Pod, or one whose restartPolicy starts none of them again, is done.
            if r.spec.job or not any(probes.restarts(policy, c) for c in codes.values()):
                failed = {n: c for n, c in codes.items() if c != 0}
                pod.stop(self.options.grace)  # the sidecars go when the Job's work is done
                with self.lock:
                    r.ready = False
                    self.names_dirty = True
                if failed:
                    name, code = next(iter(failed.items()))
                    r.container = name
                    self._set(r, FAILED, f"{r.spec.ref}/{name} exited {code}")
                else:
                    self._set(r, COMPLETED, "all containers exited 0")
                return
        ready = True
        for step in dead:
            ready = False
            code = pod.processes[step.name].popen.returncode
            if step.kind == APP and (r.spec.job or not probes.restarts(policy, code)):
                continue
            due = r.restart_at.get(step.name)
            if due is None:
                count = r.restarts.get(step.name, 0)
                delay = min(2.0**count, RESTART_BACKOFF_MAX) if count else 0.0
                r.restart_at[step.name] = now + delay
                log.warning(
                    "%s/%s exited %s; restarting in %.0fs",
                    r.spec.ref,
                    step.name,
                    code,
                    delay,
                )
            elif now >= due:
                self._restart(r, step)
        for step in pod.plan.steps:
            probe = step.liveness_probe
            live = step.kind in (SIDECAR, APP) and probe is not None and step not in dead
            if live and probe is not None and not self._alive(r, step, probe, now):
                ready = False
        for step in pod.plan.steps:
            if (
                step.kind in (SIDECAR, APP)
                and step.readiness_probe is not None
                and step not in dead
            ):
                probe = step.readiness_probe
                if probe_once(self.node, r.ip, probe):
                    r.failures[step.name] = 0
                else:
                    r.failures[step.name] = r.failures.get(step.name, 0) + 1
                    if r.failures[step.name] >= probe.failure_threshold or not r.ready:
                        ready = False
        if ready != r.ready:
            log.info("%s is %s", r.spec.ref, "ready" if ready else "not ready")
            with self.lock:
                r.ready = ready
                self.names_dirty = True
                if ready and r.ready_seconds is None:
                    r.ready_seconds = round(time.monotonic() - r.since, 2)
            self._set(r, READY if ready else RUNNING)

    def _alive(self, r: PodRecord, step: Step, probe: Probe, now: float) -> bool:
        """Run the container's liveness probe when due; kill it after failureThreshold
        failures in a row (the restart loop starts it again, by restartPolicy)."""
        assert r.pod is not None and self.node is not None
        state = r.liveness.get(step.name) or probes.start(probe, r.started.get(step.name, r.since))
        if not probes.due(state, now):
            r.liveness[step.name] = state
            return True
        ok = probe_once(self.node, r.ip, probe)
        state, action = probes.observe(state, probe, ok, now)
        r.liveness[step.name] = state
        if action is probes.Action.NONE:
            return True
        what = " ".join(probe.command) if probe.kind == "exec" else f"on port {probe.port}"
        reason = f"liveness probe ({probe.kind} {what}) failed {state.failures} times in a row"
        log.warning("%s/%s: %s; killing it", r.spec.ref, step.name, reason)
        proc = r.pod.processes[step.name]
        with contextlib.suppress(OSError), open(proc.log_path, "a") as logf:
            # In the container's own log too: `synchro logs` shows why it restarted.
            logf.write(f"synchro: {reason}; killing the container\n")
        proc.stop(self.options.grace)
        with self.lock:
            r.kill_reason[step.name] = reason
            r.liveness.pop(step.name, None)
        self.save_status()
        return False

    def _restart(self, r: PodRecord, step: Step) -> None:
        assert r.pod is not None
        old = r.pod.processes[step.name]
        old.stop(0.1)  # reap; children that outlived it would hold its ports
        proc = spawn_step(r.pod.net, step)
        with self.lock:
            r.pod.processes[step.name] = proc
            r.restarts[step.name] = r.restarts.get(step.name, 0) + 1
            r.restart_at.pop(step.name, None)
            r.started[step.name] = time.monotonic()
            r.liveness.pop(step.name, None)
        log.info("%s/%s restarted (pid %d)", r.spec.ref, step.name, proc.pid)
        self.save_status()

    # --- the whole life -------------------------------------------------------------

    def run(self) -> int:
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        self.save_info()
        self.save_status()
        try:
            self.bring_up()
            self.initial_wait()
            while not self.stop_event.wait(TICK_SECONDS):
                self.tick()
        except (MeshError, LocalError) as exc:
            log.error("%s", exc)
            with self.lock:
                self.phase, self.error = "failed", str(exc)
            self.save_status()
            # Keep what exists for `synchro logs`; `synchro down` removes it.
            self.stop_event.wait()
        finally:
            self.teardown()
        return 0

    def bring_up(self) -> None:
        try:
            manifests = load(self.options.directory)
        except ManifestError as exc:
            raise MeshError(str(exc)) from exc
        self.signature = signature(self.options.directory)
        self.manifests = manifests
        self.warnings = list(manifests.skipped)
        self.node = Node.create(
            self.prefix, subnet=self.options.subnet, logdir=self.paths.pods_logs
        )
        self.save_info()
        # The node routes ClusterIP traffic of Pods without a proxy (servicenat).
        self.node_exec(
            [sys.executable, "-c", "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')"]
        )
        self.ca_path, _, _ = write_tls(self.paths.tls, ["127.0.0.1", self.gateway])
        self.ctx = ssl.create_default_context(cafile=str(self.ca_path))
        self.start_controller()
        self.wait_controller()
        self.start_dashboard_relay()
        self.refresh_services()
        self.reconcile(manifests)

    def initial_wait(self) -> None:
        """Until every Pod is ready (phase "ready") or one failed (phase "failed")."""
        while not self.stop_event.is_set():
            self.tick()
            with self.lock:
                records = list(self.records.values())
                failed = [r for r in records if r.phase == FAILED]
                settled = all(r.phase in (READY, COMPLETED, FAILED) for r in records)
            if failed:
                first = failed[0]
                self.phase = "failed"
                self.error = first.message
                self.save_status()
                return
            if settled:
                self.phase = "ready"
                self.save_status()
                log.info("every Pod is ready")
                return
            time.sleep(0.1)

    def tick(self) -> None:
        try:
            self.check_controller()
            self.check_directory()
            self.refresh_services()
            self.check_pods()
            self.apply_names()
        except Exception:  # the supervisor must keep the mesh up through a bug
            log.exception("supervisor tick failed")
        self.save_status()

    def teardown(self) -> None:
        log.info("stopping the mesh")
        with self.lock:
            self.phase = "stopping"
        with contextlib.suppress(Exception):
            self.save_status()
        self.pool.shutdown(wait=False, cancel_futures=True)
        procs: list[Process] = []
        for r in list(self.records.values()):
            if r.pod is not None:
                procs.extend(r.pod.processes.values())
        if self.controller is not None:
            procs.append(self.controller)
        if self.relay is not None:
            self.relay.stop()
        stop_all(procs, self.options.grace)
        if self.node is not None:
            self.node.close()
        hosts.remove_prefix(self.prefix)
        shutil.rmtree(self.paths.dir, ignore_errors=True)
        log.info("mesh %s removed", self.options.name)


def stop_all(procs: Sequence[Process], grace: float) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after `grace`."""
    for p in procs:
        if p.alive():
            p.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(max(0.0, deadline - time.monotonic()))
    for p in procs:
        p.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(2)


def _token_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return key


def _env_overrides(manifest: Mapping[str, Any], ca_path: str) -> dict[str, dict[str, str]]:
    """What a container runtime and `synchro up` add to each container's environment:
    HOSTNAME (the Pod's hostname, as in Kubernetes, unless the container sets it)
    and, for the proxy, the CA that signed the controller API's certificate."""
    spec = manifest.get("spec") or {}
    hostname = str(spec.get("hostname") or (manifest.get("metadata") or {}).get("name") or "")
    out: dict[str, dict[str, str]] = {}
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if not isinstance(c, Mapping):
                continue  # plan_pod names the bad field
            names = {e.get("name") for e in c.get("env") or [] if isinstance(e, Mapping)}
            if "HOSTNAME" not in names:
                out[str(c.get("name"))] = {"HOSTNAME": hostname}
    out.setdefault(ports.PROXY_CONTAINER_NAME, {})[CONTROLLER_CA_ENV] = _proxy_ca_path(
        spec, ca_path
    )
    return out


def _proxy_ca_path(spec: Mapping[str, Any], ca_path: str) -> str:
    """Where the proxy container finds the controller's CA: in its token volume
    (see `Supervisor._volume_files`), else at the mesh's own path."""
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if not isinstance(c, Mapping) or c.get("name") != ports.PROXY_CONTAINER_NAME:
                continue
            for m in c.get("volumeMounts") or []:
                if (
                    isinstance(m, Mapping)
                    and m.get("name") == "synchro-token"
                    and not m.get("subPath")
                ):
                    return f"{str(m.get('mountPath', '')).rstrip('/')}/{CONTROLLER_CA_FILE}"
    return ca_path


def _default_container(spec: PodSpec) -> str:
    """`kubectl exec`'s choice: the annotated default, else the first container."""
    chosen = spec.annotations.get("kubectl.kubernetes.io/default-container")
    if chosen:
        return chosen
    containers = (spec.manifest.get("spec") or {}).get("containers") or [{}]
    return str(containers[0].get("name", ""))


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- for the commands: up, down, logs, exec ---------------------------------------------


def read_info(paths: MeshPaths) -> dict[str, Any]:
    info = _read_json(paths.info)
    if info is None:
        raise MeshError(f"{paths.info}: missing or unreadable; run `synchro down` to clean up")
    return info


def read_status(paths: MeshPaths) -> dict[str, Any] | None:
    return _read_json(paths.status)


def supervisor_alive(info: Mapping[str, Any]) -> bool:
    sup = info.get("supervisor") or {}
    return pid_alive(sup.get("pid"), sup.get("start"))


def spawn_supervisor(options: Options, paths: MeshPaths) -> subprocess.Popen[bytes]:
    """Start the supervisor in its own session; it outlives `synchro up`."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    for stale in (paths.status, paths.info):
        stale.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "synchro.local.mesh",
        "supervise",
        "--name",
        options.name,
        "--dir",
        str(options.directory),
        "--subnet",
        options.subnet,
        "--timeout",
        str(options.timeout),
        "--parallel",
        str(options.parallel),
        "--dashboard-port",
        str(options.dashboard_port),
    ]
    env = dict(os.environ)
    env["SYNCHRO_RUN_DIR"] = str(paths.root)
    project = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project, env.get("PYTHONPATH")) if p)
    with open(paths.supervisor_log, "ab") as logf:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
        )


def down(paths: MeshPaths, *, timeout: float = 20.0) -> list[str]:
    """Stop the mesh and remove everything it made, even if its supervisor died.
    Returns what was removed (for the user)."""
    info = _read_json(paths.info) or {}
    removed: list[str] = []
    if supervisor_alive(info):
        pid = int(info["supervisor"]["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and supervisor_alive(info):
            time.sleep(0.05)
        if supervisor_alive(info):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            removed.append(f"supervisor {pid} (killed after {timeout:.0f}s)")
        else:
            removed.append(f"supervisor {pid}")
    ctrl = info.get("controller") or {}
    if pid_alive(ctrl.get("pid"), ctrl.get("start")):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(ctrl["pid"]), signal.SIGKILL)
        removed.append(f"synchro-controller {ctrl['pid']}")
    prefix = info.get("prefix")
    if isinstance(prefix, str) and prefix:
        removed += [f"netns {n}" for n in netns.cleanup_prefix(prefix)]
        removed += [f"{hosts.ETC_NETNS}/{n}" for n in hosts.remove_prefix(prefix)]
    if paths.dir.exists():
        shutil.rmtree(paths.dir, ignore_errors=True)
        removed.append(str(paths.dir))
    return removed


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_pod_ref(text: str) -> PodRef:
    namespace, sep, name = text.partition("/")
    if not sep:
        namespace, name = "default", text
    if not namespace or not name or "/" in name:
        raise MeshError(f"{text!r}: expected a Pod as NAMESPACE/NAME or NAME (in default)")
    return PodRef(namespace, name)


def find_pod(paths: MeshPaths, text: str) -> dict[str, Any]:
    """The status record of Pod `text` (`ns/name` or `name` in default)."""
    ref = parse_pod_ref(text)
    status = read_status(paths) or {}
    pods = status.get("pods") or []
    for pod in pods:
        if pod.get("ref") == ref.ref:
            return dict(pod)
    known = ", ".join(p.get("ref", "?") for p in pods) or "none"
    raise MeshError(f"no Pod {ref.ref} in mesh {paths.name} (Pods: {known})")


def find_container(pod: Mapping[str, Any], container: str | None) -> dict[str, Any]:
    containers = pod.get("containers") or []
    name = container or pod.get("default_container") or ""
    for c in containers:
        if c.get("name") == name:
            return dict(c)
    if not containers:
        raise MeshError(
            f"Pod {pod.get('ref')} has not started ({pod.get('phase')}): {pod.get('message', '')}"
        )
    names = ", ".join(c.get("name", "?") for c in containers)
    raise MeshError(f"Pod {pod.get('ref')} has no container {name!r} (containers: {names})")


# --- the supervisor's entry point ----------------------------------------------------------


def supervise(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synchro.local.mesh supervise")
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--subnet", default=DEFAULT_SUBNET)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    options = Options(
        check_name(args.name),
        args.dir.resolve(),
        subnet=args.subnet,
        timeout=args.timeout,
        parallel=max(1, args.parallel),
        dashboard_port=args.dashboard_port,
    )
    sup = Supervisor(options, MeshPaths(options.name, RUN_ROOT))

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        sup.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return sup.run()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["supervise"]:
        return supervise(args[1:])
    print("usage: python -m synchro.local.mesh supervise --name NAME --dir DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "MeshError",
    "MeshPaths",
    "Options",
    "Supervisor",
    "down",
    "find_container",
    "find_pod",
    "list_meshes",
    "netns_request",
    "read_info",
    "read_status",
    "resolve_mesh",
    "spawn_supervisor",
    "supervisor_alive",
]
