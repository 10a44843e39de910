"""Shared helpers for the benchmarks in bench/.

Two halves, kept apart on purpose:

- pure functions (parsers for wrk and h2load output, percentiles, /proc text
  parsing, CPU placement) that take text or numbers and return values, so
  `tests/integration/test_bench_smoke.py` can check them on captured samples;
- thin process helpers (free ports, starting and stopping processes in their
  own process groups, waiting for readiness, reading /proc) used by the
  benchmark scripts.

Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
HostPort = tuple[str, int]


class BenchError(Exception):
    """A benchmark could not run or its output could not be understood."""


# --------------------------------------------------------------------------
# pure: parsing
# --------------------------------------------------------------------------

_TIME_UNITS_US = {
    "us": 1.0,
    "ms": 1_000.0,
    "s": 1_000_000.0,
    "m": 60_000_000.0,
    "h": 3_600_000_000.0,
}
_TIME_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s|m|h)\s*$")


def parse_time_us(text: str) -> float:
    """`476.00us`, `0.93ms`, `2.00s` (wrk's and h2load's formats) -> microseconds."""
    m = _TIME_RE.match(text)
    if not m:
        raise BenchError(f"not a duration: {text!r}")
    return float(m.group(1)) * _TIME_UNITS_US[m.group(2)]


@dataclass(frozen=True)
class LoadResult:
    """What one load-generator run reports, whichever tool produced it."""

    tool: str
    requests: int  # completed with any status
    duration_s: float
    rps: float
    errors: int  # socket errors, failed/errored/timed-out streams
    non_2xx: int
    latency_us: dict[str, float] = field(default_factory=dict)  # "p50" -> µs, when known

    @property
    def ok_requests(self) -> int:
        return max(0, self.requests - self.non_2xx)


_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+\w+), ", re.M)
_WRK_RPS = re.compile(r"^Requests/sec:\s*([0-9.]+)", re.M)
_WRK_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.M)
_WRK_PCT = re.compile(r"^\s*(50|75|90|99(?:\.\d+)?)%\s+([0-9.]+\s*(?:us|ms|s|m|h))\s*$", re.M)


def parse_wrk(text: str) -> LoadResult:
    """Parse wrk 4.x output (with or without `--latency`)."""
    total = _WRK_TOTAL.search(text)
    rps = _WRK_RPS.search(text)
    if not total or not rps:
        raise BenchError("wrk output has no request totals:\n" + text[-2000:])
    errors = 0
    sock = _WRK_SOCKET.search(text)
    if sock:
        errors = sum(int(g) for g in sock.groups())
    non = _WRK_NON2XX.search(text)
    latency = {f"p{pct}": parse_time_us(value) for pct, value in _WRK_PCT.findall(text)}
    return LoadResult(
        tool="wrk",
        requests=int(total.group(1)),
        duration_s=parse_time_us(total.group(2)) / 1e6,
        rps=float(rps.group(1)),
        errors=errors,
        non_2xx=int(non.group(1)) if non else 0,
        latency_us=latency,
    )


_H2_FINISHED = re.compile(r"^finished in ([0-9.]+\w+), ([0-9.]+) req/s", re.M)
_H2_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout",
    re.M,
)
_H2_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)


def parse_h2load(text: str) -> LoadResult:
    """Parse h2load (nghttp2 1.4x-1.6x) summary output."""
    fin = _H2_FINISHED.search(text)
    req = _H2_REQUESTS.search(text)
    if not fin or not req:
        raise BenchError("h2load output has no summary:\n" + text[-2000:])
    _total, _started, done, succeeded, failed, errored, timeout = (int(g) for g in req.groups())
    status = _H2_STATUS.search(text)
    non_2xx = sum(int(g) for g in status.groups()[1:]) if status else done - succeeded
    return LoadResult(
        tool="h2load",
        requests=done,
        duration_s=parse_time_us(fin.group(1)) / 1e6,
        rps=float(fin.group(2)),
        # h2load counts 4xx/5xx as "failed" too; errors here are transport failures only
        errors=max(failed - non_2xx, errored + timeout, 0),
        non_2xx=non_2xx,
    )


@dataclass(frozen=True)
class LogSample:
    start_us: int  # since the epoch
    status: int  # -1 for a failed stream
    latency_us: int


def parse_h2load_log(text: str) -> list[LogSample]:
    """h2load `--log-file`: start µs since epoch, status, µs to end of response (tab separated)."""
    samples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 3:
            raise BenchError(f"h2load log line {lineno}: expected 3 columns: {line!r}")
        try:
            samples.append(LogSample(int(cols[0]), int(cols[1]), int(cols[2])))
        except ValueError as exc:
            raise BenchError(f"h2load log line {lineno}: {exc}") from None
    return samples


def drop_warmup(samples: Sequence[LogSample], window_us: int) -> list[LogSample]:
    """Drop requests that started within `window_us` of the run's first request."""
    if not samples:
        return []
    start = min(s.start_us for s in samples)
    return [s for s in samples if s.start_us - start >= window_us]


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the value below which `pct`% of samples fall)."""
    if not values:
        raise BenchError("percentile of no samples")
    if not 0 < pct <= 100:
        raise BenchError(f"percentile out of range: {pct}")
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return float(ordered[max(rank, 1) - 1])


@dataclass(frozen=True)
class LatencySummary:
    samples: int
    failed: int
    achieved_rps: float
    p50_us: float
    p99_us: float
    max_us: float


def achieved_rps(samples: Sequence[LogSample]) -> float:
    """Request starts per second over one contiguous run."""
    if len(samples) < 2:
        return 0.0
    span_s = (max(s.start_us for s in samples) - min(s.start_us for s in samples)) / 1e6
    # n arrivals span n-1 intervals
    return (len(samples) - 1) / span_s if span_s > 0 else 0.0


def summarize_log(samples: Sequence[LogSample]) -> LatencySummary:
    ok = [s for s in samples if 200 <= s.status < 300]
    if not ok:
        raise BenchError(f"no successful requests among {len(samples)} samples")
    lat = [float(s.latency_us) for s in ok]
    return LatencySummary(
        samples=len(samples),
        failed=len(samples) - len(ok),
        achieved_rps=achieved_rps(samples),
        p50_us=percentile(lat, 50),
        p99_us=percentile(lat, 99),
        max_us=max(lat),
    )


# --------------------------------------------------------------------------
# pure: /proc text
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    utime_ticks: int
    stime_ticks: int

    @property
    def cpu_ticks(self) -> int:
        return self.utime_ticks + self.stime_ticks


def parse_proc_stat(text: str) -> ProcStat:
    """Parse /proc/<pid>/stat; comm may hold spaces and parentheses, so split at the last ')'."""
    head, sep, rest = text.rpartition(")")
    if not sep:
        raise BenchError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    # fields[0] is field 3 (state); ppid is 4, utime 14, stime 15 (1-based, proc(5))
    return ProcStat(
        pid=pid, ppid=int(fields[1]), utime_ticks=int(fields[11]), stime_ticks=int(fields[12])
    )


def parse_vmrss_bytes(status_text: str) -> int:
    """`VmRSS:   12345 kB` from /proc/<pid>/status -> bytes."""
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status_text, re.M)
    if not m:
        raise BenchError("no VmRSS in /proc/<pid>/status (process exited or is a zombie?)")
    return int(m.group(1)) * 1024


def parse_host_cpu(proc_stat_text: str) -> tuple[int, int]:
    """The `cpu` line of /proc/stat -> (busy ticks, total ticks) summed over all CPUs."""
    for line in proc_stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal (guest is inside user)
            values = [int(v) for v in fields[1:9]]
            idle = values[3] + values[4]
            return sum(values) - idle, sum(values)
    raise BenchError("no aggregate cpu line in /proc/stat")


# --------------------------------------------------------------------------
# pure: CPU placement
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which CPUs each role may run on; empty sets mean 'do not pin'."""

    load: frozenset[int]
    proxy: frozenset[int]
    backend: frozenset[int]

    @property
    def pinned(self) -> bool:
        return bool(self.proxy)


