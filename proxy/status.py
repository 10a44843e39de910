"""The Pod-facing status port 15020: readiness and the kubelet's rewritten probes.

- `GET /healthz/ready`: 200 once the proxy serves (503 while starting or draining).
- `GET /app-health/<container>/<livez|readyz|startupz>`: runs the container's
  original probe (from `SYNCHRO_APP_PROBES`) against the app and answers 200 when
  it passes, 503 when it fails, 404 when no such probe is known.
- `GET /metrics`: Prometheus text, or OpenMetrics when the scraper's `Accept`
  asks for `application/openmetrics-text`.

Also the tiny HTTP/1.1 server (one request per connection, httptools parser)
that the admin endpoint shares: probes and admin calls are rare, so keep-alive
and streaming would be weight without use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httptools

from proxy.conn import Address

log = logging.getLogger(__name__)

PROBE_KINDS: Final = ("livez", "readyz", "startupz")
MAX_REQUEST_BYTES: Final = 16 * 1024
REQUEST_TIMEOUT: Final = 10.0


# -- the mini HTTP server ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, (text + "\n").encode())

    @classmethod
    def json(cls, status: int, value: Any) -> Response:
        return cls(status, json.dumps(value, indent=2).encode() + b"\n", "application/json")


Route = Callable[[str, str], Awaitable[Response]]
"""(method, path without query) -> Response."""
HeaderRoute = Callable[[str, str, Mapping[str, str]], Awaitable[Response]]
"""(method, path without query, the request headers in `KEPT_HEADERS`) -> Response."""

# The only request headers a status or admin route looks at.
KEPT_HEADERS: Final = frozenset({b"accept"})

_REASONS: Final = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _Request:
    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.complete = False
        self.headers: dict[str, str] = {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in KEPT_HEADERS:
            key = lowered.decode("latin-1")
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]},{text}" if key in self.headers else text

    def on_message_complete(self) -> None:
        self.complete = True


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str]] | Response:
    request = _Request()
    parser = httptools.HttpRequestParser(request)
    seen = 0
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            while not request.complete:
                data = await reader.read(4096)
                if not data:
                    return Response.text(400, "incomplete request")
                seen += len(data)
                if seen > MAX_REQUEST_BYTES:
                    return Response.text(431, "request too large")
                parser.feed_data(data)
    except TimeoutError:
        return Response.text(408, "request not complete in time")
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        return Response.text(400, f"malformed request: {exc}")
    path = httptools.parse_url(request.url).path or b"/"
    method = parser.get_method().decode("latin-1")
    return method, unquote(path.decode("latin-1")), request.headers


def _encode(response: Response) -> bytes:
    head = (
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + response.body


async def start_http_server(
    name: str,
    addresses: Iterable[Address],
    route: Route | None = None,
    *,
    header_route: HeaderRoute | None = None,
) -> list[asyncio.Server]:
    """Serve `route(method, path)`, or `header_route(method, path, headers)`
    for routes that look at request headers."""
    if (route is None) == (header_route is None):
        raise ValueError("give exactly one of route and header_route")

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read_request(reader)
            if isinstance(request, Response):
                response = request
            else:
                method, path, headers = request
                try:
                    if header_route is not None:
                        response = await header_route(method, path, headers)
                    else:
                        assert route is not None
                        response = await route(method, path)
                except Exception:
                    log.exception("%s: %s %s failed", name, method, path)
                    response = Response.text(500, "internal error")
            writer.write(_encode(response))
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("%s: client went away: %s", name, exc)
        finally:
            writer.close()

    servers = []
    for address in addresses:
        servers.append(await asyncio.start_server(on_connect, address.host, address.port))
        log.info("%s on %s", name, address)
    return servers


# -- probe definitions (pure) -------------------------------------------------


class ProbeConfigError(ValueError):
    """`SYNCHRO_APP_PROBES` that does not describe probes."""


@dataclass(frozen=True, slots=True)
class HttpGetProbe:
    port: int
    path: str = "/"
    host: str = "127.0.0.1"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class TcpProbe:
    port: int
    host: str = "127.0.0.1"
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class GrpcProbe:
    port: int
    service: str = ""
    host: str = "127.0.0.1"
    timeout: float = 1.0


Probe = HttpGetProbe | TcpProbe | GrpcProbe
AppProbes = Mapping[str, Mapping[str, Probe]]


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProbeConfigError(f"{where}: port {value!r} is not a number")
    if isinstance(value, str) and not value.isdigit():
        raise ProbeConfigError(f"{where}: named port {value!r} was not resolved to a number")
    port = int(value)
    if not 1 <= port <= 65535:
        raise ProbeConfigError(f"{where}: port {port} out of range 1-65535")
    return port


def parse_probe(spec: Mapping[str, Any], where: str) -> Probe:
    """One Kubernetes probe object (`httpGet`/`tcpSocket`/`grpc`, `timeoutSeconds`)."""
    if not isinstance(spec, Mapping):
        raise ProbeConfigError(f"{where}: expected a probe object")
    timeout = spec.get("timeoutSeconds", 1)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ProbeConfigError(f"{where}: timeoutSeconds must be a positive number")
    timeout = float(timeout)
    if isinstance(http := spec.get("httpGet"), Mapping):
        scheme = str(http.get("scheme", "HTTP")).upper()
        if scheme not in ("HTTP", "HTTPS"):
            raise ProbeConfigError(f"{where}: scheme must be HTTP or HTTPS")
        headers = tuple(
            (str(h["name"]), str(h.get("value", "")))
            for h in http.get("httpHeaders") or ()
            if isinstance(h, Mapping) and "name" in h
        )
        path = str(http.get("path") or "/")
        return HttpGetProbe(
            port=_port(http.get("port"), where),
            path=path if path.startswith("/") else "/" + path,
            host=str(http.get("host") or "127.0.0.1"),
            scheme=scheme,
            headers=headers,
            timeout=timeout,
        )
    if isinstance(tcp := spec.get("tcpSocket"), Mapping):
        return TcpProbe(
            port=_port(tcp.get("port"), where),
            host=str(tcp.get("host") or "127.0.0.1"),
            timeout=timeout,
        )
    if isinstance(grpc := spec.get("grpc"), Mapping):
        return GrpcProbe(
            port=_port(grpc.get("port"), where),
            service=str(grpc.get("service") or ""),
            timeout=timeout,
        )
    raise ProbeConfigError(f"{where}: expected httpGet, tcpSocket or grpc")


def parse_app_probes(text: str) -> dict[str, dict[str, Probe]]:
    """`{"<container>": {"livez"|"readyz"|"startupz": <k8s probe>}}` -> probes."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ProbeConfigError(f"SYNCHRO_APP_PROBES is not JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ProbeConfigError("SYNCHRO_APP_PROBES must be an object of containers")
    out: dict[str, dict[str, Probe]] = {}
    for container, kinds in raw.items():
        if not isinstance(kinds, Mapping):
            raise ProbeConfigError(f"{container}: expected an object of probes")
        for kind, spec in kinds.items():
            if kind not in PROBE_KINDS:
                raise ProbeConfigError(
                    f"{container}: unknown probe {kind!r}; expected one of {PROBE_KINDS}"
                )
            out.setdefault(str(container), {})[kind] = parse_probe(spec, f"{container}/{kind}")
    return out


