"""Proxy data-path benchmark: direct vs HAProxy vs synchro-proxy, in one run.

    python3 bench/proxy.py [--duration S] [--quick] [--json [PATH]]

nginx serves a 1 KiB file on 127.0.0.1 over HTTP/1.1 (keep-alive) and over h2c
(prior knowledge). For every path in PATHS and every protocol in PROTOCOLS:

1. start the path's processes (nothing for `direct`) in front of nginx;
2. warm up, then measure throughput with wrk (HTTP/1.1) or h2load (h2c) while
   sampling utime+stime of the proxy's processes from /proc/<pid>/stat, giving
   CPU microseconds per completed request;
3. measure latency at a fixed 1,000 requests/s with h2load's paced mode
   (10 connections x 100 req/s, connection starts staggered 1 ms apart), giving
   p50/p99 from h2load's per-request log;
4. read the proxy's VmRSS, then stop it.

Then it prints one table and the issue's targets with pass/miss. See
bench/README.md for the method, its limits and recorded figures.

To add a path (features on, mTLS, telemetry), add a launcher and a PathSpec
to PATHS, and its targets to TARGETS; nothing else needs to change.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):
    # Run as `python3 bench/proxy.py`: sys.path[0] is bench/, where this very
    # file would shadow the `proxy` package; put the repository root there.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import (
    LOOPBACK,
    BenchError,
    HostPort,
    LoadResult,
    LogSample,
    Placement,
    Proc,
    Processes,
    achieved_rps,
    drop_warmup,
    free_port,
    host_busy_seconds,
    own_cpu_seconds,
    parse_h2load,
    parse_h2load_log,
    parse_wrk,
    plan_placement,
    run_tool,
    summarize_log,
    tree_cpu_seconds,
    tree_rss_bytes,
    wait_for_http,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[1]
BODY_SIZE = 1024
BODY_PATH = "/1k.bin"
LATENCY_SLICE_S = 1.0  # paced runs alternate between paths in slices this long

# --------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    duration_s: float = 5.0  # each throughput run and each latency run
    warmup_s: float = 1.0
    # Throughput runs are split into this many slices, the paths taking turns, so
    # that background load drifting during the run falls on every path alike.
    rounds: int = 1
    wrk_connections: int = 32
    h2_clients: int = 8
    h2_streams: int = 4  # h2_clients x h2_streams = wrk_connections in flight
    latency_rps: int = 1000
    latency_clients: int = 10
    paths: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    pin: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.duration_s <= 600 or self.warmup_s < 0:
            raise ValueError("--duration must be between 0 and 600 seconds")
        if not 1 <= self.rounds <= 60 or self.duration_s / self.rounds < 1:
            raise ValueError("--rounds must be 1-60, with at least 1 s of --duration per round")
        if self.latency_rps % self.latency_clients:
            raise ValueError("latency_rps must be a multiple of latency_clients")


# --------------------------------------------------------------------------
# pure: configuration files
# --------------------------------------------------------------------------


def nginx_config(workdir: Path, http1_port: int, h2c_port: int) -> str:
    tmp = workdir / "nginx-tmp"
    return f"""\
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    # sendfile splits h2 HEADERS and DATA into two writes and Nagle then
    # holds a paced single-stream h2c response for ~40 ms (delayed ACK)
    sendfile off;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    http2_max_requests 10000000;
    server {{ listen {LOOPBACK}:{http1_port}; root {workdir}/www; }}
    server {{ listen {LOOPBACK}:{h2c_port} http2; root {workdir}/www; }}
}}
"""


def haproxy_config(listen_port: int, upstream: HostPort, protocol: str) -> str:
    """One thread, HTTP mode, keep-alive and connection reuse towards nginx."""
    proto = " proto h2" if protocol == "h2c" else ""
    return f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bench
    bind {LOOPBACK}:{listen_port}{proto}
    default_backend nginx

backend nginx
    server nginx {upstream[0]}:{upstream[1]}{proto}
"""


# --------------------------------------------------------------------------
# paths: a table of launchers
# --------------------------------------------------------------------------


class Skip(Exception):
    """This path cannot run here; the reason is printed in its row."""


@dataclass(frozen=True)
class Hop:
    """A running path: where clients connect, and whose CPU and RSS we count."""

    front: HostPort
    procs: tuple[Proc, ...] = ()
    # Called after the path's runs: a line for the report (e.g. spans exported).
    notes: Callable[[], str] | None = None

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.procs)


