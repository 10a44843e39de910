"""A FAKE Kubernetes API server for tests: just enough of the list/watch JSON
protocol to exercise an informer, and nothing more. Not Kubernetes.

What it speaks:
- `GET <collection>`: a List with `metadata.resourceVersion`;
- `GET <collection>?watch=1&resourceVersion=N[&allowWatchBookmarks=true][&timeoutSeconds=S]`:
  a stream of JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`;
  a resourceVersion older than the compacted history gets an ERROR event with
  a Status of code 410 (Gone), as the real API server sends;
- `GET/POST/PUT` of `coordination.k8s.io/v1` Leases with optimistic concurrency (409);
- `PATCH .../{name}/status` (merge patch), recorded for assertions.

Tests change the objects with `put`, `delete` and `compact`, from any thread.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.integration.proxy_harness import free_port


@dataclass
class _Event:
    rv: int
    collection: str
    type: str
    obj: dict[str, Any]


@dataclass
class FakeAPIServer:
    port: int = field(default_factory=free_port)
    bookmark_interval: float = 0.2
    objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    history: list[_Event] = field(default_factory=list)
    status_patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    rv: int = 100
    compacted: int = 0
    fail_next_watches: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- what tests call -------------------------------------------------------------

    def put(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object in a collection path like /api/v1/services."""
        with self._lock:
            self.rv += 1
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta["resourceVersion"] = str(self.rv)
            meta.setdefault("uid", f"uid-{meta.get('namespace', '')}-{meta['name']}")
            key = (meta.get("namespace", ""), meta["name"])
            store = self.objects.setdefault(collection, {})
            kind = "MODIFIED" if key in store else "ADDED"
            store[key] = obj
            self.history.append(_Event(self.rv, collection, kind, copy.deepcopy(obj)))
        self._notify()
        return obj

    def delete(self, collection: str, namespace: str, name: str) -> None:
        with self._lock:
            obj = self.objects.get(collection, {}).pop((namespace, name))
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append(_Event(self.rv, collection, "DELETED", obj))
        self._notify()

    def compact(self) -> None:
        """Forget the history: every watch from an older resourceVersion gets 410."""
        with self._lock:
            self.rv += 1
            self.compacted = self.rv
            self.history.clear()
        self._notify()

    def _notify(self) -> None:
        loop, ev = self._loop, self._changed
        if loop is not None and ev is not None:
            loop.call_soon_threadsafe(ev.set)

    # --- the HTTP side -----------------------------------------------------------------

    def _collection(self, path: str) -> str:
        # /api/v1/namespaces/{ns}/configmaps -> namespaced lists are filtered by the caller
        return path

    async def _list(self, request: Request, collection: str) -> Response:
        with self._lock:
            items = [copy.deepcopy(o) for o in self.objects.get(collection, {}).values()]
            rv = self.rv
        return JSONResponse(
            {
                "kind": "List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
        )

    async def _watch(self, request: Request, collection: str) -> Response:
        start = int(request.query_params.get("resourceVersion") or 0)
        bookmarks = request.query_params.get("allowWatchBookmarks") == "true"
        timeout = float(request.query_params.get("timeoutSeconds") or 30)
        if self.fail_next_watches > 0:
            self.fail_next_watches -= 1
            return JSONResponse(
                {"kind": "Status", "code": 500, "message": "injected failure"}, status_code=500
            )

        async def stream() -> AsyncIterator[bytes]:
            assert self._changed is not None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            rv = start
            if rv < self.compacted:
                gone = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "Expired",
                    "code": 410,
                    "message": f"too old resource version: {rv} ({self.compacted})",
                }
                yield (json.dumps({"type": "ERROR", "object": gone}) + "\n").encode()
                return
            last_bookmark = loop.time()
            while loop.time() < deadline:
                with self._lock:
                    if rv < self.compacted:
                        gone = {
                            "kind": "Status",
                            "code": 410,
                            "reason": "Expired",
                            "message": "compacted",
                        }
                        events: list[dict[str, Any]] = [{"type": "ERROR", "object": gone}]
                        done = True
                    else:
                        done = False
                        events = [
                            {"type": e.type, "object": e.obj}
                            for e in self.history
                            if e.rv > rv and e.collection == collection
                        ]
                        if events:
                            rv = int(events[-1]["object"]["metadata"]["resourceVersion"])
                    now_rv = self.rv
                for e in events:
                    yield (json.dumps(e) + "\n").encode()
                if done:
                    return
                if bookmarks and loop.time() - last_bookmark >= self.bookmark_interval:
                    last_bookmark = loop.time()
                    rv = max(rv, now_rv)
                    yield (
                        json.dumps(
                            {
                                "type": "BOOKMARK",
                                "object": {
                                    "kind": "Bookmark",
                                    "metadata": {"resourceVersion": str(rv)},
                                },
                            }
                        )
                        + "\n"
                    ).encode()
                changed = self._changed
                with suppress(TimeoutError):
                    await asyncio.wait_for(
                        changed.wait(),
                        min(self.bookmark_interval, max(0.01, deadline - loop.time())),
                    )
                if changed.is_set():
                    self._changed = asyncio.Event()

        return StreamingResponse(stream(), media_type="application/json")

    async def _collection_endpoint(self, request: Request) -> Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}?{request.url.query}")
        if path.endswith("/status") and request.method == "PATCH":
            body = await request.json()
            self.status_patches.append((path, body))
            return JSONResponse(body)
        if "/leases" in path:
            return await self._lease(request, path)
        if request.query_params.get("watch") in ("1", "true"):
            return await self._watch(request, path)
        if path not in self.objects and not path.startswith(("/api/v1", "/apis/discovery.k8s.io")):
            known = {"/apis/gateway.networking.k8s.io", "/apis/synchro.dev"}
            if not any(path.startswith(k) for k in known):
                return JSONResponse({"kind": "Status", "code": 404}, status_code=404)
        return await self._list(request, path)

    async def _lease(self, request: Request, path: str) -> Response:
        parts = path.rstrip("/").split("/")
        collection = "/".join(parts[:-1]) if parts[-1] != "leases" else path
        store = self.objects.setdefault(collection, {})
        if request.method == "GET":
            name = parts[-1]
            obj = store.get((parts[-3], name))
            if obj is None:
                return JSONResponse(
                    {"kind": "Status", "code": 404, "reason": "NotFound"}, status_code=404
                )
            return JSONResponse(obj)
        body = await request.json()
        meta = body.setdefault("metadata", {})
        key = (meta.get("namespace") or parts[parts.index("namespaces") + 1], meta["name"])
        meta["namespace"] = key[0]
        with self._lock:
            current = store.get(key)
            if request.method == "POST" and current is not None:
                return JSONResponse(
                    {"kind": "Status", "code": 409, "reason": "AlreadyExists"}, status_code=409
                )
            if request.method == "PUT" and (
                current is None
                or current["metadata"]["resourceVersion"] != meta.get("resourceVersion")
            ):
                return JSONResponse(
                    {"kind": "Status", "code": 409, "reason": "Conflict"}, status_code=409
                )
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            store[key] = body
        return JSONResponse(body, status_code=201 if request.method == "POST" else 200)

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self._loop = asyncio.get_running_loop()
            self._changed = asyncio.Event()
            yield

        return Starlette(
            routes=[
                Route(
                    "/{path:path}",
                    self._collection_endpoint,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                )
            ],
            lifespan=lifespan,
        )


@contextmanager
def run_fake_apiserver(**kw: Any) -> Iterator[FakeAPIServer]:
    fake = FakeAPIServer(**kw)
    config = uvicorn.Config(
        fake.app(),
        host="127.0.0.1",
        port=fake.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-apiserver", daemon=True)
    thread.start()
    try:
        import time

        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("fake API server did not start")
            time.sleep(0.01)
        yield fake
    finally:
        server.should_exit = True
        server.force_exit = True
        fake._notify()
        thread.join(5)
