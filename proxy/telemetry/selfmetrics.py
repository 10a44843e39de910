"""The proxy's own health as metrics: CPU, memory, descriptors, connections and
event-loop lag, read when scraped (a custom collector) rather than updated on
the data path."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import resource
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """Current RSS (the peak from getrusage where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class LagWindow:
    """Event-loop lag samples (seconds late) and the worst of the recent ones. Pure."""

    def __init__(self, size: int = 120) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=size)

    def observe(self, scheduled: float, woke: float) -> float:
        lag = max(0.0, woke - scheduled)
        self.samples.append(lag)
        return lag

    @property
    def last(self) -> float:
        return self.samples[-1] if self.samples else 0.0

    @property
    def worst(self) -> float:
        return max(self.samples, default=0.0)


async def watch_loop_lag(window: LagWindow, interval: float = 0.5) -> None:
    """Sleeps `interval` and records how late the loop woke it up."""
    loop = asyncio.get_running_loop()
    while True:
        scheduled = loop.time() + interval
        await asyncio.sleep(interval)
        window.observe(scheduled, loop.time())


class SelfCollector(Collector):
    def __init__(
        self,
        lag: LagWindow,
        open_connections: Callable[[], int] | None = None,
        pid: int | None = None,
    ) -> None:
        self.lag = lag
        self.open_connections = open_connections
        self.pid = pid

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        times = os.times()
        yield CounterMetricFamily(
            "synchro_process_cpu_seconds",
            "CPU time of the proxy process (user and system)",
            value=times.user + times.system,
        )
        yield GaugeMetricFamily(
            "synchro_process_resident_memory_bytes",
            "Resident memory of the proxy process",
            value=resident_bytes(),
        )
        fds = open_fds()
        if fds is not None:
            yield GaugeMetricFamily(
                "synchro_process_open_fds", "Open file descriptors of the proxy", value=fds
            )
        if self.open_connections is not None:
            count = 0
            with contextlib.suppress(Exception):  # a scrape must not fail on a racing set
                count = self.open_connections()
            yield GaugeMetricFamily(
                "synchro_open_connections",
                "Downstream connections the proxy is serving",
                value=count,
            )
        yield GaugeMetricFamily(
            "synchro_event_loop_lag_seconds",
            "How late the event loop ran the last timer",
            value=self.lag.last,
        )
        yield GaugeMetricFamily(
            "synchro_event_loop_lag_max_seconds",
            "The worst event loop lag of the last minute",
            value=self.lag.worst,
        )