@dataclass
class Ctx:
    procs: Processes
    workdir: Path
    placement: Placement
    settings: Settings


# (ctx, protocol, upstream) -> Hop; may raise Skip. Processes go through
# ctx.procs so they are stopped after the path is measured (and on any error).
Launcher = Callable[[Ctx, str, HostPort], Hop]


def launch_direct(ctx: Ctx, protocol: str, upstream: HostPort) -> Hop:
    return Hop(front=upstream)


def launch_haproxy(ctx: Ctx, protocol: str, upstream: HostPort) -> Hop:
    exe = shutil.which("haproxy")
    if not exe:
        raise Skip("haproxy not installed (apt-get install haproxy)")
    port = free_port()
    cfg = ctx.workdir / f"haproxy-{protocol}.cfg"
    cfg.write_text(haproxy_config(port, upstream, protocol))
    proc = ctx.procs.start(
        f"haproxy-{protocol}", [exe, "-db", "-f", str(cfg)], cpus=ctx.placement.proxy
    )
    wait_for_port((LOOPBACK, port), proc=proc)
    return Hop(front=(LOOPBACK, port), procs=(proc,))


def synchro_command() -> list[str]:
    script = Path(sys.executable).with_name("synchro-proxy")
    if script.exists():
        return [str(script)]
    found = shutil.which("synchro-proxy")
    return [found] if found else [sys.executable, "-m", "proxy.main"]


def features_config(workdir: Path, protocol: str, vip: int, upstream: HostPort) -> Path:
    """A config that turns the traffic features on for the benchmark's requests:
    the static destination is a Service's ClusterIP:port whose one endpoint is
    nginx, with an HTTPRoute path match, peak-EWMA balancing (the default), a
    retry policy and an outlier detector."""
    from proxy import config as pc

    route = pc.Route(
        kind="http",
        name="bench/files",
        rule=0,
        match=pc.RouteMatch(path=pc.PathMatch("PathPrefix", "/")),
        backends=(pc.WeightedBackend("bench/nginx", vip),),
    )
    service = pc.Service(
        name="nginx",
        namespace="bench",
        cluster_ips=(LOOPBACK,),
        ports=(
            pc.ServicePort(
                port=vip,
                protocol="http" if protocol == "http1" else "http2",
                endpoints=(pc.Endpoint(ip=upstream[0], port=upstream[1]),),
            ),
        ),
        routes=(route,),
        policy=pc.TrafficPolicy(
            load_balancer=pc.LoadBalancer("ewma"),
            retry=pc.RetryPolicy(attempts=2, retry_on=("5xx", "connect-failure")),
            outlier_detection=pc.OutlierDetection(consecutive_5xx_errors=5),
        ),
    )
    path = workdir / f"features-{protocol}.json"
    config = pc.ProxyConfig(version="bench", services=(service,))
    path.write_text(json.dumps(config.to_dict()))
    return path


