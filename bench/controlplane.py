"""Control-plane benchmark: 1,000 services x 10 endpoints, 200 subscribed proxies.

    python3 bench/controlplane.py [--services 1000] [--endpoints 10] [--clients 200] [--changes 20]

- writes a config directory (Services and their Pods as YAML, 10 services per file);
- compile time, measured in this process: validate + compile the shared part,
  then one proxy's config, then its JSON;
- starts the real `synchro-controller --config-dir DIR --api-listen` over HTTPS;
- 200 light clients in this process: each long-polls like a proxy, reads the
  (gzip) body without decoding it, and ACKs the version it got;
- 20 changes, each scaling one service (rewriting one file): from the file
  write to the last of the 200 ACKs, p50 and p99. This includes the FileSource's
  poll interval (<= 0.2 s) and the debounce;
- the controller's RSS (VmRSS now and VmHWM, the peak).
Targets (issue 4): all 200 ACKed <= 1 s p99; controller RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.controller_harness import ControllerProcess

NS = "bench"


def pods_for(svc: int, count: int, generation: int = 0) -> list[dict[str, Any]]:
    out = []
    for j in range(count):
        ip = f"10.{100 + svc // 250}.{svc % 250}.{10 + j + generation}"
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"svc-{svc}-{j}-{generation}",
                    "namespace": NS,
                    "labels": {"app": f"svc-{svc}", "version": "v1"},
                    "annotations": {"synchro.dev/status": "{}"},
                },
                "spec": {
                    "serviceAccountName": f"svc-{svc}",
                    "containers": [
                        {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}
                    ],
                },
                "status": {
                    "podIP": ip,
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
    return out


def service(svc: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{svc}", "namespace": NS},
        "spec": {
            "selector": {"app": f"svc-{svc}"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def write_group(
    directory: Path, group: int, per_file: int, endpoints: int, bump: dict[int, int]
) -> None:
    docs: list[dict[str, Any]] = []
    for svc in range(group * per_file, (group + 1) * per_file):
        docs.append(service(svc))
        docs.extend(pods_for(svc, endpoints, bump.get(svc, 0)))
    tmp = directory / f".group-{group:04d}.tmp"
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp.rename(directory / f"group-{group:04d}.yaml")  # atomic: the source never reads half a file


def compile_time(directory: Path) -> dict[str, float]:
    from controlplane import compiler
    from controlplane.sources.files import FileSource
    from controlplane.validation import build

    src = FileSource(directory)
    t0 = time.perf_counter()
    src.scan()
    t1 = time.perf_counter()
    resources, problems = build(src.documents())
    assert not problems, problems[:3]
    t2 = time.perf_counter()
    compiler.shared(resources)
    t3 = time.perf_counter()
    cfg = compiler.compile(resources, compiler.ProxyInfo(NS, "p", {"app": "svc-0"}, "svc-0"))
    t4 = time.perf_counter()
    body = compiler.render(resources, cfg)
    t5 = time.perf_counter()
    return {
        "parse_yaml_s": t1 - t0,
        "validate_s": t2 - t1,
        "compile_shared_s": t3 - t2,
        "compile_per_proxy_s": t4 - t3,
        "render_json_s": t5 - t4,
        "config_bytes": float(len(body)),
        "endpoints": float(sum(len(p.endpoints) for s in cfg.services for p in s.ports)),
    }


class LightClient:
    def __init__(self, i: int, url: str, http: httpx.AsyncClient) -> None:
        self.pod = f"client-{i}"
        self.url = url
        self.http = http
        self.version = ""
        self.acked_at: dict[str, float] = {}
        self.bytes = 0

    async def run(self) -> None:
        while True:
            try:
                async with self.http.stream(
                    "GET",
                    f"{self.url}/v1/config",
                    params={
                        "namespace": NS,
                        "pod": self.pod,
                        "version": self.version,
                        "wait": "30",
                        "label": f"app=client-{self.pod}",
                    },
                    headers={"accept-encoding": "gzip"},
                    timeout=60,
                ) as resp:
                    if resp.status_code == 304:
                        continue
                    async for chunk in resp.aiter_raw():  # light: not decoded, not parsed
                        self.bytes += len(chunk)
                    version = resp.headers["x-synchro-version"]
                await self.http.post(
                    f"{self.url}/v1/proxies/{NS}/{self.pod}/ack",
                    json={"version": version},
                    timeout=30,
                )
                self.version = version
                self.acked_at[version] = time.perf_counter()
            except httpx.HTTPError:
                await asyncio.sleep(0.1)


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


async def run_clients(
    ctl: ControllerProcess,
    n_clients: int,
    changes: int,
    directory: Path,
    per_file: int,
    endpoints: int,
) -> dict[str, Any]:
    # One small pool per client: httpcore's pool scans all its connections on
    # every request, so one pool of 400 connections would measure httpcore.
    https = [
        httpx.AsyncClient(verify=ctl.ssl, limits=httpx.Limits(max_connections=2))
        for _ in range(n_clients)
    ]
    try:
        clients = [LightClient(i, ctl.url, https[i]) for i in range(n_clients)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        t0 = time.perf_counter()
        while not all(c.version for c in clients):
            await asyncio.sleep(0.01)
        initial = time.perf_counter() - t0
        latencies = []
        bump: dict[int, int] = {}
        for k in range(changes):
            old = {c.pod: c.version for c in clients}
            svc = (k * 37) % (per_file * 100)
            bump[svc] = bump.get(svc, 0) + 1
            await asyncio.sleep(0.3)  # let the previous change settle (no overlap between samples)
            start = time.perf_counter()
            write_group(directory, svc // per_file, per_file, endpoints, bump)
            deadline = start + 30
            # Every client runs its own workload (labels), so each has its own version.
            while not all(c.version != old[c.pod] for c in clients):
                if time.perf_counter() > deadline:
                    late = sum(c.version == old[c.pod] for c in clients)
                    raise RuntimeError(f"change {k}: {late} clients not updated")
                await asyncio.sleep(0.002)
            latencies.append(max(c.acked_at[c.version] for c in clients) - start)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {
            "initial_all_acked_s": initial,
            "latencies": latencies,
            "bytes_per_client": clients[0].bytes,
        }
    finally:
        for h in https:
            await h.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--changes", type=int, default=20)
    args = ap.parse_args()
    per_file = 10
    work = Path(tempfile.mkdtemp(prefix="synchro-bench-cp-"))
    try:
        directory = work / "mesh"
        directory.mkdir()
        for g in range(args.services // per_file):
            write_group(directory, g, per_file, args.endpoints, {})
        ct = compile_time(directory)
        print(
            f"resources: {args.services} services x {args.endpoints} endpoints ({int(ct['endpoints'])} endpoints in a proxy config, {ct['config_bytes'] / 1e6:.1f} MB JSON)"
        )
        print(
            f"compile: parse YAML {ct['parse_yaml_s'] * 1000:.0f} ms, validate {ct['validate_s'] * 1000:.0f} ms, shared part {ct['compile_shared_s'] * 1000:.0f} ms, per proxy {ct['compile_per_proxy_s'] * 1000:.1f} ms, render JSON {ct['render_json_s'] * 1000:.0f} ms"
        )
        ctl = ControllerProcess(directory, work)
        ctl.start(timeout=120)
        try:
            assert ctl.process is not None
            res = asyncio.run(
                run_clients(ctl, args.clients, args.changes, directory, per_file, args.endpoints)
            )
            mem = rss_kb(ctl.process.pid)
        finally:
            ctl.stop()
        lat = sorted(res["latencies"])
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        print(
            f"subscribers: {args.clients} light clients; first config to all ACKed in {res['initial_all_acked_s']:.2f} s; {res['bytes_per_client'] / 1e3:.0f} kB received per client (gzip)"
        )
        print(
            f"change -> all {args.clients} ACKed over {len(lat)} changes: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms (target p99 <= 1000 ms)"
        )
        print(
            f"controller RSS: {mem.get('VmRSS', 0) / 1024:.0f} MB now, {mem.get('VmHWM', 0) / 1024:.0f} MB peak (target <= 300 MB)"
        )
        builds = [ln for ln in ctl.log().splitlines() if "built in" in ln]
        if builds:
            print(f"controller's last rebuild: {builds[-1].split('built in ')[-1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
