"""`sudo make demo`: the shop on the local mesh, with numbers from real traffic.

Brings the mesh up (`synchro up examples/shop`), drives the frontend from
inside its Pod, reads every proxy's /metrics, and prints what the mesh did:
the canary split, retries hiding a flaky replica, mTLS on every edge, and a
call the AuthorizationPolicy refuses. The mesh stays up for exploring.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
SHOP = ROOT / "examples" / "shop"


def run(
    argv: list[str], *, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, text=True, capture_output=True, check=check, timeout=timeout)


def sh_exec(pod: str, *cmd: str, check: bool = True, timeout: float = 300) -> str:
    return run(["synchro", "exec", pod, "--", *cmd], check=check, timeout=timeout).stdout


def pods() -> list[str]:
    out = run(["synchro", "status", "--pods", "-o", "json"], check=False)
    if out.returncode == 0 and out.stdout.strip().startswith("["):
        return [f"{p['namespace']}/{p['name']}" for p in json.loads(out.stdout)]
    return [
        "shop/frontend-0",
        "shop/catalog-v1-0",
        "shop/catalog-v1-1",
        "shop/catalog-v2-0",
        "shop/ratings-0",
        "shop/ratings-flaky-0",
        "shop/ratings-slow-0",
        "shop/payments-0",
    ]


def scrape(pod: str) -> list[tuple[str, dict[str, str], float]]:
    text = sh_exec(pod, "curl", "-s", "-m", "5", "http://127.0.0.1:15020/metrics", check=False)
    samples = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "synchro_requests_total":
                samples.append((pod, dict(s.labels), s.value))
    return samples


def pct(ok: float, total: float) -> str:
    return f"{100.0 * ok / total:5.1f}%" if total else "   - "


def summarise(samples: list[tuple[str, dict[str, str], float]]) -> None:
    seen_by_caller: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    seen_by_pod: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for pod, labels, value in samples:
        code = labels.get("response_code", "")
        grpc_status = labels.get("grpc_status", "")
        ok = value if (code and not code.startswith("5") and grpc_status in ("", "0")) else 0.0
        service = labels.get("destination_service", "") or "?"
        if labels.get("reporter") == "source":
            seen_by_caller[service][0] += ok
            seen_by_caller[service][1] += value
        else:
            seen_by_pod[pod][0] += ok
            seen_by_pod[pod][1] += value
            principal = labels.get("source_principal", "")
            caller = labels.get("source_workload") or principal.rsplit("/sa/", 1)[-1] or "unknown"
            edge = (caller, pod.split("/")[-1])
            edges[edge].add(labels.get("connection_security_policy", "none"))
    print("\nSuccess as callers see it (after the mesh's retries) and as each Pod answered:")
    print(f"  {'service':38} {'requests':>8} {'success':>8}")
    for service, (ok, total) in sorted(seen_by_caller.items()):
        print(f"  {service:38} {int(total):8d} {pct(ok, total):>8}")
    for pod, (ok, total) in sorted(seen_by_pod.items()):
        print(f"  {'  pod ' + pod:38} {int(total):8d} {pct(ok, total):>8}")
    print("\nmTLS on every edge (as the receiving proxy saw it):")
    for (src, dst), policies in sorted(edges.items()):
        print(f"  {src:>20} -> {dst:20} {', '.join(sorted(policies))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)

    print("== synchro up examples/shop")
    up = subprocess.run(["synchro", "up", str(SHOP)], text=True, timeout=600)
    if up.returncode != 0:
        print(
            "synchro up failed; see the message above (synchro logs POD for details)",
            file=sys.stderr,
        )
        return up.returncode

    print(f"\n== driving {args.requests} checkouts through frontend (inside its Pod)")
    load = json.loads(
        sh_exec(
            "shop/frontend-0",
            sys.executable,
            "-m",
            "examples.load",
            "--requests",
            str(args.requests),
            "--concurrency",
            str(args.concurrency),
        )
    )
    print(
        f"  {load['requests']} checkouts in {load['seconds']} s ({load['requests_per_second']}/s)"
    )
    versions: dict[str, int] = load["catalog_versions"]
    total = sum(versions.values()) or 1
    split = ", ".join(f"{v} {100 * n / total:.1f}%" for v, n in sorted(versions.items()))
    print(f"  catalog canary split (HTTPRoute 90/10): {split}")
    print(f"  ratings answers seen by frontend: {load['ratings_status']}")
    print(f"  payments (gRPC) answers: {load['payments_status']}")

    samples: list[tuple[str, dict[str, str], float]] = []
    for pod in pods():
        samples.extend(scrape(pod))
    summarise(samples)

    print("\n== a caller the AuthorizationPolicy does not allow: catalog -> payments")
    denied = sh_exec("shop/catalog-v1-0", sys.executable, "-m", "examples.pay", check=False)
    print(f"  {denied.strip() or 'no answer'}")

    print(
        "\nThe mesh is still up. Next:\n"
        "  synchro status                      proxies and their config versions\n"
        "  synchro top                         live golden metrics per service\n"
        "  synchro exec shop/frontend-0 -- curl -s http://catalog.shop/\n"
        "  synchro down                        stop and remove everything"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