# -- running probes ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str


async def run_probe(probe: Probe) -> ProbeResult:
    try:
        async with asyncio.timeout(probe.timeout):
            if isinstance(probe, HttpGetProbe):
                return await _http_probe(probe)
            if isinstance(probe, TcpProbe):
                _, writer = await asyncio.open_connection(probe.host, probe.port)
                writer.close()
                return ProbeResult(True, f"tcp {probe.host}:{probe.port} connected")
            return await _grpc_probe(probe)
    except TimeoutError:
        return ProbeResult(False, f"timed out after {probe.timeout:g}s")
    except (OSError, ValueError, IndexError, h2.exceptions.H2Error) as exc:
        return ProbeResult(False, f"{type(exc).__name__}: {exc}")


class _StatusLine:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def on_headers_complete(self) -> None:
        self.done = True


async def _http_probe(probe: HttpGetProbe) -> ProbeResult:
    context: ssl.SSLContext | None = None
    if probe.scheme == "HTTPS":
        # The kubelet does not verify the app's certificate either.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(probe.host, probe.port, ssl=context)
    try:
        names = {name.lower() for name, _ in probe.headers}
        lines = [f"GET {probe.path} HTTP/1.1"]
        if "host" not in names:
            lines.append(f"Host: {Address(probe.host, probe.port)}")
        if "user-agent" not in names:
            lines.append("User-Agent: kube-probe/synchro")
        if "accept" not in names:
            lines.append("Accept: */*")
        lines += [f"{name}: {value}" for name, value in probe.headers]
        lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        state = _StatusLine()
        parser = httptools.HttpResponseParser(state)
        while not state.done:
            data = await reader.read(16384)
            if not data:
                raise ValueError("connection closed before the response headers")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise ValueError(f"malformed response: {exc}") from exc
        code = parser.get_status_code()
        return ProbeResult(200 <= code < 400, f"http {probe.path} answered {code}")
    finally:
        writer.close()


