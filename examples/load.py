"""A bounded load generator for the demo: N requests at concurrency C against
the frontend, summarised as JSON (runs inside a Pod via `synchro exec`)."""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def one(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"error": str(exc)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080/checkout")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    n = max(1, min(args.requests, 100_000))
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, min(args.concurrency, 64))) as pool:
        results = list(pool.map(one, [args.url] * n))
    elapsed = time.monotonic() - start
    versions: Counter[str] = Counter()
    ratings: Counter[str] = Counter()
    payments: Counter[str] = Counter()
    frontend_errors = 0
    for r in results:
        if "error" in r:
            frontend_errors += 1
            continue
        versions[str(r.get("catalog", {}).get("version", "error"))] += 1
        ratings[str(r.get("ratings", {}).get("status"))] += 1
        if "payments" in r:
            payments[str(r["payments"].get("status"))] += 1
    print(
        json.dumps(
            {
                "requests": n,
                "seconds": round(elapsed, 2),
                "requests_per_second": round(n / elapsed, 1),
                "frontend_errors": frontend_errors,
                "catalog_versions": dict(versions),
                "ratings_status": dict(ratings),
                "payments_status": dict(payments),
            }
        )
    )


if __name__ == "__main__":
    main()
