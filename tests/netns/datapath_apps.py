"""The workload and clients of test_datapath_netns, run as Pod containers.

    python -m tests.netns.datapath_apps serve
    python -m tests.netns.datapath_apps grpc-client --target 10.0.0.3:50051

`serve` (one process, everything on 0.0.0.0):
- 8080 HTTP/1.1 (uvicorn, keep-alive): `GET /headers` answers the request's
  headers and the peer's address as JSON; `POST /upload` reads the body and answers `{"sha256", "size"}`;
  `GET /download?size=N` streams N bytes of `pattern(N)` chunked (no length);
  HEAD on any GET path.
- 8081 WebSocket echo (`websockets`).
- 50051 gRPC `synchro.test.Echo` (tests/integration/grpc_support: unary Echo,
  bidi Chat).
- 9000 and 9200 TCP echo: echoes what arrives; after the client's half-close,
  sends `bye <n>` (the byte count) and closes.
- 9100 a server-first protocol: sends `BANNER` at once, then echoes lines.

`grpc-client`: one unary call and one bidirectional stream over one channel
(h2c); prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent import futures
from typing import Any
from urllib.parse import parse_qs

HTTP, WS, GRPC, ECHO, BANNER_PORT, EXCLUDED = 8080, 8081, 50051, 9000, 9100, 9200
BANNER = b"220 datapath server-first banner\r\n"
CHUNK = 64 * 1024

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def pattern(size: int) -> bytes:
    """Deterministic, not compressible into a repeat of one byte: both sides can check it."""
    block = hashlib.sha256(b"datapath").digest() * (CHUNK // 32)
    return (block * (size // len(block) + 1))[:size]


async def _json(send: Send, status: int, value: Any) -> None:
    body = json.dumps(value).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def http_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    path, method = scope["path"], scope["method"]
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    if path == "/upload" and method in ("POST", "PUT"):
        digest, size, more = hashlib.sha256(), 0, True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        await _json(send, 200, {"sha256": digest.hexdigest(), "size": size, "headers": headers})
        return
    if path == "/download" and method in ("GET", "HEAD"):
        size = int(parse_qs(scope["query_string"].decode()).get("size", ["0"])[0])
        # No content-length: uvicorn answers with chunked transfer-encoding.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        data = pattern(size)
        for start in range(0, size, CHUNK):
            await send(
                {
                    "type": "http.response.body",
                    "body": data[start : start + CHUNK],
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/headers" and method in ("GET", "HEAD"):
        client = scope.get("client") or ("", 0)
        await _json(send, 200, {"headers": headers, "client": client[0]})
        return
    await _json(send, 404, {"error": f"{method} {path}"})


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    try:
        while chunk := await reader.read(CHUNK):
            total += len(chunk)
            writer.write(chunk)
            await writer.drain()
        # The client half-closed; this side can still talk.
        writer.write(b"bye %d\n" % total)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(BANNER)
        await writer.drain()
        while line := await reader.readline():
            writer.write(b"echo " + line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _grpc_server() -> Any:
    import grpc

    from tests.integration.grpc_support.service import CHANNEL_OPTIONS, EchoService

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        handlers=[EchoService().handler()],
        options=CHANNEL_OPTIONS,
    )
    server.add_insecure_port(f"0.0.0.0:{GRPC}")
    server.start()
    return server


async def serve() -> None:
    import uvicorn
    import websockets.asyncio.server as ws_server

    async def ws_echo(conn: Any) -> None:
        async for message in conn:
            await conn.send(message)

    grpc_server = _grpc_server()
    servers = [
        await asyncio.start_server(_echo, "0.0.0.0", ECHO),
        await asyncio.start_server(_echo, "0.0.0.0", EXCLUDED),
        await asyncio.start_server(_banner, "0.0.0.0", BANNER_PORT),
    ]
    config = uvicorn.Config(
        http_app, host="0.0.0.0", port=HTTP, http="httptools", log_level="warning", lifespan="off"
    )
    try:
        async with ws_server.serve(ws_echo, "0.0.0.0", WS, max_size=None):
            print("datapath apps serving", flush=True)
            await uvicorn.Server(config).serve()
    finally:
        for s in servers:
            s.close()
        grpc_server.stop(None)


def grpc_client(target: str) -> None:
    from tests.integration.grpc_support.service import EchoClient

    with EchoClient(target) as client:
        answer, call = client.echo.with_call(b"ping", timeout=10)
        trailers = dict(call.trailing_metadata() or ())
        chat = [m.decode() for m in client.chat(iter([b"one", b"two", b"three"]), timeout=10)]
    print(
        json.dumps(
            {
                "unary": answer.decode(),
                "seen_request_id": trailers.get("seen-request-id", ""),
                "chat": chat,
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="datapath_apps")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve")
    c = sub.add_parser("grpc-client")
    c.add_argument("--target", required=True)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        asyncio.run(serve())
    else:
        grpc_client(args.target)


if __name__ == "__main__":
    main(sys.argv[1:])
