"""A real Prometheus server (Debian's `prometheus`) for tests: scrape config,
process, log and cleanup in one place, on loopback or inside a network
namespace."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROMETHEUS = shutil.which("prometheus")


@dataclass(frozen=True)
class RunningPrometheus:
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check_alive(self) -> None:
        assert self.process.poll() is None, self.log.read_text()[-2000:]


@contextmanager
def run_prometheus(
    targets: Sequence[str], workdir: Path, *, port: int, netns: str | None = None
) -> Iterator[RunningPrometheus]:
    """Prometheus scraping `targets` every second, listening on 127.0.0.1:`port`
    (of `netns` when given), config and storage under `workdir`; always stopped."""
    assert PROMETHEUS is not None, "apt-get install prometheus"
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: synchro-proxies\n"
        f"    static_configs: [{{targets: {json.dumps(list(targets))}}}]\n"
    )
    log_path = workdir / "prometheus.log"
    prefix = ["ip", "netns", "exec", netns] if netns else []
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *prefix,
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield RunningPrometheus(process, log_path, port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
