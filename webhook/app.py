"""FastAPI adapter of the webhook: `POST /mutate`, `GET /healthz`, `GET /readyz`.

`create_router(config)` is what the controller mounts; `create_app(config)` is
the stand-alone app, which answers `POST /mutate` before FastAPI's middleware
(`WebhookApp`). Errors become HTTP statuses in one place (`_webhook_error`):
a body that is not an AdmissionReview gets 400 with a JSON error; a
well-formed review always gets an AdmissionReview back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter, Histogram
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

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


def _check_length(length: str | None) -> None:
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes")


async def _read_body(request: Request) -> bytes:
    _check_length(request.headers.get("content-length"))
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


async def _receive_body(scope: Scope, receive: Receive) -> bytes:
    """`_read_body` on bare ASGI messages."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            _check_length(value.decode("latin-1"))
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client disconnected before the end of the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
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


_DECISIONS = ("injected", "skipped", "ignored", "denied", "error")
# Bound once: labels() takes a lock and builds a key on every call.
_REVIEWS_BY_DECISION = {decision: REVIEWS.labels(decision) for decision in _DECISIONS}


def _reviewer(config: ConfigSource) -> Callable[[bytes], bytes]:
    """The body of an AdmissionReview in, the body of the answer out; WebhookError
    for a body that is not an AdmissionReview."""
    current = config if callable(config) else (lambda: config)

    def review_body(body: bytes) -> bytes:
        review = _parse_review(body)
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
        counter = _REVIEWS_BY_DECISION.get(decision)
        (counter if counter is not None else REVIEWS.labels(decision)).inc()
        if decision in ("denied", "error"):
            log.info(
                "denied %s/%s: %s",
                review.request.namespace,
                review.request.name or "<generated>",
                detail,
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: %s", decision, review.request.uid, detail)
        return AdmissionReviewOut(response=response).to_json()

    return review_body


def create_router(config: ConfigSource) -> APIRouter:
    """The webhook's routes; `config` may be a callable so the controller can reload it."""
    current = config if callable(config) else (lambda: config)
    review_body = _reviewer(config)
    router = APIRouter()

    async def mutate(request: Request) -> Response:
        body = review_body(await _read_body(request))
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


class WebhookApp(FastAPI):
    """FastAPI, except that `POST /mutate` is answered as a bare ASGI endpoint.

    FastAPI's middleware stack (exception, body-limit and telemetry
    middleware, router lookup, Request and Response objects) cost about
    40 us per review, as much as deciding the review; /mutate needs none of
    it. Errors get the same JSON answers as through the stack.
    """

    def __init__(self, config: ConfigSource, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._review_body = _reviewer(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/mutate" and scope["method"] == "POST":
            await self._mutate(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _mutate(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = self._review_body(await _receive_body(scope, receive))
        except Exception as exc:
            if not isinstance(exc, WebhookError):
                log.exception("unexpected error answering %s", scope["path"])
            await _webhook_error(Request(scope), exc)(scope, receive, send)
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(config: ConfigSource) -> FastAPI:
    app = WebhookApp(
        config, title="synchro webhook", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.include_router(create_router(config))
    install_error_handlers(app)
    return app
