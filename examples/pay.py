"""One gRPC call to payments, printing the status: the demo uses it to show a
caller that the AuthorizationPolicy does not allow."""

from __future__ import annotations

import json
import sys

import grpc


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else "payments.shop:50051"
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/shop.Payments/Charge")
        try:
            reply = call(json.dumps({"amount": 1}).encode(), timeout=5)
        except grpc.RpcError as exc:
            print(json.dumps({"status": exc.code().name, "details": exc.details()}))
            return 1
    print(json.dumps({"status": "OK", "reply": json.loads(reply)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
