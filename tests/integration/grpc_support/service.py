"""A tiny gRPC service on raw bytes (generic handlers, identity serializers: no codegen).

Methods of `synchro.test.Echo`:
- `Echo` (unary): answers the request; the x-request-id it saw comes back as
  trailing metadata `seen-request-id`.
- `Fail` (unary): answers with the status code and message named in the request,
  `b"<code name>:<message>"`, and trailing metadata `reason: deliberate`.
- `Chat` (bidi): answers every message with `b"re:" + message`, in order.
- `Hang` (server streaming): sends one message, then waits to be cancelled;
  the cancellation is recorded in `EchoService.cancelled`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "synchro.test.Echo"
MAX_MESSAGE = 64 * 1024 * 1024
# Never let an environment proxy or a cached DNS answer get in the way of loopback tests.
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.enable_retries", 0),
]


class EchoService:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.hang_started = threading.Event()
        self.calls = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        seen = dict(context.invocation_metadata()).get("x-request-id", "")
        context.set_trailing_metadata((("seen-request-id", seen),))
        return request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count()
        code_name, _, message = request.decode().partition(":")
        context.set_trailing_metadata((("reason", "deliberate"),))
        context.abort(grpc.StatusCode[code_name], message)
        raise AssertionError("abort returns by raising")

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count()
        for message in requests:
            yield b"re:" + message

    def hang(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count()
        context.add_callback(self.cancelled.set)
        yield b"started"
        self.hang_started.set()
        deadline = time.monotonic() + 30
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
                "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
                "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
                "Hang": grpc.unary_stream_rpc_method_handler(self.hang),
            },
        )


class GrpcServer:
    """`with GrpcServer() as s:` a real grpcio server on 127.0.0.1:<s.port>."""

    def __init__(self) -> None:
        self.service = EchoService()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32),
            handlers=[self.service.handler()],
            options=CHANNEL_OPTIONS,
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def __enter__(self) -> GrpcServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None).wait(5)


class EchoClient:
    """Blocking stubs for the service over one channel (one HTTP/2 connection)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.echo: Any = self.channel.unary_unary(f"/{SERVICE}/Echo")
        self.fail: Any = self.channel.unary_unary(f"/{SERVICE}/Fail")
        self.chat: Any = self.channel.stream_stream(f"/{SERVICE}/Chat")
        self.hang: Any = self.channel.unary_stream(f"/{SERVICE}/Hang")

    def __enter__(self) -> EchoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
