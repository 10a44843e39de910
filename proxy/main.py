"""`synchro-proxy`: the sidecar process.

One process by default: the capture listeners, the status port and the admin
port on one uvloop event loop. With `--concurrency N > 1` the parent keeps the
status and admin ports and supervises N worker processes that each bind the
capture listeners with `SO_REUSEPORT` (the kernel spreads connections over
them); it forwards SIGTERM to them and restarts a worker that dies.

SIGTERM (or `POST /drain`): readiness turns 503, the listeners stop accepting,
open connections get up to `--drain-seconds` to finish, then the process exits.

Subcommands for the Pod's lifecycle hooks: `synchro-proxy wait-ready --timeout S`
and `synchro-proxy drain` (see the contract in webhook/inject.py).

Settings come from flags; the webhook's environment (`SYNCHRO_CONCURRENCY`,
`SYNCHRO_DRAIN_SECONDS`, `SYNCHRO_LOG_LEVEL`, `SYNCHRO_OPAQUE_PORTS`,
`SYNCHRO_APP_PROBES`, and for telemetry `SYNCHRO_ACCESS_LOG`,
`SYNCHRO_TRACE_SAMPLING`, `SYNCHRO_OTLP_ENDPOINT`, `SYNCHRO_METRICS`) overrides
the defaults; a flag given explicitly wins.

Config: with `SYNCHRO_CONTROLLER` (or `--controller`) the proxy subscribes to
the controller (`proxy.config_client`; CA from `SYNCHRO_CONTROLLER_CA`) and
`/healthz/ready` waits for the first config; with `--config-file PATH` it reads
the same JSON from a file and re-reads it on change; with neither it runs
standalone (every connection goes where it was going). Traffic defaults from the
Pod's annotations: `SYNCHRO_TIMEOUT`, `SYNCHRO_RETRIES`, `SYNCHRO_RETRY_ON`,
`SYNCHRO_LOAD_BALANCER` (see `proxy.engine`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy import engine as engine_mod
from proxy import listener as listener_mod
from proxy import ports
from proxy.admin import AdminApp, AdminHooks
from proxy.config_client import ENV_CONTROLLER, ConfigClient, Snapshot
from proxy.config_file import FileConfigSource
from proxy.conn import Address, Direction, ProxyContext
from proxy.listener import Listener, ListenerSettings, parse_host_port, parse_listen
from proxy.security import runtime as security_runtime
from proxy.security.enroll import EnrollError
from proxy.status import AppProbes, ProbeConfigError, StatusApp, parse_app_probes, start_http_server
from proxy.telemetry.telemetry import (
    Telemetry,
    TelemetryError,
    TelemetrySettings,
    setup_access_logger,
)

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """A flag or environment value the proxy cannot start with."""


@dataclass(frozen=True)
class Settings:
    outbound_listen: tuple[Address, ...]
    inbound_listen: tuple[Address, ...]
    status_listen: tuple[Address, ...]
    admin_listen: tuple[Address, ...]
    static_destination: Address | None = None
    concurrency: int = 1
    log_level: str = "info"
    drain_seconds: float = 5.0
    detect_timeout: float = 0.3
    connect_timeout: float = 5.0
    header_timeout: float = 10.0
    idle_timeout: float = 3600.0
    opaque_ports: frozenset[int] = field(default_factory=lambda: ports.SERVER_FIRST_PORTS)
    app_probes: str = ""
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    config_file: str = ""
    controller: str = ""  # controller URL; "" runs standalone
    controller_ca: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    service_account: str = ""
    outbound: engine_mod.OutboundDefaults = field(default_factory=engine_mod.OutboundDefaults)

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 64:
            raise SettingsError(f"concurrency {self.concurrency}: expected 1-64")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"log level {self.log_level!r}: expected one of {LOG_LEVELS}")
        for name in (
            "drain_seconds",
            "detect_timeout",
            "connect_timeout",
            "header_timeout",
            "idle_timeout",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative")

    def dump(self) -> dict[str, Any]:
        def addrs(values: tuple[Address, ...]) -> list[str]:
            return [str(a) for a in values]

        return {
            "outbound_listen": addrs(self.outbound_listen),
            "inbound_listen": addrs(self.inbound_listen),
            "status_listen": addrs(self.status_listen),
            "admin_listen": addrs(self.admin_listen),
            "static_destination": str(self.static_destination) if self.static_destination else None,
            "concurrency": self.concurrency,
            "log_level": self.log_level,
            "drain_seconds": self.drain_seconds,
            "detect_timeout": self.detect_timeout,
            "connect_timeout": self.connect_timeout,
            "header_timeout": self.header_timeout,
            "idle_timeout": self.idle_timeout,
            "opaque_ports": sorted(self.opaque_ports),
            "telemetry": self.telemetry.dump(),
            "config_file": self.config_file or None,
            "controller": self.controller or None,
            "outbound_defaults": self.outbound.dump(),
        }


def _dual(port: int) -> str:
    return f"0.0.0.0:{port},[::]:{port}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synchro-proxy", description="Synchro's sidecar proxy.")
    p.add_argument(
        "--outbound-listen",
        default=None,
        help=f"outbound capture addresses (default {_dual(ports.OUTBOUND_CAPTURE_PORT)}; empty disables)",
    )
    p.add_argument(
        "--inbound-listen",
        default=None,
        help=f"inbound capture addresses (default {_dual(ports.INBOUND_CAPTURE_PORT)}; empty disables)",
    )
    p.add_argument(
        "--status-listen",
        default=None,
        help=f"status addresses (default {_dual(ports.STATUS_PORT)}; empty disables)",
    )
    p.add_argument(
        "--admin-listen",
        default=None,
        help=f"admin address (default 127.0.0.1:{ports.ADMIN_PORT}; empty disables)",
    )
    p.add_argument(
        "--static-destination",
        default=None,
        metavar="HOST:PORT",
        help="upstream for connections that were not redirected (no SO_ORIGINAL_DST), e.g. in loopback tests",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="worker processes sharing the listeners with SO_REUSEPORT (env SYNCHRO_CONCURRENCY, default 1)",
    )
    p.add_argument(
        "--log-level", default=None, choices=LOG_LEVELS, help="env SYNCHRO_LOG_LEVEL, default info"
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=None,
        help="how long SIGTERM lets open connections finish (env SYNCHRO_DRAIN_SECONDS, default 5)",
    )
    p.add_argument(
        "--detect-timeout",
        type=float,
        default=0.3,
        help="seconds to wait for a client's first bytes before treating it as opaque TCP",
    )
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--header-timeout", type=float, default=10.0)
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=3600.0,
        help="close opaque TCP connections idle this long (0: never)",
    )
    p.add_argument(
        "--opaque-ports",
        default=None,
        help="extra server-first ports, comma-separated (env SYNCHRO_OPAQUE_PORTS)",
    )
    p.add_argument(
        "--access-log", default=None, choices=("off", "json", "text"), help="env SYNCHRO_ACCESS_LOG"
    )
    p.add_argument(
        "--trace-sampling", default=None, help="percent of new traces (env SYNCHRO_TRACE_SAMPLING)"
    )
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        help="OTLP/HTTP traces URL, empty: no tracing (env SYNCHRO_OTLP_ENDPOINT)",
    )
    p.add_argument("--metrics", default=None, choices=("on", "off"), help="env SYNCHRO_METRICS")
    p.add_argument(
        "--config-file",
        default=None,
        metavar="PATH",
        help="read the proxy config (the controller's JSON, or YAML) from a file, re-read on change",
    )
    p.add_argument(
        "--controller",
        default=None,
        metavar="URL",
        help=f"controller push API, host:port or https://host:port (env {ENV_CONTROLLER})",
    )
    p.add_argument("--worker-ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _ports(text: str, what: str) -> frozenset[int]:
    out = set()
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise SettingsError(f"{what}: {item!r} is not a port (comma-separated 1-65535)")
        out.add(int(item))
    return frozenset(out)


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SettingsError(f"{what}: {text!r} is not a number") from None


def parse_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Flags, then environment, then defaults (pure: the environment is an argument)."""

    def pick(flag: Any, env_name: str | None, default: Any) -> Any:
        if flag is not None:
            return flag
        if env_name and env.get(env_name, "").strip():
            return env[env_name].strip()
        return default

    def listen(flag: str | None, default: str) -> tuple[Address, ...]:
        try:
            return parse_listen(default if flag is None else flag)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    static = None
    if args.static_destination:
        try:
            static = parse_host_port(args.static_destination)
        except ValueError as exc:
            raise SettingsError(f"--static-destination: {exc}") from None
    concurrency = pick(args.concurrency, "SYNCHRO_CONCURRENCY", 1)
    if isinstance(concurrency, str):
        if not concurrency.isdigit():
            raise SettingsError(f"SYNCHRO_CONCURRENCY: {concurrency!r} is not an integer")
        concurrency = int(concurrency)
    try:
        telemetry = TelemetrySettings.from_env(
            env,
            metrics=args.metrics,
            access_log=args.access_log,
            trace_sampling=args.trace_sampling,
            otlp_endpoint=args.otlp_endpoint,
        )
    except TelemetryError as exc:
        raise SettingsError(str(exc)) from None
    try:
        outbound = engine_mod.OutboundDefaults.from_env(env)
    except engine_mod.EngineError as exc:
        raise SettingsError(str(exc)) from None
    controller = str(pick(args.controller, ENV_CONTROLLER, ""))
    if controller and "://" not in controller:
        controller = f"https://{controller}"
    if args.config_file and args.controller:
        raise SettingsError("--config-file and --controller exclude each other")
    opaque = ports.SERVER_FIRST_PORTS | _ports(
        pick(args.opaque_ports, "SYNCHRO_OPAQUE_PORTS", ""), "opaque ports"
    )
    return Settings(
        outbound_listen=listen(args.outbound_listen, _dual(ports.OUTBOUND_CAPTURE_PORT)),
        inbound_listen=listen(args.inbound_listen, _dual(ports.INBOUND_CAPTURE_PORT)),
        status_listen=listen(args.status_listen, _dual(ports.STATUS_PORT)),
        admin_listen=listen(args.admin_listen, f"127.0.0.1:{ports.ADMIN_PORT}"),
        static_destination=static,
        concurrency=concurrency,
        log_level=str(pick(args.log_level, "SYNCHRO_LOG_LEVEL", "info")).lower(),
        drain_seconds=_number(
            str(pick(args.drain_seconds, "SYNCHRO_DRAIN_SECONDS", 5.0)), "drain seconds"
        ),
        detect_timeout=args.detect_timeout,
        connect_timeout=args.connect_timeout,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        opaque_ports=opaque,
        app_probes=env.get("SYNCHRO_APP_PROBES", ""),
        telemetry=telemetry,
        config_file=args.config_file or "",
        controller="" if args.config_file else controller,
        controller_ca=env.get("SYNCHRO_CONTROLLER_CA", "").strip(),
        pod_namespace=env.get("POD_NAMESPACE", "").strip(),
        pod_name=env.get("POD_NAME", "").strip() or os.uname().nodename,
        service_account=env.get("SERVICE_ACCOUNT", "").strip(),
        outbound=outbound,
    )


