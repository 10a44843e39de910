"""create_app answers POST /mutate outside FastAPI's stack: the same answers as the mounted router."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bench.webhook import review_body
from webhook.app import create_app, create_router, install_error_handlers
from webhook.config import InjectorConfig

CONFIG = InjectorConfig()


def mounted() -> FastAPI:
    app = FastAPI()
    app.include_router(create_router(CONFIG))
    install_error_handlers(app)
    return app


@pytest.mark.parametrize(
    "body",
    [
        review_body("uid-1"),
        b"not json",
        b"{}",
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}}',
        b"x" * (9 * 1024 * 1024),
    ],
    ids=["review", "not-json", "empty-object", "empty-uid", "oversized"],
)
def test_fast_path_answers_like_the_router(body: bytes) -> None:
    fast, routed = TestClient(create_app(CONFIG)), TestClient(mounted())
    a = fast.post("/mutate", content=body, headers={"content-type": "application/json"})
    b = routed.post("/mutate", content=body, headers={"content-type": "application/json"})
    assert (a.status_code, a.headers["content-type"]) == (b.status_code, b.headers["content-type"])
    assert a.json() == b.json()
    assert int(a.headers["content-length"]) == len(a.content)
    if a.status_code == 200:
        assert json.loads(a.content)["response"]["uid"] == "uid-1"
    else:
        assert a.status_code in (400, 413) and "error" in a.json()


def test_other_methods_and_paths_still_go_through_fastapi() -> None:
    client = TestClient(create_app(CONFIG))
    assert client.get("/mutate").status_code == 405
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/nowhere").status_code == 404
