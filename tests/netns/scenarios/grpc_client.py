"""gRPC calls to demo.Echo from inside a Pod, over one channel; answers as JSON.

    python3 grpc_client.py TARGET '[{"method": "Say", "text": "hi", "repeat": 12,
                                     "metadata": {"x-tier": "gold"}, "timeout": 5}]'

Each answer: {"ok": reply text} or {"code": status name, "details": ...}.
"""

import json
import sys

import grpc


def main():
    target, plan = sys.argv[1], json.loads(sys.argv[2])
    answers = []
    with grpc.insecure_channel(target) as channel:
        for spec in plan:
            call = channel.unary_unary(f"/demo.Echo/{spec['method']}")
            metadata = list((spec.get("metadata") or {}).items())
            for _ in range(spec.get("repeat", 1)):
                try:
                    reply = call(
                        spec["text"].encode(), timeout=spec.get("timeout", 5), metadata=metadata
                    )
                    answers.append({"ok": reply.decode()})
                except grpc.RpcError as exc:
                    answers.append({"code": exc.code().name, "details": exc.details()})
    print(json.dumps(answers))


main()