def synchro_launcher(
    extra_args: Sequence[str] = (), concurrency: int = 1, features: bool = False
) -> Launcher:
    """A launcher for synchro-proxy with --static-destination; variants add flags.
    `features`: the destination is a Service with traffic features on."""

    def launch(ctx: Ctx, protocol: str, upstream: HostPort) -> Hop:
        ports = {name: free_port() for name in ("outbound", "inbound", "status")}
        destination = upstream
        feature_args: list[str] = []
        if features:
            vip = free_port()  # nothing listens there: the config maps it to nginx
            destination = (LOOPBACK, vip)
            config = features_config(ctx.workdir, protocol, vip, upstream)
            feature_args = [f"--config-file={config}"]
        argv = [
            *synchro_command(),
            f"--outbound-listen={LOOPBACK}:{ports['outbound']}",
            f"--inbound-listen={LOOPBACK}:{ports['inbound']}",
            f"--status-listen={LOOPBACK}:{ports['status']}",
            "--admin-listen=",
            f"--static-destination={destination[0]}:{destination[1]}",
            *feature_args,
            f"--concurrency={concurrency}",
            "--log-level=warning",
            *extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCHRO_")}
        # Measure this checkout's proxy even when the installed entry point's
        # editable install points elsewhere.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
        proc = ctx.procs.start(
            f"synchro-{protocol}", argv, cpus=ctx.placement.proxy, cwd=REPO, env=env
        )
        try:
            wait_for_http((LOOPBACK, ports["status"]), "/healthz/ready", proc=proc, timeout_s=20)
        except BenchError as exc:
            ctx.procs.stop(proc)
            raise Skip(f"synchro-proxy not runnable: {summary_line(str(exc))}") from exc
        return Hop(front=(LOOPBACK, ports["outbound"]), procs=(proc,))

    return launch


def start_otlp_sink(ctx: Ctx) -> tuple[HostPort, Proc]:
    """bench/otlp_sink.py: a local OTLP/HTTP receiver that accepts and discards
    spans (and counts them), so that tracing really exports during the run."""
    port = free_port()
    proc = ctx.procs.start(
        "otlp-sink",
        [sys.executable, str(REPO / "bench" / "otlp_sink.py"), str(port)],
        cpus=ctx.placement.load,
        cwd=REPO,
    )
    wait_for_http((LOOPBACK, port), "/stats", proc=proc)
    return (LOOPBACK, port), proc


def sink_stats(addr: HostPort) -> dict[str, int]:
    conn = http.client.HTTPConnection(*addr, timeout=5)
    try:
        conn.request("GET", "/stats")
        stats: dict[str, int] = json.loads(conn.getresponse().read())
        return stats
    finally:
        conn.close()


def telemetry_launcher(sampling_percent: float = 1.0) -> Launcher:
    """synchro-proxy with metrics on and tracing at `sampling_percent` to a
    local OTLP/HTTP sink (started here, stopped with the path)."""

    def launch(ctx: Ctx, protocol: str, upstream: HostPort) -> Hop:
        try:
            sink, _ = start_otlp_sink(ctx)
        except BenchError as exc:
            raise Skip(f"OTLP sink not runnable: {summary_line(str(exc))}") from exc
        inner = synchro_launcher(
            extra_args=(
                "--metrics=on",
                f"--otlp-endpoint=http://{sink[0]}:{sink[1]}/v1/traces",
                f"--trace-sampling={sampling_percent:g}",
            )
        )
        hop = inner(ctx, protocol, upstream)
        # Spans leave in batches, at least once a second: count what has arrived.
        return replace(hop, notes=partial(_sink_note, sink))

    return launch


def _sink_note(sink: HostPort) -> str:
    try:
        st = sink_stats(sink)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return f"OTLP sink unreadable: {exc}"
    note = f"OTLP sink received {st['spans']} spans in {st['exports']} exports"
    if not st["spans"]:
        note += " (none: tracing did not export, the figures do not measure it)"
    if st["bad"]:
        note += f", {st['bad']} undecodable"
    return note


def _security_launcher(name: str) -> Launcher:
    """A launcher from bench/security.py (mTLS paths), imported when used."""

    def launch(ctx: Ctx, protocol: str, upstream: HostPort) -> Hop:
        from bench import security

        try:
            hop: Hop = getattr(security, name)(ctx, protocol, upstream)
        except BenchError as exc:
            raise Skip(summary_line(str(exc))) from exc
        return hop

    return launch


@dataclass(frozen=True)
class PathSpec:
    name: str
    describe: str
    launch: Launcher
    cpu_baseline: str | None = None  # path whose CPU/request this one is compared to


PATHS: tuple[PathSpec, ...] = (
    PathSpec("direct", "client -> nginx", launch_direct),
    PathSpec("haproxy", "HAProxy 2.x, nbthread 1, http mode", launch_haproxy),
    PathSpec(
        "synchro",
        "synchro-proxy, 1 worker, --static-destination",
        synchro_launcher(),
        cpu_baseline="haproxy",
    ),
    PathSpec(
        "synchro-features",
        "synchro-proxy, route match + EWMA + retry policy + outlier detector",
        synchro_launcher(features=True),
        cpu_baseline="synchro",
    ),
    PathSpec(
        "synchro-telemetry-off",
        "synchro-proxy, --metrics=off, no tracing, no access log",
        synchro_launcher(extra_args=("--metrics=off",)),
    ),
    PathSpec(
        "synchro-telemetry-on",
        "synchro-proxy, metrics on + tracing at 1% to a local OTLP/HTTP sink",
        telemetry_launcher(1.0),
        cpu_baseline="synchro-telemetry-off",
    ),
    PathSpec(
        "haproxy-tls",
        "two HAProxies (nbthread 1) with mutual TLS between them",
        _security_launcher("launch_haproxy_tls"),
    ),
    PathSpec(
        "synchro-mtls",
        "two synchro-proxy sidecars with mTLS between them (certificates from the controller)",
        _security_launcher("launch_synchro_mtls"),
        cpu_baseline="haproxy-tls",
    ),
)


# --------------------------------------------------------------------------
# protocols: how to load a front address
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    name: str
    throughput: Callable[[Settings, HostPort, float], list[str]]  # argv for a timed run
    parse: Callable[[str], LoadResult]  # that run's output
    h1: bool  # h2load needs --h1 for the paced latency run and the probe


def wrk_argv(s: Settings, front: HostPort, seconds: float) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{s.wrk_connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout=5s",
        "--latency",
        url(front),
    ]


def h2load_argv(s: Settings, front: HostPort, seconds: float) -> list[str]:
    return [
        "h2load",
        "-t1",
        f"-c{s.h2_clients}",
        f"-m{s.h2_streams}",
        f"-D{max(1, round(seconds))}",
        url(front),
    ]


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("http1", wrk_argv, parse_wrk, h1=True),
    Protocol("h2c", h2load_argv, parse_h2load, h1=False),
)


