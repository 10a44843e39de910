"""FastAPI adapter of the webhook: `POST /mutate`, `GET /healthz`, `GET /readyz`.

`create_router(config)` is what the controller mounts; `create_app(config)` is
the stand-alone app. Errors become HTTP statuses in one place
(`_webhook_error`): a body that is not an AdmissionReview gets 400 with a
JSON error; a well-formed review always gets an AdmissionReview back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pydantic
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter, Histogram
from starlette.requests import ClientDisconnect

from webhook.config import InjectorConfig
from webhook.review import AdmissionReviewIn, AdmissionReviewOut, admit, internal_error

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024  # the API server's objects stay well below this

REVIEWS = Counter(
    "synchro_webhook_reviews_total",
    "AdmissionReviews answered, by decision",
    ["decision"],
)
REVIEW_SECONDS = Histogram(
    "synchro_webhook_review_duration_seconds",
    "Time to decide one AdmissionReview",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)

ConfigSource = InjectorConfig | Callable[[], InjectorConfig]


class WebhookError(Exception):
    """A request the webhook cannot read; becomes an HTTP error status."""

    status_code = 400


class BadReview(WebhookError):
    status_code = 400


class BodyTooLarge(WebhookError):
    status_code = 413


class ClientGone(WebhookError):
    """The caller hung up before sending the whole body; nobody reads the answer."""

    status_code = 400


def _webhook_error(_request: Request, exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, WebhookError) else 500
    return JSONResponse({"error": str(exc)}, status_code=status)


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("client disconnected before the end of the body") from None
    return b"".join(chunks)


def _parse_review(body: bytes) -> AdmissionReviewIn:
    # pydantic parses the JSON itself (in Rust): a third of the cost of
    # json.loads followed by validation.
    try:
        return AdmissionReviewIn.model_validate_json(body)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise BadReview(f"request body is not JSON: {errors[0]['msg']}") from None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
        )
        raise BadReview(f"not an admission.k8s.io/v1 AdmissionReview: {problems}") from None


def create_router(config: ConfigSource) -> APIRouter:
    """The webhook's routes; `config` may be a callable so the controller can reload it."""
    current = config if callable(config) else (lambda: config)
    router = APIRouter()

    async def mutate(request: Request) -> Response:
        review = _parse_review(await _read_body(request))
        started = time.perf_counter()
        try:
            response, outcome = admit(review.request, current())
        except Exception:
            # Fail closed with an answer the API server can show, and keep serving.
            log.exception("injector failed on request %s", review.request.uid)
            response = internal_error(review.request.uid, "synchro injector internal error")
            decision, detail = "error", "internal error"
        else:
            decision, detail = outcome.decision, outcome.detail
        REVIEW_SECONDS.observe(time.perf_counter() - started)
        REVIEWS.labels(decision).inc()
        if decision in ("denied", "error"):
            log.info(
                "denied %s/%s: %s",
                review.request.namespace,
                review.request.name or "<generated>",
                detail,
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: %s", decision, review.request.uid, detail)
        body = AdmissionReviewOut(response=response).to_json()
        return Response(content=body, media_type="application/json")

    # A plain Starlette route: FastAPI's dependency machinery is not needed
    # for one raw-body endpoint and costs tens of microseconds per review.
    router.add_route("/mutate", mutate, methods=["POST"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> dict[str, str]:
        current()  # a config source that cannot produce a config is not ready
        return {"status": "ready"}

    return router


def install_error_handlers(app: FastAPI) -> None:
    """Map WebhookError (and anything unexpected) to JSON errors; the controller calls this too."""
    app.add_exception_handler(WebhookError, _webhook_error)
    app.add_exception_handler(Exception, _webhook_error)


def create_app(config: ConfigSource) -> FastAPI:
    app = FastAPI(title="synchro webhook", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_router(config))
    install_error_handlers(app)
    return app
