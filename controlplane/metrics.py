"""The controller's own metrics, served on :15014/metrics.

Other modules import this one and count what they do::

    from controlplane import metrics

    metrics.PUSHES.inc()                              # a config version sent to a proxy
    metrics.PUSH_RESPONSES.labels("ack").inc()        # or "nack"
    with metrics.COMPILE_SECONDS.time(): compile(...)
    metrics.CERTIFICATES.labels("issued").inc()       # or "rejected"
    metrics.WEBHOOK_SECONDS.labels("injected").observe(seconds)  # "skipped" | "error"
    metrics.CONNECTED_PROXIES.set(n)

Label values are the small fixed sets named above, never pod names, so the
series count stays constant however large the mesh grows (the per-proxy view
is the push server's status API, not metrics).

`create_app()` is a FastAPI app serving them; `router` is the same route for
an app that serves more (the dashboard).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

REGISTRY = CollectorRegistry()
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

PUSHES = Counter("synchro_controller_pushes", "Config versions sent to proxies", registry=REGISTRY)
PUSH_RESPONSES = Counter(
    "synchro_controller_push_responses",
    "Proxies' answers to pushed config: ack (applied) or nack (rejected)",
    ("result",),
    registry=REGISTRY,
)
COMPILE_SECONDS = Histogram(
    "synchro_controller_compile_duration_seconds",
    "Time to compile cluster resources into proxy configs",
    buckets=_SECONDS,
    registry=REGISTRY,
)
CERTIFICATES = Counter(
    "synchro_controller_certificates",
    "Workload certificate requests: issued or rejected",
    ("result",),
    registry=REGISTRY,
)
WEBHOOK_SECONDS = Histogram(
    "synchro_controller_webhook_duration_seconds",
    "Admission webhook latency by outcome: injected, skipped or error",
    ("result",),
    buckets=_SECONDS,
    registry=REGISTRY,
)
CONNECTED_PROXIES = Gauge(
    "synchro_controller_connected_proxies",
    "Proxies currently subscribed for config",
    registry=REGISTRY,
)

# Every labelled series exists from the start, at zero: rate() and absence
# alerts then work before the first event.
for _result in ("ack", "nack"):
    PUSH_RESPONSES.labels(_result)
for _result in ("issued", "rejected"):
    CERTIFICATES.labels(_result)
for _result in ("injected", "skipped", "error"):
    WEBHOOK_SECONDS.labels(_result)


def exposition(accept: str = "", registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """Prometheus text, or OpenMetrics when the scraper's Accept asks for it."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics_route(request: Request) -> Response:
    body, content_type = exposition(request.headers.get("accept", ""))
    return Response(content=body, media_type=content_type)


def create_app() -> FastAPI:
    app = FastAPI(title="synchro-controller metrics", docs_url=None, redoc_url=None)
    app.include_router(router)
    return app
