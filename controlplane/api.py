"""The controller API (HTTPS, port 15012 in a cluster): config push, ACK/NACK,
proxy status, and the Pods the local runtime reports.

| method and path | what |
|---|---|
| `GET /v1/config?namespace=&pod=&version=&nacked=&wait=&sa=&label=k=v` | long-poll for the proxy's config (see push.py) |
| `POST /v1/proxies/{namespace}/{pod}/ack` `{"version", "error"}` | ACK (no error) or NACK a version |
| `GET /v1/proxies` | every proxy: workload, version applied, in sync, last NACK |
| `GET /v1/config/{namespace}/{pod}` | read-only: the config compiled for that Pod now, `{pod, known, config}` (`synchro explain`, `synchro check`); registers no proxy |
| `PUT /v1/pods/{namespace}/{name}` | report a Pod: `{ip, labels, serviceAccount, ready, meshed, ports, zone}` or a Pod manifest |
| `DELETE /v1/pods/{namespace}/{name}` | the Pod is gone |
| `GET /v1/problems` | invalid resources, as error lines and fields |
| `GET /v1/services` | services with their ClusterIPs (for local DNS) |
| `GET /healthz/ready` | 200 once the first configuration is built |
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from controlplane.push import PushError
from controlplane.server import Controller

MAX_WAIT_SECONDS = 60.0
VERSION_HEADER = "x-synchro-version"


class Ack(BaseModel):
    version: str = Field(min_length=1, max_length=128)
    error: str | None = Field(default=None, max_length=8192)


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise PushError(f"label {item!r}: expected key=value")
        out[k] = v
    return out


def router(controller: Controller) -> APIRouter:
    r = APIRouter()
    hub = controller.hub

    @r.get("/v1/config")
    async def config(
        request: Request,
        namespace: str = Query(min_length=1, max_length=63),
        pod: str = Query(min_length=1, max_length=253),
        version: str = Query("", max_length=128),
        nacked: str = Query("", max_length=128),
        wait: float = Query(30.0, ge=0.0, le=MAX_WAIT_SECONDS),
        sa: str | None = Query(None, max_length=253),
        label: list[str] = Query(default_factory=list),  # noqa: B008 - FastAPI's idiom
    ) -> Response:
        rendered = await hub.poll(
            namespace,
            pod,
            have=version,
            nacked=nacked,
            wait=wait,
            labels=_labels(label),
            service_account=sa,
        )
        if rendered is None:
            return Response(status_code=304, headers={VERSION_HEADER: version})
        headers = {
            VERSION_HEADER: rendered.version,
            "etag": f'"{rendered.version}"',
            "cache-control": "no-store",
        }
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["content-encoding"] = "gzip"
            return Response(rendered.gzipped, media_type="application/json", headers=headers)
        return Response(rendered.body, media_type="application/json", headers=headers)

    @r.post("/v1/proxies/{namespace}/{pod}/ack")
    async def ack(namespace: str, pod: str, body: Ack) -> dict[str, Any]:
        hub.ack(namespace, pod, body.version, body.error)
        return {"ok": True}

    @r.get("/v1/config/{namespace}/{pod}")
    async def config_of(namespace: str, pod: str) -> Response:
        if not hub.has_snapshot.is_set():
            return JSONResponse({"error": "no configuration built yet"}, status_code=503)
        info = hub.info(namespace, pod)
        known = hub.snapshot.resources.pod(namespace, pod) is not None
        config = hub.config_for(info).to_dict()
        return JSONResponse({"pod": f"{namespace}/{pod}", "known": known, "config": config})

    @r.get("/v1/proxies")
    async def proxies() -> dict[str, Any]:
        return {"generation": controller.generation, "proxies": hub.proxies()}

    @r.put("/v1/pods/{namespace}/{name}")
    async def put_pod(namespace: str, name: str, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as e:
            raise PushError(f"body: not JSON ({e})") from None
        if not isinstance(body, dict):
            raise PushError("body: expected a JSON object")
        controller.put_pod(namespace, name, body)
        return {"ok": True}

    @r.delete("/v1/pods/{namespace}/{name}")
    async def delete_pod(namespace: str, name: str) -> Response:
        if not controller.delete_pod(namespace, name):
            return JSONResponse({"error": f"no reported Pod {namespace}/{name}"}, status_code=404)
        return JSONResponse({"ok": True})

    @r.get("/v1/problems")
    async def problems() -> dict[str, Any]:
        return {
            "problems": [
                {
                    "line": p.line(),
                    "origin": p.origin,
                    "document": p.index,
                    "kind": p.kind,
                    "namespace": p.namespace,
                    "name": p.name,
                    "field": p.field,
                    "message": p.message,
                    "condition": p.condition,
                    "reason": p.reason,
                }
                for p in hub.snapshot.problems
            ]
        }

    @r.get("/v1/services")
    async def services() -> dict[str, Any]:
        from controlplane.compiler import shared

        sh = shared(hub.snapshot.resources)
        return {
            "services": [
                {
                    "namespace": s.namespace,
                    "name": s.name,
                    "cluster_ips": list(s.cluster_ips),
                    "headless": s.headless,
                    "ports": [
                        {"port": p.port, "name": p.name, "protocol": p.protocol} for p in s.ports
                    ],
                }
                for s in sh.services
            ]
        }

    @r.get("/healthz/ready")
    async def ready() -> Response:
        if hub.has_snapshot.is_set():
            return JSONResponse({"ready": True, "generation": controller.generation})
        return JSONResponse({"ready": False}, status_code=503)

    return r


def create_app(controller: Controller, *, manage: bool = True) -> FastAPI:
    """The API app; with `manage`, the app's lifespan starts and stops the controller."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage:
            async with controller.running():
                yield
        else:
            yield

    app = FastAPI(title="synchro-controller", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.controller = controller
    app.include_router(router(controller))

    @app.exception_handler(PushError)
    async def push_error(request: Request, exc: PushError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400)

    return app
