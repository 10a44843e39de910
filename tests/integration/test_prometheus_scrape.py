"""A real Prometheus (Debian's `prometheus` package) scrapes a real synchro-proxy's
/metrics at a 1 s interval; PromQL through its HTTP API finds the synchro_* series."""

from __future__ import annotations

import json
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from tests.integration.prometheus_support import PROMETHEUS, run_prometheus
from tests.integration.proxy_harness import BackgroundServer, echo_handler, free_port, run_proxy

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is missing (apt-get install prometheus)",
)
WAIT = 40.0


@contextmanager
def prometheus(target: str) -> Iterator[str]:
    """Prometheus on a free loopback port with temp config and storage; its base URL."""
    with (
        tempfile.TemporaryDirectory(prefix="synchro-prom-") as tmp,
        run_prometheus([target], Path(tmp), port=free_port()) as running,
    ):
        yield running.url


def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_query(base: str, promql: str) -> list[dict[str, Any]]:
    """The first non-empty answer, polling until WAIT seconds have passed."""
    deadline = time.monotonic() + WAIT
    last: object = None
    while time.monotonic() < deadline:
        with suppress(OSError):
            result = query(base, promql)
            if result:
                return result
            last = "empty result"
        time.sleep(0.5)
    raise AssertionError(f"{promql!r}: nothing after {WAIT}s ({last})")


def test_prometheus_scrapes_the_proxy() -> None:
    with (
        BackgroundServer(echo_handler) as app,
        run_proxy(static_destination=app.address) as proxy,
        prometheus(f"{proxy.status[0]}:{proxy.status[1]}") as base,
    ):
        (up,) = wait_query(base, 'up{job="synchro-proxies"} == 1')
        assert up["metric"]["instance"] == f"127.0.0.1:{proxy.status[1]}"
        (cpu,) = wait_query(base, "synchro_process_cpu_seconds_total")
        assert float(cpu["value"][1]) > 0
        names = {
            r["metric"]["__name__"]
            for r in wait_query(base, 'count by (__name__) ({__name__=~"synchro_.+"})')
        }
        assert {
            "synchro_process_resident_memory_bytes",
            "synchro_open_connections",
            "synchro_event_loop_lag_seconds",
            "synchro_spans_dropped_total",
        } <= names
        # The target's own health as Prometheus sees it: the scrape parsed cleanly.
        (samples,) = wait_query(base, 'scrape_samples_scraped{job="synchro-proxies"}')
        assert float(samples["value"][1]) >= len(names)