def url(front: HostPort) -> str:
    return f"http://{front[0]}:{front[1]}{BODY_PATH}"


def paced_argv(
    s: Settings, protocol: Protocol, front: HostPort, log_file: Path, seconds: float
) -> list[str]:
    """h2load at a fixed total rate: N connections, each at rate/N, started 1 ms apart.

    The stagger spreads the connections' timers so arrivals are even instead
    of bursts of N at once every N/rate seconds.
    """
    per_client = s.latency_rps // s.latency_clients
    return [
        "h2load",
        *(["--h1"] if protocol.h1 else []),
        "-t1",
        f"-c{s.latency_clients}",
        "-m1",
        "-r1",
        "--rate-period=1ms",
        f"--rps={per_client}",
        f"-n{round(s.latency_rps * seconds)}",
        f"--log-file={log_file}",
        url(front),
    ]


def probe_argv(protocol: Protocol, front: HostPort) -> list[str]:
    return ["h2load", *(["--h1"] if protocol.h1 else []), "-n1", "-c1", url(front)]


# --------------------------------------------------------------------------
# results and targets (pure)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    path: str
    protocol: str
    skipped: str = ""
    rps: float | None = None
    requests: int | None = None
    errors: int | None = None
    cpu_us_per_req: float | None = None
    cpu_baseline: str | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_rps: float | None = None
    latency_failed: int | None = None
    rss_mb: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Target:
    label: str
    path: str
    protocol: str
    metric: str  # one of METRICS
    limit: float
    baseline: str | None = None  # path the metric is relative to


@dataclass(frozen=True)
class Verdict:
    target: Target
    measured: float | None
    passed: bool | None  # None: could not be measured
    note: str = ""


def _find(rows: Sequence[Row], path: str, protocol: str) -> Row | None:
    for row in rows:
        if row.path == path and row.protocol == protocol and not row.skipped:
            return row
    return None


def cpu_ratio(row: Row, base: Row | None) -> float | None:
    if base is None or row.cpu_us_per_req is None or not base.cpu_us_per_req:
        return None
    return row.cpu_us_per_req / base.cpu_us_per_req


def p99_added_ms(row: Row, base: Row | None) -> float | None:
    if base is None or row.latency_p99_ms is None or base.latency_p99_ms is None:
        return None
    return row.latency_p99_ms - base.latency_p99_ms


def rss(row: Row, base: Row | None) -> float | None:
    return row.rss_mb


METRICS: dict[str, tuple[Callable[[Row, Row | None], float | None], str]] = {
    "cpu_ratio": (cpu_ratio, "x"),
    # The same ratio, against the bare proxy (a metric of its own so that reports
    # keyed by protocol and metric keep one CPU target per protocol each).
    "features_cpu_ratio": (cpu_ratio, "x"),
    "telemetry_cpu_ratio": (cpu_ratio, "x"),
    "p99_added_ms": (p99_added_ms, " ms"),
    "rss_mb": (rss, " MB"),
}


