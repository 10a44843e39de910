"""A test workload for the traffic tests in network namespaces.

    python -m tests.netns.trafficapp serve --name a --http 8080 --grpc 50051
    python -m tests.netns.trafficapp grpc-client --target 10.96.0.30:50051 -n 300

`serve`: HTTP/1.1 on `--http` answering `<name> <path>` with header
`x-upstream: <name>`, after the configured delay, failing the configured share
of requests; gRPC `synchro.test.Echo/Echo` on `--grpc` (answers `<name>`, or
UNAVAILABLE when told to). Control, not counted as traffic: `GET /__stats`
(hits, grpc calls, last request headers), `POST /__behaviour` (JSON: status,
delay, fail_ratio, fail_status, grpc_unavailable; also resets the counters).

`grpc-client`: `-n` unary calls over one channel (one HTTP/2 connection),
prints one JSON line: answers by name and error codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
from collections import Counter
from concurrent import futures
from typing import Any

import httptools

SERVICE = "synchro.test.Echo"
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]


class State:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.behaviour: dict[str, Any] = {}
        self.hits = 0
        self.grpc_calls = 0
        self.last_headers: dict[str, str] = {}
        self.rng = random.Random(hash(name) & 0xFFFF)

    def configure(self, behaviour: dict[str, Any]) -> None:
        with self.lock:
            self.behaviour = behaviour
            self.hits = self.grpc_calls = 0
            self.rng = random.Random(int(behaviour.get("seed", 1)))


class _Request:
    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def _response(status: int, body: bytes, name: str, ctype: str = "text/plain") -> bytes:
    return (
        b"HTTP/1.1 %d X\r\nx-upstream: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (status, name.encode(), ctype.encode(), len(body), body)
    )


async def _serve_http(
    state: State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            req = _Request()
            parser = httptools.HttpRequestParser(req)
            while not req.done:
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed_data(data)
            path = req.url.decode()
            if path == "/__stats":
                with state.lock:
                    stats = {
                        "hits": state.hits,
                        "grpc_calls": state.grpc_calls,
                        "last_headers": state.last_headers,
                    }
                writer.write(
                    _response(200, json.dumps(stats).encode(), state.name, "application/json")
                )
                continue
            if path == "/__behaviour":
                state.configure(json.loads(bytes(req.body) or b"{}"))
                writer.write(_response(200, b"ok\n", state.name))
                continue
            with state.lock:
                state.hits += 1
                state.last_headers = req.headers
                b = state.behaviour
                failing = state.rng.random() < float(b.get("fail_ratio", 0.0))
            if b.get("delay"):
                await asyncio.sleep(float(b["delay"]))
            status = int(b.get("fail_status", 500)) if failing else int(b.get("status", 200))
            writer.write(_response(status, f"{state.name} {path}\n".encode(), state.name))
            await writer.drain()
    except (ConnectionError, httptools.HttpParserError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def _grpc_server(state: State, port: int) -> Any:
    import grpc

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        with state.lock:
            state.grpc_calls += 1
            unavailable = bool(state.behaviour.get("grpc_unavailable"))
        if unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{state.name} is unavailable")
        return state.name.encode()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        handlers=[
            grpc.method_handlers_generic_handler(
                SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            )
        ],
        options=CHANNEL_OPTIONS,
    )
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    return server


async def serve(args: argparse.Namespace) -> None:
    state = State(args.name)
    grpc_server = _grpc_server(state, args.grpc) if args.grpc else None
    server = await asyncio.start_server(
        lambda r, w: _serve_http(state, r, w), "0.0.0.0", args.http, backlog=1024
    )
    print(f"trafficapp {args.name} serving http {args.http} grpc {args.grpc}", flush=True)
    try:
        async with server:
            await server.serve_forever()
    finally:
        if grpc_server is not None:
            grpc_server.stop(None)


def grpc_client(args: argparse.Namespace) -> None:
    import grpc

    answers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    with grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        for i in range(args.n):
            try:
                answers[echo(b"%d" % i, timeout=5).decode()] += 1
            except grpc.RpcError as exc:
                errors[exc.code().name] += 1
    print(json.dumps({"answers": answers, "errors": errors}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="trafficapp")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--http", type=int, default=8080)
    s.add_argument("--grpc", type=int, default=0)
    c = sub.add_parser("grpc-client")
    c.add_argument("--target", required=True)
    c.add_argument("-n", type=int, default=100)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        asyncio.run(serve(args))
    else:
        grpc_client(args)


if __name__ == "__main__":
    main(sys.argv[1:])