def plan_placement(available: Sequence[int]) -> Placement:
    """Give the proxy under test a core of its own.

    The proxy is the thing measured and the slowest hop, so it gets the last
    CPU alone; the load generator and nginx (both C, a few µs per request)
    share the rest. With one CPU there is nothing to separate.
    """
    cpus = sorted(set(available))
    if len(cpus) < 2:
        return Placement(frozenset(), frozenset(), frozenset())
    rest = frozenset(cpus[:-1])
    return Placement(load=rest, proxy=frozenset({cpus[-1]}), backend=rest)


def taskset_prefix(cpus: frozenset[int]) -> list[str]:
    if not cpus:
        return []
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus))]


# --------------------------------------------------------------------------
# I/O: ports, /proc, processes
# --------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A port the kernel just handed out; racy in theory, fine on a bench host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def clock_ticks() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def read_stat(pid: int) -> ProcStat:
    return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (worker processes of a --concurrency N proxy)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = read_stat(int(entry))
        except (OSError, BenchError, ValueError, IndexError):
            continue  # raced with an exiting process
        children.setdefault(st.ppid, []).append(st.pid)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def host_busy_seconds() -> float:
    """CPU seconds the whole host has spent busy since boot (all CPUs)."""
    return parse_host_cpu(Path("/proc/stat").read_text())[0] / clock_ticks()