TARGETS: tuple[Target, ...] = tuple(
    t
    for proto in ("http1", "h2c")
    for t in (
        Target("CPU/request vs HAProxy", "synchro", proto, "cpu_ratio", 1.5, "haproxy"),
        Target("p99 added at 1,000 req/s", "synchro", proto, "p99_added_ms", 0.5, "direct"),
        Target("RSS after the run", "synchro", proto, "rss_mb", 40.0),
        Target(
            "CPU/request, features on vs bare",
            "synchro-features",
            proto,
            "features_cpu_ratio",
            1.2,
            "synchro",
        ),
        Target(
            "CPU/request, metrics + 1% tracing vs off",
            "synchro-telemetry-on",
            proto,
            "telemetry_cpu_ratio",
            1.15,
            "synchro-telemetry-off",
        ),
    )
)


def evaluate(rows: Sequence[Row], targets: Sequence[Target]) -> list[Verdict]:
    verdicts = []
    for t in targets:
        row = _find(rows, t.path, t.protocol)
        base = _find(rows, t.baseline, t.protocol) if t.baseline else None
        skipped = next((r.skipped for r in rows if r.path == t.path and r.skipped), "")
        if row is None:
            verdicts.append(Verdict(t, None, None, skipped or "not measured"))
            continue
        value = METRICS[t.metric][0](row, base)
        if value is None:
            verdicts.append(Verdict(t, None, None, "not measured"))
        else:
            verdicts.append(Verdict(t, value, value <= t.limit))
    return verdicts


