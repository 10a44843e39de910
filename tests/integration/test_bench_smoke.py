"""Smoke test for the benchmark harness: its parsers and report on captured outputs.

No load is generated here (benchmarks live in bench/); these are the pure
functions that turn wrk/h2load/procfs text into the figures bench/proxy.py
prints, checked on real captured output so a format drift is caught.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench import proxy as bench_proxy
from bench._common import (
    BenchError,
    LogSample,
    parse_h2load,
    parse_h2load_log,
    parse_proc_stat,
    parse_time_us,
    parse_vmrss_bytes,
    parse_wrk,
    percentile,
    plan_placement,
    summarize_log,
    taskset_prefix,
)

WRK_OK = """\
Running 2s test @ http://127.0.0.1:18080/1k.txt
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   524.36us  134.21us   3.25ms   93.23%
    Req/Sec    61.56k     8.28k   70.82k    60.00%
  Latency Distribution
     50%  476.00us
     75%  581.00us
     90%  625.00us
     99%    1.38ms
  122056 requests in 2.00s, 147.13MB read
Requests/sec:  60996.43
Transfer/sec:     73.53MB
"""

WRK_ERRORS = """\
Running 1s test @ http://127.0.0.1:18080/missing
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    63.28us  138.11us   3.12ms   98.52%
    Req/Sec    73.18k    21.64k  103.89k    63.64%
  79835 requests in 1.10s, 23.45MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 79835
Requests/sec:  72577.54
Transfer/sec:     21.32MB
"""

H2LOAD_OK = """\
starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
Warm-up started for thread #0.
progress: 10% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 58467.50 req/s, 64.12MB/s
requests: 116935 total, 117035 started, 116935 done, 116935 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 116937 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 128.25MB (134475974) total, 12.04MB (12629196) headers (space savings 39.66%), 114.19MB (119741440) data
                     min         max         mean         sd        +/- sd
time for request:       71us      8.69ms      1.70ms       472us    90.50%
time for connect:       61us       368us       300us        87us    90.00%
time to 1st byte:     1.08ms      3.45ms      2.91ms       955us    80.00%
req/s           :    5815.15     5866.02     5846.26       15.91    80.00%
"""

H2LOAD_404 = """\
starting benchmark...
spawning thread #0: 2 total client(s). 20 total requests
Application protocol: h2c

finished in 834us, 23980.82 req/s, 5.17MB/s
requests: 20 total, 20 started, 20 done, 0 succeeded, 20 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 20 4xx, 0 5xx
"""

H2LOAD_REFUSED = """\
starting benchmark...
spawning thread #0: 2 total client(s). 4 total requests

