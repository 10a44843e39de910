"""AdmissionReview `admission.k8s.io/v1` at the edge, and the pure admission decision.

`admit(request, config)` maps one AdmissionRequest to its AdmissionResponse;
it never raises for anything a Pod can contain (bad annotations become denials
that name the annotation, the value and the accepted form).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from webhook.config import InjectorConfig
from webhook.inject import InjectionError, Skip, patch, plan

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
MAX_WARNING_CHARS = 120


class _Model(BaseModel):
    # The API server adds fields over time; unknown ones are kept, not rejected.
    model_config = ConfigDict(extra="allow")


class GroupVersionKind(_Model):
    group: str = ""
    version: str = ""
    kind: str = ""


class GroupVersionResource(_Model):
    group: str = ""
    version: str = ""
    resource: str = ""


class AdmissionRequest(_Model):
    uid: str = Field(min_length=1)
    kind: GroupVersionKind
    resource: GroupVersionResource | None = None
    subResource: str | None = None
    name: str | None = None
    namespace: str | None = None
    operation: str
    userInfo: dict[str, Any] | None = None
    object: dict[str, Any] | None = None
    oldObject: dict[str, Any] | None = None
    dryRun: bool | None = None
    options: dict[str, Any] | None = None


class AdmissionReviewIn(_Model):
    apiVersion: Literal["admission.k8s.io/v1"]
    kind: Literal["AdmissionReview"]
    request: AdmissionRequest


class Status(BaseModel):
    code: int
    message: str
    reason: str | None = None
    status: str = "Failure"


class AdmissionResponse(BaseModel):
    uid: str
    allowed: bool
    patchType: Literal["JSONPatch"] | None = None
    patch: str | None = None
    status: Status | None = None
    warnings: list[str] | None = None
    auditAnnotations: dict[str, str] | None = None


class AdmissionReviewOut(BaseModel):
    apiVersion: str = API_VERSION
    kind: str = KIND
    response: AdmissionResponse

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


@dataclass(frozen=True)
class Outcome:
    """What happened, for logs and metrics: injected | skipped | ignored | denied."""

    decision: str
    detail: str


def _is_pod_create(request: AdmissionRequest) -> bool:
    kind = request.kind
    return (
        request.operation == "CREATE"
        and kind.group == ""
        and kind.kind == "Pod"
        and not request.subResource
    )


def _warning(text: str) -> str:
    return text if len(text) <= MAX_WARNING_CHARS else text[: MAX_WARNING_CHARS - 3] + "..."


def admit(request: AdmissionRequest, config: InjectorConfig) -> tuple[AdmissionResponse, Outcome]:
    """The response to one AdmissionRequest, and what was decided."""
    uid = request.uid
    if not _is_pod_create(request):
        what = f"{request.operation} {request.kind.kind}"
        return AdmissionResponse(uid=uid, allowed=True), Outcome("ignored", what)
    pod = request.object
    if pod is None:
        message = "request.object: missing; expected the Pod being created"
        return _deny(uid, message), Outcome("denied", message)
    metadata = pod.get("metadata")
    namespace = request.namespace or (
        metadata.get("namespace") if isinstance(metadata, dict) else None
    )
    try:
        decision = plan(pod, namespace or "default", config)
    except InjectionError as exc:
        return _deny(uid, exc.message), Outcome("denied", exc.message)
    if isinstance(decision, Skip):
        return AdmissionResponse(uid=uid, allowed=True), Outcome("skipped", decision.reason)
    ops = patch(pod, decision)
    # pydantic's serializer (Rust, compact, UTF-8) writes the same JSON as
    # json.dumps in a third of the time; the patch is the largest part of a review.
    encoded = base64.b64encode(pydantic_core.to_json(ops)).decode()
    response = AdmissionResponse(
        uid=uid,
        allowed=True,
        patchType="JSONPatch",
        patch=encoded,
        warnings=[_warning(w) for w in decision.warnings] or None,
    )
    return response, Outcome("injected", f"{len(ops)} patch operations")


def _deny(uid: str, message: str) -> AdmissionResponse:
    return AdmissionResponse(
        uid=uid,
        allowed=False,
        status=Status(code=400, reason="BadRequest", message=message),
    )


def internal_error(uid: str, message: str) -> AdmissionResponse:
    """Deny (the webhook fails closed) when the injector itself broke."""
    return AdmissionResponse(
        uid=uid,
        allowed=False,
        status=Status(code=500, reason="InternalError", message=message),
    )
