"""frontend: calls catalog, ratings and payments and reports what each said."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler

import grpc

from examples.apps.common import serve

CATALOG = os.environ.get("CATALOG_URL", "http://catalog.shop/")
RATINGS = os.environ.get("RATINGS_URL", "http://ratings.shop/")
PAYMENTS = os.environ.get("PAYMENTS_ADDR", "payments.shop:50051")


def _get(url: str, headers: dict[str, str]) -> dict[str, object]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return {"status": resp.status, **json.loads(resp.read() or b"{}")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code}
    except OSError as exc:
        return {"status": 0, "error": str(exc)}


def _charge(amount: int) -> dict[str, object]:
    try:
        with grpc.insecure_channel(PAYMENTS) as channel:
            call = channel.unary_unary("/shop.Payments/Charge")
            reply = call(json.dumps({"amount": amount}).encode(), timeout=5)
            return {"status": "OK", **json.loads(reply)}
    except grpc.RpcError as exc:
        return {"status": exc.code().name, "error": exc.details()}


def handle(req: BaseHTTPRequestHandler) -> tuple[int, dict[str, object]]:
    # Apps forward the trace and request id headers; the mesh does the rest.
    forward = {
        k: v
        for k, v in req.headers.items()
        if k.lower() in {"x-request-id", "traceparent", "tracestate", "b3"}
    }
    body: dict[str, object] = {
        "catalog": _get(CATALOG, forward),
        "ratings": _get(RATINGS, forward),
    }
    if req.path.startswith("/checkout"):
        body["payments"] = _charge(42)
    return 200, body


def main() -> None:
    serve("frontend", handle)


if __name__ == "__main__":
    main()
