"""Admission webhook benchmark: AdmissionReviews over HTTPS against a local controller.

    python3 bench/webhook.py [--requests 2000] [--concurrency 50] [--url URL --ca FILE] [--json]
                             [--nice N]

Starts `synchro-controller --webhook-listen 127.0.0.1:<free port>` with a fresh
self-signed CA (unless `--url` points at a running one), then sends
`--requests` AdmissionReviews (a Pod from a Deployment with named-port probes,
so the full plan/patch path runs) from `--concurrency` keep-alive HTTPS
connections, each with one request in flight (closed loop). Latency is per
request, from writing the request to reading the whole response; every
response is checked to be an allowed AdmissionReview for its uid with a patch,
after the timed run (the requests are rendered before it), so that the
client's own CPU time delays no response. The connections are opened (TLS
handshakes) and warmed up with 200 reviews before the clock and the CPU
counters start, as an API server's connections to its webhook are.

On two or more CPUs the controller is pinned to the last CPU and the client to
the others, so that the two do not share a core. The client is a small raw
HTTP/1.1-over-TLS asyncio client rather than httpx so that its own cost stays
far below the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import ssl
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as `python3 bench/webhook.py`: make the repository root importable.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import (
    Proc,
    Processes,
    free_port,
    host_busy_seconds,
    percentile,
    plan_placement,
    tree_cpu_seconds,
    wait_for_port,
)
from controlplane import webhook_tls

WARMUP = 200


def sample_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "frontend-7d9c6b5f4-",
            "namespace": "shop",
            "labels": {"app": "frontend", "pod-template-hash": "7d9c6b5f4"},
            "annotations": {"synchro.dev/opaque-ports": "5432"},
        },
        "spec": {
            "serviceAccountName": "frontend",
            "containers": [
                {
                    "name": "frontend",
                    "image": "synchro-examples:dev",
                    "command": ["python3", "-m", "examples.apps.frontend"],
                    "env": [{"name": "PORT", "value": "8080"}],
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                    "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10},
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                }
            ],
        },
    }


def review_body(uid: str) -> bytes:
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": sample_pod(),
            "dryRun": False,
        },
    }
    return json.dumps(review).encode()


class BenchError(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if status != b"200" or length is None:
        raise BenchError(f"unexpected response: {head[:200]!r}")
    return await reader.readexactly(length)


def _check(body: bytes, uid: str) -> None:
    response = json.loads(body)["response"]
    if response["uid"] != uid or not response["allowed"] or not response.get("patch"):
        raise BenchError(f"not an injecting AdmissionReview for {uid}: {body[:200]!r}")
    base64.b64decode(response["patch"], validate=True)


def render_requests(host: str, port: int, uids: list[str]) -> list[bytes]:
    """One HTTP/1.1 request per uid; the JSON is rendered once and the uid spliced in."""
    marker = "@@uid@@"
    template = review_body(marker)
    out = []
    for uid in uids:
        body = template.replace(marker.encode(), json.dumps(uid).strip('"').encode())
        head = (
            f"POST /mutate?timeout=10s HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _worker(
    connection: Connection, requests: list[bytes], latencies: list[float], answers: list[bytes]
) -> None:
    reader, writer = connection
    for request in requests:
        started = time.perf_counter()
        writer.write(request)
        answer = await _read_response(reader)
        latencies.append(time.perf_counter() - started)
        answers.append(answer)


async def run_load(
    connections: list[Connection], host: str, port: int, requests: int, prefix: str
) -> tuple[list[float], float, list[tuple[str, bytes]]]:
    """Latencies, wall time, and (uid, answer) pairs for `_check` after the clock stops."""
    uids = [f"{prefix}-{i}" for i in range(requests)]
    shares = [uids[i :: len(connections)] for i in range(len(connections))]
    rendered = [render_requests(host, port, share) for share in shares]
    latencies: list[float] = []
    answers: list[list[bytes]] = [[] for _ in shares]
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _worker(conn, reqs, latencies, out)
            for conn, reqs, out in zip(connections, rendered, answers, strict=True)
        )
    )
    seconds = time.perf_counter() - started
    pairs = [
        pair
        for share, out in zip(shares, answers, strict=True)
        for pair in zip(share, out, strict=True)
    ]
    return latencies, seconds, pairs


@dataclass(frozen=True)
class Measured:
    latencies: list[float]
    seconds: float
    server_cpu_s: float
    client_cpu_s: float
    other_cpus_busy: float  # CPUs that other processes kept busy during the timed run


async def measure(
    host: str, port: int, ca: Path, requests: int, concurrency: int, server_pid: int | None
) -> Measured:
    """Open the keep-alive connections, warm up over them, then time `requests` reviews.

    The TLS handshakes happen before the clock and the CPU counters start: the
    API server keeps its connections to a webhook, so a handshake is rare in
    steady state, and 50 of them (about 1 ms of server CPU each) would
    otherwise land in the first requests' latency and in CPU per review.
    """
    context = ssl.create_default_context(cafile=str(ca))
    connections: list[Connection] = []
    try:
        for _ in range(concurrency):
            connections.append(
                await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
            )
        _, _, warm = await run_load(connections, host, port, WARMUP, "warmup")
        server_before = tree_cpu_seconds([server_pid]) if server_pid else 0.0
        client_before = time.process_time()
        host_before = host_busy_seconds()
        latencies, seconds, answers = await run_load(connections, host, port, requests, "review")
        host_busy = host_busy_seconds() - host_before
        client_cpu_s = time.process_time() - client_before
        server_cpu_s = (tree_cpu_seconds([server_pid]) if server_pid else 0.0) - server_before
    finally:
        for _, writer in connections:
            writer.close()
    for uid, answer in (*warm, *answers):
        _check(answer, uid)
    # With --url the server's CPU time is unknown and counts as "other".
    other = max(0.0, host_busy - server_cpu_s - client_cpu_s) / seconds
    return Measured(latencies, seconds, server_cpu_s, client_cpu_s, other)


@dataclass(frozen=True)
class Result:
    requests: int
    concurrency: int
    seconds: float
    reviews_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu: str
    client_cpu: str
    server_cpu_us_per_review: float  # 0 for --url
    client_cpu_us_per_review: float
    other_cpus_busy: float  # above ~0.1 the latency figures are disturbed by other work


def start_controller(
    procs: Processes, workdir: Path, cpus: frozenset[int]
) -> tuple[Proc, int, Path]:
    serving = webhook_tls.self_signed(["127.0.0.1", "localhost"], dt.datetime.now(dt.UTC))
    ca, cert, key = workdir / "ca.crt", workdir / "tls.crt", workdir / "tls.key"
    ca.write_bytes(serving.ca_pem)
    cert.write_bytes(serving.cert_pem)
    key.write_bytes(serving.key_pem)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    proc = procs.start(
        "controller",
        [
            sys.executable,
            "-m",
            "controlplane.main",
            "--webhook-listen",
            f"127.0.0.1:{port}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--log-level",
            "warning",
        ],
        cpus=cpus,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    wait_for_port(("127.0.0.1", port), proc=proc, timeout_s=30)
    return proc, port, ca


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--url", help="https://HOST:PORT of a running webhook (needs --ca)")
    parser.add_argument("--ca", type=Path, help="CA that signed the running webhook's certificate")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for the bench and the controller it starts, e.g. -10 (root) so that "
        "unrelated work on the host disturbs the latency figures less",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be positive")
    if args.url and not args.ca:
        parser.error("--url needs --ca")

    if args.nice:
        try:
            # the controller inherits it
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as exc:
            print(f"bench/webhook.py: cannot set niceness {args.nice}: {exc}", file=sys.stderr)
    placement = plan_placement(sorted(os.sched_getaffinity(0)))
    controller: Proc | None = None
    with tempfile.TemporaryDirectory(prefix="bench-webhook-") as tmp, Processes(Path(tmp)) as procs:
        if args.url:
            host, _, port_text = args.url.removeprefix("https://").rpartition(":")
            port, ca = int(port_text), args.ca
            server_cpu = "external"
        else:
            host = "127.0.0.1"
            controller, port, ca = start_controller(procs, Path(tmp), placement.proxy)
            server_cpu = ",".join(map(str, sorted(placement.proxy))) or "any"
        if placement.load:
            os.sched_setaffinity(0, placement.load)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        try:
            measured = asyncio.run(
                measure(
                    host,
                    port,
                    ca,
                    args.requests,
                    args.concurrency,
                    controller.pid if controller else None,
                )
            )
        except (BenchError, OSError, asyncio.IncompleteReadError) as exc:
            print(f"bench/webhook.py: {exc}", file=sys.stderr)
            if controller is not None:
                print(controller.log_tail(), file=sys.stderr)
            return 1
    latencies, seconds = measured.latencies, measured.seconds
    result = Result(
        requests=len(latencies),
        concurrency=args.concurrency,
        seconds=round(seconds, 3),
        reviews_per_second=round(len(latencies) / seconds, 1),
        p50_ms=round(percentile(latencies, 50) * 1000, 2),
        p99_ms=round(percentile(latencies, 99) * 1000, 2),
        max_ms=round(max(latencies) * 1000, 2),
        server_cpu=server_cpu,
        client_cpu=",".join(map(str, sorted(placement.load))) or "any",
        server_cpu_us_per_review=round(measured.server_cpu_s / len(latencies) * 1e6, 1),
        client_cpu_us_per_review=round(measured.client_cpu_s / len(latencies) * 1e6, 1),
        other_cpus_busy=round(measured.other_cpus_busy, 2),
    )
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(
            f"{result.requests} AdmissionReviews over HTTPS, concurrency {result.concurrency}: "
            f"{result.reviews_per_second} reviews/s, p50 {result.p50_ms} ms, "
            f"p99 {result.p99_ms} ms, max {result.max_ms} ms "
            f"(server on CPU {result.server_cpu}: {result.server_cpu_us_per_review} us CPU/review; "
            f"client on CPU {result.client_cpu}: {result.client_cpu_us_per_review} us CPU/review; "
            f"other processes kept {result.other_cpus_busy} CPUs busy)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