finished in 173us, 0.00 req/s, 0B/s
requests: 4 total, 0 started, 0 done, 0 succeeded, 4 failed, 4 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
"""

H2LOAD_LOG = """\
1795644576178358\t200\t156
1795644576179671\t200\t176
1795644576179847\t200\t81
1795644576181049\t-1\t102
1795644576182269\t200\t97
"""


def test_time_units() -> None:
    assert parse_time_us("476.00us") == 476.0
    assert parse_time_us("1.38ms") == 1380.0
    assert parse_time_us("2.00s") == 2_000_000.0
    with pytest.raises(BenchError):
        parse_time_us("fast")


def test_wrk_ok() -> None:
    r = parse_wrk(WRK_OK)
    assert (r.tool, r.requests, r.duration_s, r.rps) == ("wrk", 122056, 2.0, 60996.43)
    assert (r.errors, r.non_2xx) == (0, 0)
    assert r.latency_us == {"p50": 476.0, "p75": 581.0, "p90": 625.0, "p99": 1380.0}


def test_wrk_errors_and_non_2xx() -> None:
    r = parse_wrk(WRK_ERRORS)
    assert (r.requests, r.duration_s, r.errors, r.non_2xx, r.ok_requests) == (
        79835,
        1.1,
        6,
        79835,
        0,
    )
    assert r.latency_us == {}


def test_h2load_ok_and_failures() -> None:
    ok = parse_h2load(H2LOAD_OK)
    assert (ok.requests, ok.duration_s, ok.rps, ok.errors, ok.non_2xx) == (
        116935,
        2.0,
        58467.5,
        0,
        0,
    )
    notfound = parse_h2load(H2LOAD_404)
    # h2load calls a 404 "failed"; that is a non-2xx, not a transport error
    assert (notfound.requests, notfound.errors, notfound.non_2xx) == (20, 0, 20)
    assert notfound.duration_s == pytest.approx(834e-6)
    refused = parse_h2load(H2LOAD_REFUSED)
    assert (refused.requests, refused.errors) == (0, 4)


@pytest.mark.parametrize("parser", [parse_wrk, parse_h2load])
def test_garbage_is_a_clear_error(parser: object) -> None:
    with pytest.raises(BenchError):
        parser("unable to connect to 127.0.0.1:1 Connection refused\n")  # type: ignore[operator]


def test_h2load_log_and_summary() -> None:
    samples = parse_h2load_log(H2LOAD_LOG)
    assert samples[3] == LogSample(1795644576181049, -1, 102)
    s = summarize_log(samples)
    assert (s.samples, s.failed) == (5, 1)
    assert s.p50_us == 97.0  # nearest rank among the four 2xx: 81, 97, 156, 176
    assert s.p99_us == 176.0
    assert s.achieved_rps == pytest.approx(4 / (3911 / 1e6))
    with pytest.raises(BenchError, match="line 1"):
        parse_h2load_log("1\t200\n")


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7], 99) == 7
    with pytest.raises(BenchError):
        percentile([], 50)


def test_proc_stat_with_awkward_comm() -> None:
    line = (
        "4242 (py (worker) 1) S 4200 4242 4242 0 -1 4194560 1226 0 0 0 "
        "350 132 0 0 20 0 1 0 318702 100294656 3727 18446744073709551615\n"
    )
    st = parse_proc_stat(line)
    assert (st.pid, st.ppid, st.utime_ticks, st.stime_ticks, st.cpu_ticks) == (
        4242,
        4200,
        350,
        132,
        482,
    )
    # and the live one parses too
    own = parse_proc_stat(Path("/proc/self/stat").read_text())
    assert own.cpu_ticks >= 0


def test_vmrss() -> None:
    assert parse_vmrss_bytes("Name:\tx\nVmRSS:\t   14736 kB\nThreads: 1\n") == 14736 * 1024
    with pytest.raises(BenchError):
        parse_vmrss_bytes("Name:\tzombie\n")


def test_placement() -> None:
    p = plan_placement([0, 1])
    assert (p.load, p.proxy, p.backend) == ({0}, {1}, {0})
    assert taskset_prefix(p.proxy) == ["taskset", "-c", "1"]
    assert not plan_placement([3]).pinned
    assert taskset_prefix(frozenset()) == []


def _row(path: str, cpu: float | None, p99: float, rss: float | None) -> bench_proxy.Row:
    return bench_proxy.Row(
        path=path,
        protocol="http1",
        rps=1000.0,
        requests=1000,
        errors=0,
        cpu_us_per_req=cpu,
        cpu_baseline="haproxy" if path == "synchro" else None,
        latency_p50_ms=p99 / 2,
        latency_p99_ms=p99,
        latency_rps=1000.0,
        latency_failed=0,
        rss_mb=rss,
    )


def test_targets_and_report() -> None:
    rows = [
        _row("direct", None, 0.2, None),
        _row("haproxy", 20.0, 0.3, 15.0),
        _row("synchro", 50.0, 0.6, 30.0),
        bench_proxy.Row("synchro", "h2c", skipped="synchro-proxy not runnable: boom"),
    ]
    verdicts = {
        (v.target.protocol, v.target.metric): v
        for v in bench_proxy.evaluate(rows, bench_proxy.TARGETS)
    }
    cpu = verdicts[("http1", "cpu_ratio")]
    assert cpu.measured == pytest.approx(2.5) and cpu.passed is False
    p99 = verdicts[("http1", "p99_added_ms")]
    assert p99.measured == pytest.approx(0.4) and p99.passed is True
    assert verdicts[("http1", "rss_mb")].passed is True
    h2 = verdicts[("h2c", "cpu_ratio")]
    assert h2.passed is None and "boom" in h2.note
    text = bench_proxy.render(rows, list(verdicts.values()), "header", 1000)
    assert "2.50x haproxy" in text
    assert "MISS" in text and "pass" in text
    assert "skipped: synchro-proxy not runnable: boom" in text


def test_every_path_and_target_is_consistent() -> None:
    names = {p.name for p in bench_proxy.PATHS}
    assert "direct" in names
    for p in bench_proxy.PATHS:
        assert p.cpu_baseline is None or p.cpu_baseline in names
    for t in bench_proxy.TARGETS:
        assert t.path in names and t.metric in bench_proxy.METRICS
        assert t.baseline is None or t.baseline in names


@pytest.mark.skipif(not shutil.which("haproxy"), reason="haproxy not installed")
@pytest.mark.parametrize("protocol", ["http1", "h2c"])
def test_haproxy_config_is_valid(tmp_path: Path, protocol: str) -> None:
    cfg = tmp_path / "h.cfg"
    cfg.write_text(bench_proxy.haproxy_config(18090, ("127.0.0.1", 18080), protocol))
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed")
def test_nginx_config_is_valid(tmp_path: Path) -> None:
    (tmp_path / "nginx-tmp").mkdir()
    (tmp_path / "www").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(bench_proxy.nginx_config(tmp_path, 18080, 18081))
    done = subprocess.run(
        ["nginx", "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
