"""payments: a gRPC service (generic handlers, JSON payloads, no codegen) with
the standard grpc.health.v1 service for the kubelet's grpc probe."""

from __future__ import annotations

import json
import os
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "shop.Payments"


def _charge(request: bytes, context: grpc.ServicerContext) -> bytes:
    order = json.loads(request or b"{}")
    return json.dumps({"charged": order.get("amount", 0), "ok": True}).encode()


def main() -> None:
    port = int(os.environ.get("PORT", "50051"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Charge": grpc.unary_unary_rpc_method_handler(_charge)}
    )
    server.add_generic_rpc_handlers((handler,))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"payments listening on :{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