# -- process-level helpers --------------------------------------------------


def raise_nofile_limit() -> None:
    """Thousands of connections need thousands of descriptors (two per proxied one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _without_unusable_ipv6(addresses: tuple[Address, ...], v6: bool) -> tuple[Address, ...]:
    if v6:
        return addresses
    kept = tuple(a for a in addresses if ":" not in a.host)
    return kept or addresses


def _set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


class _Stopper:
    """The two ways out: a graceful drain and an immediate quit."""

    def __init__(self) -> None:
        self.drain = asyncio.Event()
        self.quit = asyncio.Event()

    def request_drain(self) -> None:
        self.drain.set()

    def request_quit(self) -> None:
        # After the admin response went out.
        asyncio.get_running_loop().call_later(0.05, self.quit.set)

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain.set)

    async def wait(self) -> str:
        waits = {
            asyncio.ensure_future(self.drain.wait()): "drain",
            asyncio.ensure_future(self.quit.wait()): "quit",
        }
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return "quit" if self.quit.is_set() else "drain"


async def _close_servers(servers: Sequence[asyncio.Server]) -> None:
    for server in servers:
        server.close()


# -- one process serving everything (or a worker's listeners) ----------------


def _listeners(settings: Settings, ctx: ProxyContext, reuse_port: bool) -> list[Listener]:
    handlers = listener_mod.load_handlers()
    v6 = listener_mod.ipv6_available()
    out = []
    for name, direction, addresses in (
        ("outbound", Direction.OUTBOUND, settings.outbound_listen),
        ("inbound", Direction.INBOUND, settings.inbound_listen),
    ):
        if not addresses:
            continue
        listener_settings = ListenerSettings(
            name=name,
            direction=direction,
            addresses=_without_unusable_ipv6(addresses, v6),
            static_destination=settings.static_destination,
            opaque_ports=settings.opaque_ports,
            detect_timeout=settings.detect_timeout,
            reuse_port=reuse_port,
        )
        out.append(Listener(listener_settings, ctx, handlers))
    return out


def _load_probes(settings: Settings) -> AppProbes:
    try:
        return parse_app_probes(settings.app_probes)
    except ProbeConfigError as exc:
        # Kubelet probes then fail visibly (404) instead of the whole Pod failing.
        log.error("ignoring SYNCHRO_APP_PROBES: %s", exc)
        return {}


async def _watch_parent(stopper: _Stopper) -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("supervisor gone; draining")
    stopper.request_drain()


ConfigSource = ConfigClient | FileConfigSource


def _config_source(settings: Settings) -> ConfigSource | None:
    if settings.config_file:
        return FileConfigSource(settings.config_file)
    if settings.controller:
        return ConfigClient(
            settings.controller,
            namespace=settings.pod_namespace or "default",
            pod=settings.pod_name,
            service_account=settings.service_account or None,
            ca_file=settings.controller_ca or None,
        )
    return None


def _mesh_security(settings: Settings) -> security_runtime.MeshSecurity | None:
    """Workload identity and mTLS when a controller is configured (proxy.security)."""
    try:
        return security_runtime.MeshSecurity.from_env(os.environ, settings.controller)
    except EnrollError as exc:
        log.error("no workload identity, mTLS off: %s", exc)
        return None


def _config_dump(source: ConfigSource | None, engine: engine_mod.Engine) -> dict[str, Any]:
    snap = source.current if source is not None else None
    return {
        "version": snap.version if snap is not None else None,
        "source": source.status() if source is not None else None,
        "config": snap.config.to_dict() if snap is not None else None,
        "traffic": engine.dump(),
    }


async def run_proxy(settings: Settings, *, worker_ready_fd: int | None = None) -> int:
    ctx = ProxyContext(
        connect_timeout=settings.connect_timeout,
        header_timeout=settings.header_timeout,
        idle_timeout=settings.idle_timeout,
    )
    telemetry = ctx.telemetry = Telemetry(settings.telemetry)
    engine = engine_mod.Engine(settings.outbound)
    engine_mod.attach(ctx, engine)
    metrics = telemetry.metrics
    engine.on_retry = lambda service, reason: metrics.retries.labels(service, reason).inc()
    engine.on_ejection = lambda service: metrics.ejections.labels(service).inc()
    source = _config_source(settings)

    def applied(snap: Snapshot) -> None:
        engine.apply(snap.registry)
        metrics.config_info.clear()
        metrics.config_info.labels(snap.version).set(1)

    if source is not None:
        source.on_update(applied)
    security = _mesh_security(settings)
    if security is not None:
        security_runtime.attach(ctx, security)
        if source is not None:
            source.on_update(security.on_config)
        security.start()
    if source is not None:
        source.start()
    stopper = _Stopper()
    stopper.install_signals()
    worker = worker_ready_fd is not None
    listeners = _listeners(settings, ctx, reuse_port=worker)
    for item in listeners:
        await item.start()
    telemetry.open_connections = lambda: sum(len(i.connections) for i in listeners)
    telemetry.start()
    servers: list[asyncio.Server] = []
    background: list[asyncio.Task[None]] = []
    if worker:
        assert worker_ready_fd is not None
        if source is not None:
            # The supervisor counts a worker ready once it has a config to route with.
            await source.wait_ready()
        os.write(worker_ready_fd, b"1")
        os.close(worker_ready_fd)
        background.append(asyncio.ensure_future(_watch_parent(stopper)))
    else:
        v6 = listener_mod.ipv6_available()

        def not_ready() -> str | None:
            if ctx.draining.is_set():
                return "draining"
            if source is not None and source.current is None:
                where = settings.config_file or settings.controller
                return f"waiting for the first config from {where}"
            if security is not None:
                return security.ready_reason()  # a certificate when mTLS is on
            return None

        status = StatusApp(
            not_ready,
            _load_probes(settings),
            metrics=telemetry.exposition,
        )
        servers += await start_http_server(
            "status", _without_unusable_ipv6(settings.status_listen, v6), header_route=status.route
        )
        admin = AdminApp(
            AdminHooks(
                config_dump=lambda: {
                    "settings": settings.dump(),
                    "pid": os.getpid(),
                    **_config_dump(source, engine),
                    "security": security.status() if security is not None else None,
                },
                listeners=lambda: [item.describe() for item in listeners],
                drain=stopper.request_drain,
                quit=stopper.request_quit,
                set_log_level=_set_log_level,
            )
        )
        servers += await start_http_server("admin", settings.admin_listen, admin.route)
    log.info("synchro-proxy %s ready (pid %d)", "worker" if worker else "process", os.getpid())

    how = await stopper.wait()
    ctx.draining.set()
    for item in listeners:
        item.stop_accepting()
    if how == "drain":
        log.info(
            "draining: up to %gs for %d open connections",
            settings.drain_seconds,
            sum(len(i.connections) for i in listeners),
        )
        if not await listener_mod.wait_connections(listeners, settings.drain_seconds):
            log.info("drain time over; closing the remaining connections")
    listener_mod.cancel_connections(listeners)
    await listener_mod.wait_connections(listeners, 1.0)
    for task in background:
        task.cancel()
    if source is not None:
        await source.stop()
    if security is not None:
        await security.stop()
    await telemetry.aclose()
    await _close_servers(servers)
    log.info("synchro-proxy exiting")
    return 0


# -- the supervisor of --concurrency workers ---------------------------------


class _WorkerSlot:
    def __init__(self, index: int, argv: Sequence[str]) -> None:
        self.index = index
        self.argv = list(argv)
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.restarts = 0

    async def _spawn(self) -> asyncio.subprocess.Process:
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.main",
                *self.argv,
                f"--worker-ready-fd={write_fd}",
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(None, os.read, read_fd, 1)
        finally:
            os.close(read_fd)
        self.ready = ok == b"1"
        return process

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.process = await self._spawn()
            code = await self.process.wait()
            self.ready = False
            if stopping.is_set():
                return
            self.restarts += 1
            log.error(
                "worker %d (pid %d) exited with %s; restarting", self.index, self.process.pid, code
            )
            await asyncio.sleep(min(5.0, 0.5 * self.restarts))

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


async def run_supervisor(settings: Settings, argv: Sequence[str]) -> int:
    stopper = _Stopper()
    stopper.install_signals()
    stopping = asyncio.Event()
    slots = [_WorkerSlot(i, argv) for i in range(settings.concurrency)]
    tasks = [asyncio.ensure_future(slot.run(stopping)) for slot in slots]

    def not_ready() -> str | None:
        if stopping.is_set():
            return "draining"
        waiting = sum(1 for s in slots if not s.ready)
        return f"{waiting} of {len(slots)} workers not ready" if waiting else None

    v6 = listener_mod.ipv6_available()
    # The workers' request metrics stay in the workers; this serves the supervisor's own.
    telemetry = Telemetry.disabled()
    telemetry.start()
    status = StatusApp(not_ready, _load_probes(settings), metrics=telemetry.exposition)
    servers = await start_http_server(
        "status", _without_unusable_ipv6(settings.status_listen, v6), header_route=status.route
    )
    admin = AdminApp(
        AdminHooks(
            config_dump=lambda: {"settings": settings.dump(), "config": None, "pid": os.getpid()},
            listeners=lambda: [
                {
                    "name": name,
                    "addresses": [str(a) for a in addresses],
                    "workers": [
                        {
                            "pid": s.process.pid if s.process else None,
                            "ready": s.ready,
                            "restarts": s.restarts,
                        }
                        for s in slots
                    ],
                }
                for name, addresses in (
                    ("outbound", settings.outbound_listen),
                    ("inbound", settings.inbound_listen),
                )
                if addresses
            ],
            drain=stopper.request_drain,
            quit=stopper.request_quit,
            set_log_level=_set_log_level,
        )
    )
    servers += await start_http_server("admin", settings.admin_listen, admin.route)

    how = await stopper.wait()
    stopping.set()
    for slot in slots:
        slot.signal(signal.SIGTERM if how == "drain" else signal.SIGKILL)
    grace = settings.drain_seconds + 5.0 if how == "drain" else 2.0
    _, pending = await asyncio.wait(tasks, timeout=grace)
    if pending:
        for slot in slots:
            slot.signal(signal.SIGKILL)
        await asyncio.wait(tasks, timeout=2.0)
    await telemetry.aclose()
    await _close_servers(servers)
    log.info("synchro-proxy supervisor exiting")
    return 0


# -- lifecycle-hook subcommands (see webhook/inject.py) -----------------------


def _local_request(address: str, method: str, path: str, timeout: float) -> int:
    import http.client

    target = parse_host_port(address)
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    finally:
        conn.close()


def wait_ready_command(argv: Sequence[str]) -> int:
    """postStart hook: exit 0 once the local proxy is ready, 1 after --timeout."""
    import time

    p = argparse.ArgumentParser(prog="synchro-proxy wait-ready")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--status", default=f"127.0.0.1:{ports.STATUS_PORT}", metavar="HOST:PORT")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = _local_request(args.status, "GET", "/healthz/ready", 1.0)
            if status == 200:
                return 0
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    print(f"synchro-proxy wait-ready: not ready after {args.timeout:g}s ({last})", file=sys.stderr)
    return 1


def drain_command(argv: Sequence[str]) -> int:
    """preStop hook: ask the local proxy to drain, return after the drain time."""
    import time

    p = argparse.ArgumentParser(prog="synchro-proxy drain")
    p.add_argument("--admin", default=f"127.0.0.1:{ports.ADMIN_PORT}", metavar="HOST:PORT")
    p.add_argument("--seconds", type=float, default=None, help="default SYNCHRO_DRAIN_SECONDS or 5")
    args = p.parse_args(argv)
    seconds = args.seconds
    if seconds is None:
        seconds = _number(
            os.environ.get("SYNCHRO_DRAIN_SECONDS", "").strip() or "5", "SYNCHRO_DRAIN_SECONDS"
        )
    try:
        _local_request(args.admin, "POST", "/drain", 5.0)
    except OSError as exc:
        print(f"synchro-proxy drain: proxy not reachable at {args.admin}: {exc}", file=sys.stderr)
        return 1
    time.sleep(seconds)
    return 0


SUBCOMMANDS = {"wait-ready": wait_ready_command, "drain": drain_command}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        raise SystemExit(SUBCOMMANDS[argv[0]](argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        settings = parse_settings(args, os.environ)
    except SettingsError as exc:
        print(f"synchro-proxy: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.telemetry.access_log != "off":
        setup_access_logger()
    if settings.telemetry.endpoint_error:
        log.error("%s", settings.telemetry.endpoint_error)
    raise_nofile_limit()
    import uvloop

    if args.worker_ready_fd is not None:
        code = uvloop.run(run_proxy(settings, worker_ready_fd=args.worker_ready_fd))
    elif settings.concurrency > 1:
        code = uvloop.run(run_supervisor(settings, argv))
    else:
        code = uvloop.run(run_proxy(settings))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
