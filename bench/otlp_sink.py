"""A tiny OTLP/HTTP trace receiver for the benchmarks: accepts and discards.

    python3 bench/otlp_sink.py PORT

Listens on 127.0.0.1:PORT. `POST /v1/traces` (protobuf
`ExportTraceServiceRequest`) is decoded, its spans counted and dropped, and
answered 200 with an empty `ExportTraceServiceResponse`, over kept-alive
HTTP/1.1 connections like a real collector. `GET /stats` answers
`{"exports": N, "spans": M, "bytes": B, "bad": K}`, so that the benchmark can
show that spans were really exported during the run. It runs as a process of
its own: its CPU time is not counted as the proxy's.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

LOOPBACK = "127.0.0.1"
_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exports = self.spans = self.bytes = self.bad = 0

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {
                "exports": self.exports,
                "spans": self.spans,
                "bytes": self.bytes,
                "bad": self.bad,
            }


def span_count(body: bytes) -> int:
    request = ExportTraceServiceRequest.FromString(body)
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def make_handler(counts: Counts) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the proxy's exporter expects

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per export would only cost CPU

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path.split("?", 1)[0] != "/v1/traces":
                self._answer(404, b"only /v1/traces\n", "text/plain")
                return
            try:
                spans = span_count(body)
            except DecodeError:
                with counts.lock:
                    counts.bad += 1
                self._answer(400, b"not an ExportTraceServiceRequest\n", "text/plain")
                return
            with counts.lock:
                counts.exports += 1
                counts.spans += spans
                counts.bytes += len(body)
            self._answer(200, _EMPTY_RESPONSE, "application/x-protobuf")

        def do_GET(self) -> None:
            if self.path != "/stats":
                self._answer(404, b"only /stats\n", "text/plain")
                return
            self._answer(200, json.dumps(counts.as_dict()).encode(), "application/json")

    return Handler


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: otlp_sink.py PORT", file=sys.stderr)
        return 2
    server = ThreadingHTTPServer((LOOPBACK, int(argv[0])), make_handler(Counts()))
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
