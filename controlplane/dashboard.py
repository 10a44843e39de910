"""The controller's web dashboard, on the metrics listener (:15014).

| path | what |
|---|---|
| `GET /` | one self-contained page: the service graph (SVG), golden metrics per service, the proxies' sync and certificate state; it polls the JSON below every 2 s |
| `GET /api/graph` | `{ready, window_seconds, nodes: [{id, kind, namespace, name}], edges: [{source, destination, service, rps, success_rate, p50_ms, p99_ms, requests}]}` |
| `GET /api/services` | `{ready, window_seconds, services: [{namespace, name, rps, success_rate, p50_ms, p99_ms, requests}]}` |
| `GET /api/proxies` | `{generation, proxies: [...]}`: GET /v1/proxies' rows plus `certificate_expiry`, `scraped`, `scrape_error` |

The page carries the graph it was rendered with in
`<script type="application/json" id="graph-data">` (kept current by the page's
script), so a test or a curious user can read it from the DOM. No external
resources: clusters often have no internet, and neither does CI.

`json_router(view)` is the same JSON without the page, for the controller API
(`/v1/golden/...`), which `synchro top` reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

from controlplane import metrics
from controlplane.scrape import (
    GoldenView,
    PrometheusSource,
    ProxyScraper,
    Target,
    controller_targets,
)
from proxy import ports

if TYPE_CHECKING:
    from controlplane.server import Controller

PAGE = Path(__file__).with_name("dashboard.html")
NO_STORE = {"cache-control": "no-store"}


async def graph_data(view: GoldenView) -> dict[str, Any]:
    g = await view.golden()
    if g is None:
        nodes = [
            {"id": f"{p['namespace']}/{p['workload']}", "kind": "workload", **_names(p)}
            for p in view.proxies()
            if p.get("namespace") and p.get("workload")
        ]
        unique = {n["id"]: n for n in nodes}
        return {
            "ready": False,
            "window_seconds": None,
            "nodes": [unique[k] for k in sorted(unique)],
            "edges": [],
        }
    return {"ready": True, **g.graph_json()}


def _names(p: dict[str, Any]) -> dict[str, str]:
    return {"namespace": str(p["namespace"]), "name": str(p["workload"])}


async def services_data(view: GoldenView) -> dict[str, Any]:
    g = await view.golden()
    if g is None:
        return {"ready": False, "window_seconds": None, "services": []}
    return {"ready": True, **g.services_json()}


def proxies_data(view: GoldenView) -> dict[str, Any]:
    generation = view.controller.generation if view.controller is not None else None
    return {"generation": generation, "now": time.time(), "proxies": view.proxies()}


def embed(data: Any) -> str:
    """JSON safe inside a <script> element: no `</script>` or `<!--` can form."""
    return (
        json.dumps(data, separators=(",", ":"))
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )


def render_page(graph: dict[str, Any]) -> str:
    return PAGE.read_text(encoding="utf-8").replace("{{GRAPH_JSON}}", embed(graph))


def json_router(view: GoldenView) -> APIRouter:
    r = APIRouter()

    @r.get("/graph")
    async def graph() -> JSONResponse:
        return JSONResponse(await graph_data(view), headers=NO_STORE)

    @r.get("/services")
    async def services() -> JSONResponse:
        return JSONResponse(await services_data(view), headers=NO_STORE)

    @r.get("/proxies")
    async def proxies() -> JSONResponse:
        return JSONResponse(proxies_data(view), headers=NO_STORE)

    return r


def router(view: GoldenView) -> APIRouter:
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(render_page(await graph_data(view)), headers=NO_STORE)

    r.include_router(json_router(view), prefix="/api")
    return r


# --- wiring into synchro-controller ------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    in_cluster = "KUBERNETES_SERVICE_HOST" in os.environ
    group = parser.add_argument_group("metrics and dashboard")
    group.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=f"0.0.0.0:{ports.CONTROLLER_METRICS_PORT}" if in_cluster else None,
        help="HTTP listener of /metrics (the controller's own) and the dashboard "
        f"(default 0.0.0.0:{ports.CONTROLLER_METRICS_PORT} in a cluster, else off)",
    )
    group.add_argument(
        "--scrape-target",
        action="append",
        default=[],
        metavar="URL",
        help="also scrape this /metrics URL for the dashboard (repeatable); "
        "the proxies subscribed to the controller are scraped anyway",
    )
    group.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="read the proxies' metrics from this Prometheus instead of scraping them",
    )
    group.add_argument(
        "--scrape-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between scrapes while the dashboard or `synchro top` is open (default 2)",
    )
    group.add_argument(
        "--metrics-window",
        type=float,
        default=None,
        metavar="SECONDS",
        help="rates are over this many seconds (default 10 when scraping, 60 with Prometheus)",
    )


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:15014")
    return host.strip("[]") or "0.0.0.0", int(port)


def _controller_of(servers: Sequence[Any]) -> tuple[Controller | None, FastAPI | None]:
    for s in servers:
        app = getattr(getattr(s, "config", None), "app", None)
        controller = getattr(getattr(app, "state", None), "controller", None)
        if isinstance(app, FastAPI) and controller is not None:
            return controller, app
    return None, None


def build_view(args: argparse.Namespace, controller: Controller | None) -> GoldenView:
    if args.prometheus_url:
        return GoldenView(
            PrometheusSource(args.prometheus_url, window=args.metrics_window or 60.0), controller
        )
    static = [Target(url, url) for url in args.scrape_target]
    for t in static:
        if not t.url.startswith(("http://", "https://")):
            raise ValueError(f"--scrape-target {t.url!r}: expected http(s)://host:port/metrics")

    def targets() -> list[Target]:
        found = controller_targets(controller) if controller is not None else []
        return [*found, *static]

    interval = args.scrape_interval
    window = args.metrics_window or max(10.0, interval * 2)
    return GoldenView(
        ProxyScraper(
            targets, interval=interval, window=window, timeout=min(max(interval, 2.0), 5.0)
        ),
        controller,
    )


def create_app(view: GoldenView) -> FastAPI:
    """/metrics (the controller's own) and the dashboard, scraping while it runs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(view.source.run(), name="dashboard-scraper")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await view.source.aclose()

    app = FastAPI(
        title="synchro-controller metrics", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.include_router(metrics.router)
    app.include_router(router(view))
    return app


def build_servers(
    args: argparse.Namespace, servers: Sequence[Any], server_cls: type | None = None
) -> list[Any]:
    """The metrics listener for controlplane.main, when --metrics-listen is set.
    The controller API among `servers` (if any) also gets /v1/golden/*."""
    if not getattr(args, "metrics_listen", None):
        return []
    import uvicorn

    host, port = _listen(args.metrics_listen)
    controller, api_app = _controller_of(servers)
    view = build_view(args, controller)
    if api_app is not None:
        api_app.include_router(json_router(view), prefix="/v1/golden")
    config = uvicorn.Config(
        create_app(view),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    base: Any = server_cls or uvicorn.Server
    return [base(config)]