def own_cpu_seconds() -> float:
    """This process plus its reaped descendants (load generators, stopped servers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime of the given processes and their live descendants, in seconds."""
    ticks = 0
    seen: set[int] = set()
    for root in pids:
        for pid in [root, *descendants(root)]:
            if pid in seen:
                continue
            seen.add(pid)
            with contextlib.suppress(OSError):
                ticks += read_stat(pid).cpu_ticks
    return ticks / clock_ticks()


def tree_rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    seen: set[int] = set()
    for root in pids:
        for pid in [root, *descendants(root)]:
            if pid in seen:
                continue
            seen.add(pid)
            with contextlib.suppress(OSError, BenchError):
                total += parse_vmrss_bytes(Path(f"/proc/{pid}/status").read_text())
    return total


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Processes:
    """Starts processes in their own process groups and always stops them.

    Use as a context manager; on exit (normal, exception or Ctrl-C) every
    process group gets SIGTERM, then SIGKILL after a grace period.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[Proc] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: frozenset[int] = frozenset(),
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [*taskset_prefix(cpus), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 3.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(grace_s)
        # the group may outlive its leader (workers of a --concurrency proxy)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(grace_s)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def run_tool(argv: Sequence[str], *, cpus: frozenset[int], timeout_s: float) -> str:
    """Run a load generator to completion and return its stdout+stderr."""
    try:
        done = subprocess.run(
            [*taskset_prefix(cpus), *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} did not finish within {timeout_s:.0f}s") from exc
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise BenchError(f"{argv[0]} exited {done.returncode}:\n{out[-2000:]}")
    return out


def _deadline_loop(timeout_s: float, interval_s: float = 0.05) -> Iterator[None]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        yield
        time.sleep(interval_s)


def _check_alive(proc: Proc | None) -> None:
    if proc is not None and proc.popen.poll() is not None:
        raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")


def wait_for_port(addr: HostPort, *, proc: Proc | None = None, timeout_s: float = 10.0) -> None:
    for _ in _deadline_loop(timeout_s):
        _check_alive(proc)
        with contextlib.suppress(OSError), socket.create_connection(addr, timeout=0.5):
            return
    _check_alive(proc)
    raise BenchError(f"nothing listening on {addr[0]}:{addr[1]} after {timeout_s:.0f}s")


def wait_for_http(
    addr: HostPort, path: str, *, proc: Proc | None = None, timeout_s: float = 10.0
) -> None:
    """Wait until GET `path` answers 2xx."""
    last = "no answer"
    for _ in _deadline_loop(timeout_s):
        _check_alive(proc)
        conn = http.client.HTTPConnection(addr[0], addr[1], timeout=1.0)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if 200 <= resp.status < 300:
                return
            last = f"HTTP {resp.status}"
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc) or type(exc).__name__
        finally:
            conn.close()
    _check_alive(proc)
    raise BenchError(f"http://{addr[0]}:{addr[1]}{path} not ready after {timeout_s:.0f}s: {last}")