# grpc.health.v1.HealthCheckRequest {string service = 1} and HealthCheckResponse
# {ServingStatus status = 1}: two one-field messages, so a few lines of protobuf
# wire format spare the proxy a protobuf runtime (grpcio is only a dev dependency).
_SERVING: Final = 1
_STATUS_NAMES: Final = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_health_request(service: str) -> bytes:
    raw = service.encode()
    message = (b"\x0a" + _varint(len(raw)) + raw) if raw else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def decode_health_status(body: bytes) -> int:
    """The `status` field of a length-prefixed HealthCheckResponse (0 if absent)."""
    if len(body) < 5 or body[0] != 0:
        raise ValueError("not an uncompressed gRPC message")
    message = body[5 : 5 + int.from_bytes(body[1:5], "big")]
    pos, status = 0, 0
    while pos < len(message):
        key = message[pos]
        pos += 1
        value, shift = 0, 0
        if key & 0x07 != 0:  # only varint fields are expected here
            raise ValueError("unexpected field in HealthCheckResponse")
        while True:
            byte = message[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if key >> 3 == 1:
            status = value
    return status


async def _grpc_probe(probe: GrpcProbe) -> ProbeResult:
    reader, writer = await asyncio.open_connection(probe.host, probe.port)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/grpc.health.v1.Health/Check"),
                (":authority", str(Address(probe.host, probe.port))),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(stream, encode_health_request(probe.service), end_stream=True)
        writer.write(conn.data_to_send())
        body = b""
        headers: dict[str, str] = {}
        ended = False
        while not ended:
            data = await reader.read(65536)
            if not data:
                raise ValueError("connection closed before the gRPC response ended")
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers.update((_s(k), _s(v)) for k, v in event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise ValueError(f"gRPC stream ended abnormally: {event}")
            writer.write(conn.data_to_send())
        grpc_status = headers.get("grpc-status", "")
        if grpc_status != "0":
            return ProbeResult(
                False,
                f"grpc-status {grpc_status or 'missing'} {headers.get('grpc-message', '')}".strip(),
            )
        status = decode_health_status(body)
        name = _STATUS_NAMES.get(status, str(status))
        return ProbeResult(status == _SERVING, f"grpc health {name}")
    finally:
        writer.close()


def _s(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


# -- the status routes -----------------------------------------------------------


Exposition = Callable[[str], tuple[bytes, str]]
"""The scraper's Accept header -> (metrics body, content type)."""


class StatusApp:
    """Routes of the status port. `not_ready()` returns why not, or None when ready;
    `metrics` renders `/metrics` (404 without it)."""

    def __init__(
        self,
        not_ready: Callable[[], str | None],
        probes: AppProbes,
        metrics: Exposition | None = None,
    ) -> None:
        self.not_ready = not_ready
        self.probes = probes
        self.metrics = metrics

    async def route(
        self, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        if method not in ("GET", "HEAD"):
            return Response.text(405, "only GET")
        if path == "/metrics" and self.metrics is not None:
            body, content_type = self.metrics((headers or {}).get("accept", ""))
            return Response(200, body, content_type)
        if path == "/healthz/ready":
            reason = self.not_ready()
            return Response.text(503, reason) if reason else Response.text(200, "ready")
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "app-health":
            return await self._app_health(parts[2], parts[3])
        return Response.text(404, f"no such path {path}")

    async def _app_health(self, container: str, kind: str) -> Response:
        probe = self.probes.get(container, {}).get(kind)
        if probe is None:
            return Response.text(404, f"no {kind} probe for container {container!r}")
        result = await run_probe(probe)
        if not result.ok:
            log.info("app-health %s/%s failed: %s", container, kind, result.detail)
        return Response.text(200 if result.ok else 503, result.detail)
