"""admit(): AdmissionRequest in, AdmissionResponse out, for every kind of input."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.app import BadReview, _parse_review
from webhook.config import InjectorConfig
from webhook.review import AdmissionRequest, AdmissionReviewOut, admit

CONFIG = InjectorConfig()


def pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p"}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    }


def request(obj: Any = None, **overrides: Any) -> AdmissionRequest:
    body = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop",
        "operation": "CREATE",
        "object": pod() if obj is None else obj,
        **overrides,
    }
    return AdmissionRequest.model_validate(body)


def decoded_patch(response: Any) -> list[dict[str, Any]]:
    assert response.patchType == "JSONPatch"
    ops = json.loads(base64.b64decode(response.patch))
    assert isinstance(ops, list)
    return ops


def test_injects_with_a_base64_json_patch_and_echoes_uid() -> None:
    req = request()
    response, outcome = admit(req, CONFIG)
    assert response.uid == req.uid
    assert response.allowed is True
    assert outcome.decision == "injected"
    injected = jsonpatch.apply_patch(req.object, decoded_patch(response))
    assert any(c["name"] == "synchro-proxy" for c in injected["spec"]["initContainers"])
    body = json.loads(AdmissionReviewOut(response=response).to_json())
    assert body["apiVersion"] == "admission.k8s.io/v1"
    assert body["kind"] == "AdmissionReview"
    assert set(body["response"]) == {"uid", "allowed", "patchType", "patch"}


@pytest.mark.parametrize(
    "overrides",
    [
        {"operation": "UPDATE"},
        {"operation": "DELETE", "object": None},
        {"operation": "CONNECT"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {"kind": {"group": "", "version": "v1", "kind": "Service"}},
        {"subResource": "ephemeralcontainers", "operation": "CREATE"},
    ],
)
def test_other_operations_and_kinds_pass_unchanged(overrides: dict[str, Any]) -> None:
    response, outcome = admit(request(**overrides), CONFIG)
    assert response.allowed is True
    assert response.patch is None and response.patchType is None
    assert outcome.decision == "ignored"


def test_skips_have_no_patch() -> None:
    response, outcome = admit(request(namespace="kube-system"), CONFIG)
    assert response.allowed and response.patch is None
    assert outcome.decision == "skipped"


def test_namespace_falls_back_to_the_object() -> None:
    obj = pod()
    obj["metadata"]["namespace"] = "kube-system"
    _, outcome = admit(request(obj, namespace=None), CONFIG)
    assert outcome.decision == "skipped"


def test_malformed_annotation_is_denied_with_a_clear_message() -> None:
    response, _ = admit(request(pod({"synchro.dev/proxy-cpu-request": "lots"})), CONFIG)
    assert response.allowed is False
    assert response.status is not None
    assert response.status.code == 400
    message = response.status.message
    assert "synchro.dev/proxy-cpu-request" in message and "'lots'" in message
    assert "quantity" in message


def test_unknown_annotation_is_a_warning() -> None:
    response, _ = admit(request(pod({"synchro.dev/colour": "blue"})), CONFIG)
    assert response.allowed is True
    assert response.warnings == ["unknown annotation synchro.dev/colour is ignored"]


def test_long_warnings_are_truncated() -> None:
    key = "synchro.dev/" + "x" * 200
    response, _ = admit(request(pod({key: "1"})), CONFIG)
    assert response.warnings is not None
    assert all(len(w) <= 120 for w in response.warnings)


def test_missing_object_is_denied() -> None:
    response, _ = admit(request(object=None), CONFIG)
    assert response.allowed is False


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'"AdmissionReview"',
        b"\xff\xfe",
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}',
        b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}',
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}}',
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u", '
        b'"kind": {"kind": "Pod"}, "operation": "CREATE", "object": [1]}}',
    ],
)
def test_unreadable_bodies_are_bad_reviews(body: bytes) -> None:
    with pytest.raises(BadReview):
        _parse_review(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(body=json_values)
def test_any_json_body_is_a_review_or_a_bad_review(body: Any) -> None:
    with contextlib.suppress(BadReview):
        _parse_review(json.dumps(body).encode())


probe_like = st.fixed_dictionaries(
    {},
    optional={
        "httpGet": st.one_of(json_values, st.fixed_dictionaries({"port": json_values})),
        "tcpSocket": st.fixed_dictionaries({"port": json_values}),
        "grpc": json_values,
        "exec": json_values,
        "timeoutSeconds": json_values,
    },
)
container_like = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["app", "synchro-init", "synchro-proxy"]), json_values)},
    optional={
        "ports": st.one_of(
            json_values,
            st.lists(st.fixed_dictionaries({"name": json_values, "containerPort": json_values})),
        ),
        "livenessProbe": st.one_of(probe_like, json_values),
        "readinessProbe": probe_like,
    },
)

pod_like = st.fixed_dictionaries(
    {
        "metadata": st.one_of(
            json_values,
            st.fixed_dictionaries({}, optional={"annotations": json_values, "labels": json_values}),
        ),
        "spec": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"containers": st.one_of(json_values, st.lists(container_like, max_size=3))},
                optional={
                    "initContainers": json_values,
                    "volumes": json_values,
                    "hostNetwork": json_values,
                },
            ),
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(obj=pod_like)
def test_admit_answers_any_object(obj: dict[str, Any]) -> None:
    response, outcome = admit(request(obj), CONFIG)
    assert outcome.decision in {"injected", "skipped", "denied"}
    if response.allowed and response.patch:
        jsonpatch.apply_patch(obj, decoded_patch(response))
    AdmissionReviewOut(response=response).to_json()