def rate_missed(row: Row, paced_rps: float) -> bool:
    return row.latency_rps is not None and row.latency_rps < 0.9 * paced_rps


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: Sequence[Row], verdicts: Sequence[Verdict], header: str, paced_rps: float) -> str:
    cols = [
        ("path", "<9"),
        ("proto", "<6"),
        ("req/s", ">9"),
        ("errors", ">6"),
        ("CPU µs/req", ">10"),
        ("CPU ratio", ">16"),
        ("p50 ms", ">7"),
        ("p99 ms", ">7"),
        ("p99 added", ">9"),
        ("paced req/s", ">11"),
        ("RSS MB", ">7"),
    ]
    lines = [header, ""]
    lines.append("  ".join(format(name, spec) for name, spec in cols))
    for row in rows:
        if row.skipped:
            lines.append(f"{row.path:<9}  {row.protocol:<6}  skipped: {row.skipped}")
            continue
        base = _find(rows, row.cpu_baseline, row.protocol) if row.cpu_baseline else None
        ratio = cpu_ratio(row, base)
        ratio_s = f"{ratio:.2f}x {row.cpu_baseline}" if ratio is not None else "-"
        direct = _find(rows, "direct", row.protocol)
        added = p99_added_ms(row, direct) if row.path != "direct" else None
        errors = (row.errors or 0) + (row.latency_failed or 0)
        cells = [
            row.path,
            row.protocol,
            _fmt(row.rps, ".0f"),
            str(errors),
            _fmt(row.cpu_us_per_req, ".1f"),
            ratio_s,
            _fmt(row.latency_p50_ms, ".3f"),
            _fmt(row.latency_p99_ms, ".3f"),
            _fmt(added, "+.3f"),
            _fmt(row.latency_rps, ".0f") + ("*" if rate_missed(row, paced_rps) else ""),
            _fmt(row.rss_mb, ".1f"),
        ]
        lines.append("  ".join(format(c, spec) for c, (_n, spec) in zip(cells, cols, strict=True)))
    for row in rows:
        if row.note:
            lines.append(f"note: {row.path} {row.protocol}: {row.note}")
    if any(rate_missed(r, paced_rps) for r in rows):
        lines.append(
            f"* the paced run fell more than 10% short of {paced_rps:g} req/s: the path "
            "could not keep up, and its latency figures hide the queueing"
        )
    lines += ["", "targets (issues 3, 5, 7):"]
    for v in verdicts:
        t = v.target
        unit = METRICS[t.metric][1]
        what = f"{t.path} {t.protocol} {t.label} <= {t.limit:g}{unit}"
        if v.passed is None:
            lines.append(f"  {what:<52} measured -          n/a  ({v.note})")
        else:
            got = f"{v.measured:.2f}{unit}"
            lines.append(f"  {what:<52} measured {got:<10} {'pass' if v.passed else 'MISS'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


def summary_line(text: str) -> str:
    """The last non-empty line: for a process that died, usually its own error."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text.strip()


def start_nginx(ctx: Ctx) -> tuple[HostPort, HostPort]:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(exe).exists():
        raise BenchError("nginx not installed (apt-get install nginx-light)")
    www = ctx.workdir / "www"
    (ctx.workdir / "nginx-tmp").mkdir()
    www.mkdir()
    (www / BODY_PATH.lstrip("/")).write_bytes(b"x" * BODY_SIZE)
    # nginx workers drop to `nobody` when started as root
    for p in (ctx.workdir, www, www / BODY_PATH.lstrip("/")):
        p.chmod(0o755)
    h1, h2 = free_port(), free_port()
    conf = ctx.workdir / "nginx.conf"
    conf.write_text(nginx_config(ctx.workdir, h1, h2))
    proc = ctx.procs.start(
        "nginx",
        [exe, "-e", "stderr", "-p", str(ctx.workdir), "-c", str(conf)],
        cpus=ctx.placement.backend,
    )
    wait_for_http((LOOPBACK, h1), BODY_PATH, proc=proc)
    wait_for_port((LOOPBACK, h2), proc=proc)
    return (LOOPBACK, h1), (LOOPBACK, h2)


def probe(protocol: Protocol, front: HostPort) -> None:
    """One request through the path, so a broken proxy is a clear Skip, not a zero."""
    try:
        res = parse_h2load(run_tool(probe_argv(protocol, front), cpus=frozenset(), timeout_s=15))
    except BenchError as exc:
        raise Skip(f"probe request failed: {summary_line(str(exc))}") from exc
    if res.requests != 1 or res.errors or res.non_2xx:
        raise Skip(f"probe request through {front[0]}:{front[1]} did not get a 2xx")


@dataclass
class Live:
    """A path that is up for one protocol, and what has been measured on it so far."""

    spec: PathSpec
    hop: Hop
    result: LoadResult | None = None
    cpu_s: float | None = None
    samples: list[LogSample] = field(default_factory=list)
    slice_rps: list[float] = field(default_factory=list)
    failed: str = ""


def throughput(ctx: Ctx, protocol: Protocol, live: Live, n: int = 0) -> None:
    """Round `n` of the path's throughput run (`Settings.rounds` of them): the
    requests and CPU seconds add up over the rounds."""
    s, load, hop = ctx.settings, ctx.placement.load, live.hop
    seconds = s.duration_s / s.rounds
    if s.warmup_s > 0 and n == 0:
        run_tool(protocol.throughput(s, hop.front, s.warmup_s), cpus=load, timeout_s=60)
    cpu0 = tree_cpu_seconds(hop.pids)
    out = run_tool(protocol.throughput(s, hop.front, seconds), cpus=load, timeout_s=seconds + 60)
    cpu1 = tree_cpu_seconds(hop.pids)
    result = protocol.parse(out)
    live.result = result if live.result is None else combine(live.result, result)
    live.cpu_s = (live.cpu_s or 0.0) + (cpu1 - cpu0)


def combine(a: LoadResult, b: LoadResult) -> LoadResult:
    """Two runs of one path as one (latency percentiles are not combined)."""
    duration = a.duration_s + b.duration_s
    requests = a.requests + b.requests
    return LoadResult(
        tool=a.tool,
        requests=requests,
        duration_s=duration,
        rps=requests / duration if duration > 0 else 0.0,
        errors=a.errors + b.errors,
        non_2xx=a.non_2xx + b.non_2xx,
    )


def paced_slice(ctx: Ctx, protocol: Protocol, live: Live, seconds: float, n: int) -> None:
    s = ctx.settings
    log_file = ctx.workdir / f"latency-{live.spec.name}-{protocol.name}-{n}.log"
    run_tool(
        paced_argv(s, protocol, live.hop.front, log_file, seconds),
        cpus=ctx.placement.load,
        timeout_s=3 * seconds + 60,
    )
    samples = parse_h2load_log(log_file.read_text())
    live.slice_rps.append(achieved_rps(samples))
    # the first request of each connection also pays for its setup; keep steady state only
    live.samples += drop_warmup(samples, (s.latency_clients + 5) * 1000)


def to_row(live: Live, protocol: Protocol) -> Row:
    if live.failed:
        return Row(live.spec.name, protocol.name, skipped=live.failed)
    res = live.result
    assert res is not None
    lat = summarize_log(live.samples)
    cpu_us = None
    if live.hop.pids and live.cpu_s is not None and res.requests:
        cpu_us = live.cpu_s * 1e6 / res.requests
    rss_b = tree_rss_bytes(live.hop.pids) if live.hop.pids else None
    note = live.hop.notes() if live.hop.notes is not None else ""
    return Row(
        path=live.spec.name,
        protocol=protocol.name,
        rps=res.rps,
        requests=res.requests,
        errors=res.errors + res.non_2xx,
        cpu_us_per_req=cpu_us,
        cpu_baseline=live.spec.cpu_baseline,
        latency_p50_ms=lat.p50_us / 1000,
        latency_p99_ms=lat.p99_us / 1000,
        latency_rps=statistics.fmean(live.slice_rps) if live.slice_rps else None,
        latency_failed=lat.failed,
        rss_mb=None if rss_b is None else rss_b / 2**20,
        note=note,
    )


def guarded(live: Live, step: Callable[[], None], log: Callable[[str], None]) -> None:
    """Run one measurement step; a failure marks the path failed instead of ending the bench."""
    if live.failed:
        return
    try:
        step()
        dead = [p for p in live.hop.procs if p.popen.poll() is not None]
        if dead:
            raise BenchError(f"{dead[0].name} exited with {dead[0].popen.returncode}")
    except BenchError as exc:
        live.failed = f"failed: {summary_line(str(exc))}"
        log(f"  {live.spec.name}: {live.failed}")


def measure_protocol(
    ctx: Ctx,
    paths: Sequence[PathSpec],
    protocol: Protocol,
    upstream: HostPort,
    log: Callable[[str], None],
) -> list[Row]:
    """All paths up at once, throughput one after the other, latency interleaved.

    Interleaving the paced runs in short slices spreads any background noise
    on the host over every path alike, which matters for "p99 added".
    """
    s = ctx.settings
    lives: list[Live] = []
    rows: dict[str, Row] = {}
    for spec in paths:
        try:
            hop = spec.launch(ctx, protocol.name, upstream)
            probe(protocol, hop.front)
            lives.append(Live(spec, hop))
        except (Skip, BenchError) as exc:
            reason = summary_line(str(exc))
            log(f"  {spec.name} / {protocol.name} skipped: {reason}")
            rows[spec.name] = Row(spec.name, protocol.name, skipped=reason)
    for n in range(s.rounds):
        for live in lives:
            rounds = f" (round {n + 1} of {s.rounds})" if s.rounds > 1 else ""
            log(f"  {live.spec.name} / {protocol.name}: throughput{rounds}")
            guarded(live, partial(throughput, ctx, protocol, live, n), log)
    slices = max(1, round(s.duration_s / LATENCY_SLICE_S))
    seconds = s.duration_s / slices
    log(f"  {protocol.name}: latency at {s.latency_rps} req/s, {slices} slice(s) per path")
    for n in range(slices):
        for live in lives:
            guarded(live, partial(paced_slice, ctx, protocol, live, seconds, n), log)
    for live in lives:
        try:
            rows[live.spec.name] = to_row(live, protocol)
        except BenchError as exc:
            rows[live.spec.name] = Row(
                live.spec.name, protocol.name, skipped=f"failed: {summary_line(str(exc))}"
            )
    return [rows[spec.name] for spec in paths]


def check_tools() -> None:
    missing = [t for t in ("wrk", "h2load") if not shutil.which(t)]
    if missing:
        raise BenchError(
            f"missing load generator(s): {', '.join(missing)} (apt-get install wrk nghttp2-client)"
        )


def select(items: Sequence[Any], names: Sequence[str], what: str) -> list[Any]:
    if not names:
        return list(items)
    known = {i.name for i in items}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(
            f"unknown {what}: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    return [i for i in items if i.name in names]


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the process cleanup below runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass(frozen=True)
class RunInfo:
    placement: Placement
    wall_s: float
    # busy CPU on the host that was not ours: other people's work competes with the run
    background_cores: float


def run(settings: Settings, log: Callable[[str], None]) -> tuple[list[Row], RunInfo]:
    check_tools()
    placement = plan_placement(sorted(os.sched_getaffinity(0)) if settings.pin else [])
    t0, host0, own0 = time.monotonic(), host_busy_seconds(), own_cpu_seconds()
    paths = select(PATHS, settings.paths, "path")
    protocols = select(PROTOCOLS, settings.protocols, "protocol")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="synchro-bench-") as tmp, Processes(Path(tmp)) as procs:
        workdir = Path(tmp)
        base = Ctx(procs, workdir, placement, settings)
        log("starting nginx ...")
        h1, h2 = start_nginx(base)
        upstreams = {"http1": h1, "h2c": h2}
        for protocol in protocols:
            log(f"{protocol.name}:")
            # this protocol's proxies are stopped before the next protocol starts
            with Processes(workdir) as path_procs:
                ctx = replace(base, procs=path_procs)
                rows += measure_protocol(ctx, paths, protocol, upstreams[protocol.name], log)
    # every process we started has been reaped here, so its CPU is in own_cpu_seconds()
    wall = time.monotonic() - t0
    other = (host_busy_seconds() - host0) - (own_cpu_seconds() - own0)
    return rows, RunInfo(placement, wall, max(0.0, other) / wall if wall > 0 else 0.0)


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per measurement (default 5)"
    )
    p.add_argument("--quick", action="store_true", help="2 s measurements, short warm-up")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write results as JSON to PATH (or stdout; the table then goes to stderr)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for the bench and everything it starts, e.g. -10 (root) so that "
        "unrelated work on the host disturbs the figures less; every path gets the same",
    )
    p.add_argument(
        "--no-pin", action="store_true", help="do not pin the proxy and the load to separate CPUs"
    )
    p.add_argument("--path", action="append", default=[], help="only this path (repeatable)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split each throughput run into N slices, the paths taking turns (default 1); "
        "CPU ratios then suffer less from background load that changes during the run",
    )
    p.add_argument(
        "--protocol", action="append", default=[], help="only this protocol (repeatable)"
    )
    args = p.parse_args(argv)
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    try:
        settings = Settings(
            duration_s=duration,
            warmup_s=0.5 if args.quick else 1.0,
            rounds=args.rounds,
            paths=tuple(args.path),
            protocols=tuple(args.protocol),
            pin=not args.no_pin,
        )
    except ValueError as exc:
        p.error(str(exc))
    return settings, args


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def describe_run(settings: Settings, info: RunInfo, when: str, commit: str) -> str:
    pl = info.placement
    pin = (
        f"load generator + nginx on CPU {sorted(pl.load)}, proxy on CPU {sorted(pl.proxy)}"
        if pl.pinned
        else "not pinned"
    )
    return (
        f"bench/proxy.py  {when}  commit {commit}  {os.cpu_count()} CPUs, {pin}\n"
        f"{settings.duration_s:g} s per throughput run (CPU/request from /proc/<pid>/stat "
        f"during it); latency paced at {settings.latency_rps} req/s for {settings.duration_s:g} s "
        f"per path\nother processes kept {info.background_cores:.2f} CPUs busy during the run "
        f"({info.wall_s:.0f} s); above ~0.1 latency figures are noisy"
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_args(argv)
    to_stdout_json = args.json == "-"
    out = sys.stderr if to_stdout_json else sys.stdout

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.nice:
        try:
            # children inherit it, so proxies, nginx and load generators all run at this niceness
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as exc:
            log(f"warning: cannot set niceness {args.nice}: {exc}; running at the default")
    try:
        with terminate_on_sigterm():
            rows, info = run(settings, log)
    except BenchError as exc:
        print(f"bench/proxy.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench/proxy.py: interrupted; all processes stopped", file=sys.stderr)
        return 130
    except SystemExit as exc:
        print("bench/proxy.py: terminated; all processes stopped", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else 1
    verdicts = evaluate(rows, TARGETS)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit()
    header = describe_run(settings, info, when, commit)
    print("", file=sys.stderr, flush=True)
    print(render(rows, verdicts, header, settings.latency_rps), file=out, flush=True)

    if args.json is not None:
        doc = to_json(rows, verdicts, settings, info, when, commit, argv)
        text = json.dumps(doc, indent=2)
        if to_stdout_json:
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def to_json(
    rows: Sequence[Row],
    verdicts: Sequence[Verdict],
    settings: Settings,
    info: RunInfo,
    when: str,
    commit: str,
    argv: Sequence[str] | None,
) -> dict[str, Any]:
    command = ["python3", "bench/proxy.py", *(sys.argv[1:] if argv is None else argv)]
    return {
        "date": when,
        "commit": commit,
        "command": shlex.join(command),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "background_cores": round(info.background_cores, 3),
            "wall_s": round(info.wall_s, 1),
        },
        "placement": {k: sorted(v) for k, v in asdict(info.placement).items()},
        "settings": asdict(settings),
        "paths": {p.name: p.describe for p in PATHS},
        "results": [asdict(r) for r in rows],
        "targets": [
            {**asdict(v.target), "measured": v.measured, "passed": v.passed, "note": v.note}
            for v in verdicts
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
