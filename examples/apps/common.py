"""A tiny threaded HTTP server shared by the demo apps (stdlib only, on purpose:
the demo shows what the mesh adds, so the apps stay plain)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handler = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, object]]]


def serve(name: str, handle: Handler) -> None:
    port = int(os.environ.get("PORT", "8080"))
    hostname = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()

    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                status, body = 200, {"ok": True}
            else:
                status, body = handle(self)
            body = {"service": name, "pod": hostname, **body}
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), _Handler)
    server.daemon_threads = True
    print(f"{name} listening on :{port}", flush=True)
    server.serve_forever()
