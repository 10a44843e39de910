"""The telemetry facade the protocol handlers call: one call when a request
starts, one when it ends.

    rec, trace_headers = ctx.telemetry.begin(
        downstream.direction, "http", request_headers,
        method=b"GET", authority=b"catalog:8080", path=b"/items?id=1",
        http_version="1.1", peer=downstream.peer,
    )
    headers = replace_trace_headers(request_headers, trace_headers)  # forward these
    ...                                   # proxy the request; then fill in the outcome:
    rec.status = 200; rec.response_bytes = n; rec.flags = flags.render(...)
    ctx.telemetry.end(rec)                # metrics, access log, span

`end` feeds one `RequestRecord` to the metrics, the access log and (when the
trace is sampled) the span exporter, so the three always agree. Nothing here
blocks: spans leave through `SpanExporter`'s bounded queue.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Final, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from proxy.conn import Address, Direction
from proxy.headers import PEER_WORKLOAD
from proxy.telemetry.accesslog import ACCESS_LOGGER, FORMATS, AccessLog
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.propagation import INVALID_SPAN, INVALID_TRACE, extract, inject, sample
from proxy.telemetry.record import RequestRecord
from proxy.telemetry.selfmetrics import LagWindow, SelfCollector, watch_loop_lag
from proxy.telemetry.tracing import (
    HttpSender,
    OtlpEndpoint,
    ResourceInfo,
    SpanExporter,
    TracingError,
    parse_endpoint,
)

log = logging.getLogger(__name__)

Header = tuple[bytes, bytes]
TRACE_HEADER_NAMES: Final = frozenset(
    {
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)
_REQUEST_ID: Final = b"x-request-id"
_USER_AGENT: Final = b"user-agent"
_CONTENT_TYPE: Final = b"content-type"
_HOST: Final = b"host"
_INTERESTING: Final = TRACE_HEADER_NAMES | {_REQUEST_ID, _USER_AGENT, _CONTENT_TYPE, _HOST}
_TRACING_FIELDS: Final = TRACE_HEADER_NAMES | {_CONTENT_TYPE}
_NAME: Final = operator.itemgetter(0)  # a header's name
_LOWER: Final = bytes.lower
_perf_counter: Final = time.perf_counter
_OUTBOUND_NAMES: Final = frozenset({"source", "outbound"})
# Every name `begin` may return (so a request without any of them keeps all its fields).
_REPLACEABLE: Final = TRACE_HEADER_NAMES | {_REQUEST_ID}
_LOW56: Final = (1 << 56) - 1  # the trace id bits that decide sampling

# Metadata exchange, the small part of Istio's that metrics need: the caller's
# sidecar names its workload to the callee's sidecar in this request field, so
# that inbound records carry `source_workload` (the verified mTLS identity only
# names a ServiceAccount, which many workloads may share, and a controller-side
# principal -> workload map would be ambiguous for exactly those). It is sent
# only on mesh mTLS connections (never to a plaintext or non-mesh upstream),
# believed only from a caller with a verified identity and only when it occurs
# once (an app that sets it too gets none), and always removed before the app
# sees the request. Opaque TCP has no such field: there the label stays empty.
_PEER_WORKLOAD_LEN: Final = len(PEER_WORKLOAD)
_WORKLOAD_VALUE: Final = re.compile(rb"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: object = None) -> object: ...


class TelemetryError(ValueError):
    """A telemetry setting (flag or environment) the proxy cannot use."""


# -- settings -------------------------------------------------------------------

# Kubernetes' name suffixes come from this alphabet (no vowels, no 0/1/3).
_K8S_ALPHABET: Final = frozenset("bcdfghjklmnpqrstvwxz2456789")


def workload_name(pod: str) -> str:
    """The owner's name from a Pod's name: `reviews-v1-7f9c8d6b5-x2x9z` ->
    `reviews-v1` (Deployment), `db-0` -> `db` (StatefulSet), `agent-x2x9z` ->
    `agent` (DaemonSet, Job)."""
    parts = pod.split("-")
    if len(parts) > 1 and parts[-1].isdigit():
        return "-".join(parts[:-1])
    if len(parts) > 1 and len(parts[-1]) == 5 and set(parts[-1]) <= _K8S_ALPHABET:
        parts.pop()
        if len(parts) > 1 and 6 <= len(parts[-1]) <= 10 and set(parts[-1]) <= _K8S_ALPHABET:
            parts.pop()
    return "-".join(parts)


def _flag(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise TelemetryError(f"{name}: {value!r}: expected on or off")


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    metrics: bool = True
    access_log: str = "off"  # off | json | text
    trace_sampling: float = 1.0  # percent of new traces
    otlp_endpoint: str = ""  # OTLP/HTTP traces URL; empty: no tracing
    workload: str = ""
    namespace: str = ""
    principal: str = ""  # this proxy's SPIFFE ID
    pod: str = ""
    span_queue_size: int = 2048
    span_batch_size: int = 512
    span_flush_interval: float = 1.0
    # Why tracing is off although an endpoint was configured (logged at start).
    endpoint_error: str = ""

    def __post_init__(self) -> None:
        if self.access_log not in FORMATS:
            raise TelemetryError(
                f"access log {self.access_log!r}: expected one of {', '.join(FORMATS)}"
            )
        if not 0.0 <= self.trace_sampling <= 100.0:
            raise TelemetryError(f"trace sampling {self.trace_sampling:g}: expected 0-100 percent")
        if self.otlp_endpoint:
            try:
                parse_endpoint(self.otlp_endpoint)
            except TracingError as exc:
                raise TelemetryError(str(exc)) from None
        if self.span_queue_size < 1 or self.span_batch_size < 1 or self.span_flush_interval <= 0:
            raise TelemetryError("span queue size, batch size and flush interval must be positive")

    @property
    def endpoint(self) -> OtlpEndpoint | None:
        return parse_endpoint(self.otlp_endpoint) if self.otlp_endpoint else None

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        metrics: str | None = None,
        access_log: str | None = None,
        trace_sampling: str | None = None,
        otlp_endpoint: str | None = None,
    ) -> TelemetrySettings:
        """Flags (the keyword arguments, None when not given) win over the
        webhook's environment, which wins over the defaults. Pure.

        A malformed collector URL from the environment (the mesh-wide
        `tracingEndpoint`) turns tracing off and says why in `endpoint_error`
        rather than stopping every proxy of the mesh; a bad flag is an error."""

        def pick(flag: str | None, name: str, default: str) -> str:
            if flag is not None:
                return flag
            value = env.get(name, "").strip()
            return value or default

        sampling_text = pick(trace_sampling, "SYNCHRO_TRACE_SAMPLING", "1")
        try:
            sampling = float(sampling_text)
        except ValueError:
            raise TelemetryError(
                f"trace sampling {sampling_text!r}: expected a percentage such as 1 or 2.5"
            ) from None
        pod = env.get("POD_NAME", "").strip()
        namespace = env.get("POD_NAMESPACE", "").strip()
        account = env.get("SERVICE_ACCOUNT", "").strip()
        domain = env.get("SYNCHRO_TRUST_DOMAIN", "").strip() or "cluster.local"
        principal = (
            f"spiffe://{domain}/ns/{namespace}/sa/{account}" if namespace and account else ""
        )
        endpoint = pick(otlp_endpoint, "SYNCHRO_OTLP_ENDPOINT", "")
        endpoint_error = ""
        if endpoint and otlp_endpoint is None:
            try:
                parse_endpoint(endpoint)
            except TracingError as exc:
                endpoint, endpoint_error = "", f"tracing off: {exc}"
        return cls(
            metrics=_flag(pick(metrics, "SYNCHRO_METRICS", "on"), "metrics"),
            access_log=pick(access_log, "SYNCHRO_ACCESS_LOG", "off").lower(),
            trace_sampling=sampling,
            otlp_endpoint=endpoint,
            endpoint_error=endpoint_error,
            workload=env.get("SYNCHRO_WORKLOAD", "").strip() or workload_name(pod),
            namespace=namespace,
            principal=principal,
            pod=pod,
        )

    def dump(self) -> dict[str, object]:
        return {
            "metrics": self.metrics,
            "access_log": self.access_log,
            "trace_sampling": self.trace_sampling,
            "otlp_endpoint": self.otlp_endpoint or None,
            "endpoint_error": self.endpoint_error or None,
            "workload": self.workload,
            "namespace": self.namespace,
            "principal": self.principal,
        }


def setup_access_logger(stream: IO[str] | None = None) -> None:
    """Access lines go to stdout, bare, whatever the proxy's own log level."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if any(getattr(h, "_synchro_access", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._synchro_access = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _decoded(found: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in found.items()}


def replace_trace_headers(headers: list[Header], trace_headers: list[Header]) -> list[Header]:
    """`headers` without the incoming trace fields, plus `trace_headers` (what
    `Telemetry.begin` returned). The same list when there is nothing to add."""
    if not trace_headers:
        return headers
    # What may go: the incoming trace fields, and x-request-id when `begin` made one.
    drop = (
        TRACE_HEADER_NAMES
        if TRACE_HEADER_NAMES.issuperset(map(_NAME, trace_headers))
        else _REPLACEABLE
    )
    if drop.isdisjoint(map(_LOWER, map(_NAME, headers))):
        return headers + trace_headers  # nothing to drop: the common case
    replaced = {name for name, _ in trace_headers}
    # The received tuples themselves: an hpack NeverIndexedHeaderTuple must stay
    # never-indexed on the next hop (RFC 7541 7.1.3).
    kept = [
        field
        for field in headers
        if (lowered := field[0].lower()) not in TRACE_HEADER_NAMES and lowered not in replaced
    ]
    return kept + trace_headers


# -- the facade -----------------------------------------------------------------


class Telemetry:
    """Per-process telemetry: metrics registry, access log and span exporter.

    `Telemetry.disabled()` (the `ProxyContext` default) records nothing and
    costs one small object per request.
    """

    def __init__(
        self,
        settings: TelemetrySettings | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        send: Callable[[bytes], None] | None = None,
    ) -> None:
        self.settings = settings = settings or TelemetrySettings()
        self._rng = rng or random.Random()
        self._clock = clock
        self.registry = CollectorRegistry()
        # Always there, so that other parts can count (retries, ejections, config
        # version) without checking; `settings.metrics` decides the per-request series.
        self.metrics = ProxyMetrics(self.registry)
        self._observe = settings.metrics
        self.lag = LagWindow()
        self.open_connections: Callable[[], int] | None = None
        self.registry.register(SelfCollector(self.lag, lambda: self._open_connections()))
        self.access_log = AccessLog(settings.access_log) if settings.access_log != "off" else None
        self.exporter: SpanExporter | None = None
        endpoint = settings.endpoint
        if endpoint is not None:
            metrics = self.metrics
            self.exporter = SpanExporter(
                send or HttpSender(endpoint),
                ResourceInfo(
                    service_name=settings.workload or "synchro-proxy",
                    namespace=settings.namespace,
                    pod=settings.pod,
                    workload=settings.workload,
                ),
                queue_size=settings.span_queue_size,
                batch_size=settings.span_batch_size,
                flush_interval=settings.span_flush_interval,
                on_dropped=metrics.spans_dropped.inc,
                on_exported=metrics.spans_exported.inc,
            )
        self._tracing = self.exporter is not None
        # The request fields `begin` reads: what tracing and the headers need, plus
        # Host and User-Agent when every request is logged.
        self._wanted = _INTERESTING if self.access_log is not None else _TRACING_FIELDS
        self._percent = settings.trace_sampling
        # `propagation.sample` for a new trace, precomputed: the low 56 bits of the
        # trace id below this threshold mean sampled.
        self._threshold = (
            1 << 57
            if self._percent >= 100.0
            else -1
            if self._percent <= 0.0
            else int(self._percent / 100.0 * (1 << 56))
        )
        # Headers are read only when something uses what they carry.
        self._scan = self._tracing or self.access_log is not None
        self._enabled = self._scan or self._observe
        self._lag_task: asyncio.Task[None] | None = None
        self._failures = 0
        # What this proxy tells an mTLS upstream about itself (PEER_WORKLOAD).
        workload = settings.workload.encode("ascii", "replace")
        ok = bool(_WORKLOAD_VALUE.fullmatch(workload))
        self._peer_field: Header | None = (PEER_WORKLOAD, workload) if ok else None
        self._peer_line = PEER_WORKLOAD + b": " + workload + b"\r\n" if ok else b""
        # Who an address is (service, workload, namespace, SPIFFE ID), from the
        # pushed endpoints; the security runtime sets it (see `describe_destination`).
        self.describe_upstream: Callable[[str], tuple[str, str, str, str] | None] | None = None

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls(TelemetrySettings(metrics=False))

    def _open_connections(self) -> int:
        return self.open_connections() if self.open_connections is not None else 0

    # -- lifecycle (the process adapter calls these) ---------------------------

    def start(self) -> None:
        """Start the exporter thread and the loop-lag watch (on the running loop)."""
        if self.exporter is not None:
            self.exporter.start()
        if self._lag_task is None:
            self._lag_task = asyncio.get_running_loop().create_task(watch_loop_lag(self.lag))

    async def aclose(self, timeout: float = 2.0) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            self._lag_task = None
        if self.exporter is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.exporter.close, timeout)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The `/metrics` body and its content type: OpenMetrics when the
        scraper's Accept asks for it, else Prometheus text 0.0.4."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- per request -----------------------------------------------------------

    def begin(
        self,
        direction: Direction | str,
        protocol: str,
        headers: Sequence[Header] = (),
        *,
        method: str | bytes = "",
        authority: str | bytes = "",
        path: str | bytes = "",
        http_version: str = "1.1",
        peer: Address | str | None = None,
        destination_service: str = "",
    ) -> tuple[RequestRecord, list[Header]]:
        """A record for one request and the trace headers to forward with it.

        `direction`: `Direction.OUTBOUND` (we report as "source", the span is a
        client span) or `Direction.INBOUND` ("destination", server span).
        `protocol`: "http" or "grpc"; "http" with `content-type: application/grpc`
        is counted as gRPC. `headers`: the request's fields as received.
        The returned headers replace the request's trace fields (see
        `replace_trace_headers`); they also carry `x-request-id` when the
        request had none and something records it.
        """
        rec = self._record(direction, protocol, destination_service)
        if not self._enabled:
            return rec, []
        rec.http_version = http_version
        if not self._scan:
            # Metrics only: method, authority, path and peer feed only the access
            # log and spans, so they are not even decoded.
            if protocol == "http" and _CONTENT_TYPE in map(_LOWER, map(_NAME, headers)):
                for name, value in headers:
                    if len(name) == 12 and name.lower() == _CONTENT_TYPE:
                        if value.startswith(b"application/grpc"):
                            rec.protocol = "grpc"
                        break
            return rec, []
        out = self._read_headers(rec, headers)
        if rec.sampled or self.access_log is not None:
            rec.method = method.decode("latin-1") if isinstance(method, bytes) else method
            if authority:  # else the Host field's, from _read_headers
                rec.authority = _text(authority)
            rec.path = path.decode("latin-1") if isinstance(path, bytes) else path
            if peer is not None:
                rec.peer_address = str(peer)
        return rec, out

    def note_peer(
        self,
        rec: RequestRecord,
        peer_identity: str | None,
        upstream: Address | None = None,
        local: Address | None = None,
    ) -> None:
        """On the inbound side, record who called over mTLS (the verified SPIFFE
        ID) and that the connection was mutual TLS; plaintext callers stay unknown.
        `upstream`: where the request goes (the app); `local`: the address the
        caller dialled (this Pod's IP and port), which names the Service."""
        if rec.reporter != "destination":
            return
        if upstream is not None and self._enabled:
            rec.upstream_host = str(upstream)
        if local is not None and not rec.destination_service and self.describe_upstream:
            found = self.describe_upstream(str(local))
            if found is not None:
                rec.destination_service = found[0]
        if not peer_identity:
            return
        rec.source_principal = peer_identity
        rec.security_policy = "mutual_tls"
        parts = peer_identity.split("/")
        if "ns" in parts and parts.index("ns") + 1 < len(parts):
            rec.source_namespace = parts[parts.index("ns") + 1]

    def take_peer_workload(
        self, rec: RequestRecord, peer_identity: str | None, headers: list[Header]
    ) -> list[Header]:
        """Inbound: `headers` without PEER_WORKLOAD; its value becomes
        `rec.source_workload` when the caller proved an identity over mTLS."""
        found: list[bytes] = []
        for name, value in headers:
            if len(name) == _PEER_WORKLOAD_LEN and name.lower() == PEER_WORKLOAD:
                found.append(value)
        if not found:
            return headers
        if (
            peer_identity
            and len(found) == 1
            and rec.reporter == "destination"
            and _WORKLOAD_VALUE.fullmatch(found[0])
        ):
            rec.source_workload = found[0].decode("ascii")
        return [  # the tuples themselves: never-indexed fields stay so (RFC 7541 7.1.3)
            field
            for field in headers
            if not (len(field[0]) == _PEER_WORKLOAD_LEN and field[0].lower() == PEER_WORKLOAD)
        ]

    def _names_us(self, transport: _HasExtraInfo | None) -> bool:
        # Mesh mTLS is the only TLS a sidecar originates: app TLS passes as TCP.
        return (
            self._peer_field is not None
            and transport is not None
            and transport.get_extra_info("ssl_object") is not None
        )

    def tag_http1(self, pieces: list[bytes], transport: _HasExtraInfo | None) -> list[bytes]:
        """Outbound HTTP/1: `pieces` (a request whose first four pieces are the
        request line) with PEER_WORKLOAD after the request line when `transport`
        is mesh mTLS; else `pieces` unchanged."""
        if not self._names_us(transport):
            return pieces
        return [*pieces[:4], self._peer_line, *pieces[4:]]

    def tag_http2(self, headers: list[Header], transport: _HasExtraInfo | None) -> list[Header]:
        """Outbound HTTP/2: over mesh mTLS, `headers` without any PEER_WORKLOAD the
        app wrote, plus ours (when this proxy has a usable workload name); else
        `headers` unchanged (a plaintext callee never believes the field)."""
        if transport is None or transport.get_extra_info("ssl_object") is None:
            return headers
        # HTTP/2 field names are lowercase (proxy.h2headers checks it).
        kept = [field for field in headers if field[0] != PEER_WORKLOAD]
        if self._peer_field is not None:
            kept.append(self._peer_field)
        return kept

    def describe_destination(self, rec: RequestRecord) -> None:
        """Outbound: the destination's workload, namespace and principal from the
        endpoint the request went to (the controller's view of that Pod)."""
        if not rec.upstream_host or self.describe_upstream is None:
            return
        found = self.describe_upstream(rec.upstream_host)
        if found is not None:
            service, rec.destination_workload, rec.destination_namespace, principal = found
            rec.destination_principal = principal
            if not rec.destination_service:
                rec.destination_service = service

    def _record(self, direction: Direction | str, protocol: str, service: str) -> RequestRecord:
        if direction is Direction.OUTBOUND:
            outbound = True
        elif direction is Direction.INBOUND:
            outbound = False
        else:
            outbound = direction in _OUTBOUND_NAMES
        rec = RequestRecord("source" if outbound else "destination", protocol, self._clock())
        if not self._enabled:
            return rec
        rec.mono_start = _perf_counter()
        rec.destination_service = service
        s = self.settings
        if outbound:
            rec.source_workload = s.workload
            rec.source_namespace = s.namespace
            rec.source_principal = s.principal
        else:
            rec.destination_workload = s.workload
            rec.destination_namespace = s.namespace
            rec.destination_principal = s.principal
        return rec

    def _read_headers(self, rec: RequestRecord, headers: Sequence[Header]) -> list[Header]:
        # Raw bytes, decoded only where something uses them. Host and User-Agent
        # matter only to a recorded request (sampled span, access log): the access
        # log reads them here, a sampled span in `_recorded` (1% of requests).
        found: dict[bytes, bytes] | None = None
        wanted = self._wanted
        # Most requests carry none of them: names lowered and looked up in C first.
        if not wanted.isdisjoint(map(_LOWER, map(_NAME, headers))):
            found = {}
            for name, value in headers:
                lowered = name.lower()
                if lowered in wanted:
                    found[lowered] = value
        parent = None
        b3 = None
        if found is not None:
            ctype = found.get(_CONTENT_TYPE)
            if (
                ctype is not None
                and rec.protocol == "http"
                and ctype.startswith(b"application/grpc")
            ):
                rec.protocol = "grpc"
            given_id = found.get(_REQUEST_ID)
            if given_id is not None:
                rec.request_id = given_id.decode("latin-1")
            if not TRACE_HEADER_NAMES.isdisjoint(found):
                parent = extract(_decoded(found))
                # B3 apps keep getting B3 at every hop, next to W3C.
                b3 = "b3" if b"b3" in found else "b3multi" if b"x-b3-traceid" in found else None
                if given_id is None:  # not among `wanted` without the access log
                    for name, value in headers:
                        if name.lower() == _REQUEST_ID:
                            rec.request_id = value.decode("latin-1")
        if not self._tracing:
            if parent is not None:
                rec.trace_id = parent.trace_id
            return self._recorded(rec, headers, found)  # the access log is on
        # A span id for every request, a trace id and the sampling decision for
        # a new trace: one draw and one hex conversion (what
        # `propagation.new_trace_id`, `new_span_id` and `sample` would say).
        bits = self._rng.getrandbits(192)
        hexed = bits.to_bytes(24, "big").hex()
        span_id = hexed[32:]
        if span_id == INVALID_SPAN:
            span_id = _ONE_SPAN
        rec.span_id = span_id
        if parent is None:
            trace_id = hexed[:32]
            low = (bits >> 64) & _LOW56
            if trace_id == INVALID_TRACE:
                trace_id, low = _ONE_TRACE, 1
            rec.trace_id = trace_id
            if low >= self._threshold and self.access_log is None:
                # Not sampled, nothing records it: the common case, in a straight line.
                return [(b"traceparent", f"00-{trace_id}-{span_id}-00".encode())]
            rec.sampled = low < self._threshold
        else:
            rec.trace_id = parent.trace_id
            rec.parent_span_id = parent.span_id
            rec.tracestate = parent.tracestate
            rec.sampled = sample(parent, rec.trace_id, self._percent)
        out = self._recorded(rec, headers, found)
        if b3 is None and not rec.tracestate:
            flags = "01" if rec.sampled else "00"
            out.append((b"traceparent", f"00-{rec.trace_id}-{rec.span_id}-{flags}".encode()))
            return out
        out += [
            (name.encode(), value.encode("latin-1"))
            for name, value in inject(
                rec.trace_id,
                rec.span_id,
                rec.sampled,
                tracestate=rec.tracestate,
                incoming_fmt=b3,
            )
        ]
        return out

    def _recorded(
        self, rec: RequestRecord, headers: Sequence[Header], found: dict[bytes, bytes] | None
    ) -> list[Header]:
        """A request the access log or a sampled span records: its request id
        (added to the headers when it had none), Host and User-Agent."""
        if not rec.sampled and self.access_log is None:
            return []
        if self.access_log is None:  # sampled: `found` lacks Host, User-Agent, x-request-id
            found = dict(found or ())
            for name, value in headers:
                lowered = name.lower()
                if lowered in (_HOST, _USER_AGENT, _REQUEST_ID):
                    found[lowered] = value
        found = found or {}
        out: list[Header] = []
        if not rec.request_id and _REQUEST_ID in found:
            rec.request_id = found[_REQUEST_ID].decode("latin-1")
        if not rec.request_id:
            # Else the HTTP/1 adapter adds one (HTTP/2's always has one by now):
            # nothing here would use it.
            rec.request_id = _uuid4(self._rng)
            out.append((_REQUEST_ID, rec.request_id.encode()))
        if not rec.authority and _HOST in found:  # HTTP/1 names it in Host
            rec.authority = found[_HOST].decode("latin-1")
        if rec.sampled and _USER_AGENT in found:
            rec.extra["user_agent"] = found[_USER_AGENT].decode("latin-1")
        return out

    def end(self, rec: RequestRecord) -> None:
        """The request is over (answered, failed or reset): record it once."""
        if not self._enabled:
            return
        try:
            if rec.mono_start and not rec.duration:
                rec.duration = _perf_counter() - rec.mono_start
            # Not for TCP: its opened count was labelled before the endpoint was picked.
            if rec.reporter == "source" and self.describe_upstream and rec.protocol != "tcp":
                self.describe_destination(rec)
            if self._observe:
                if rec.protocol == "tcp":
                    self.metrics.observe_tcp(rec, opened=False)
                else:
                    self.metrics.observe_request(rec)
            if self.access_log is not None:
                self.access_log.emit(rec)
            if rec.sampled and self.exporter is not None:
                self.exporter.submit(rec)
        except Exception:  # telemetry must never fail a request
            self._failures += 1
            if self._failures <= 3:
                log.exception("telemetry: recording a request failed")

    # -- per TCP connection ----------------------------------------------------

    def tcp_open(
        self,
        direction: Direction | str,
        *,
        peer: Address | str | None = None,
        upstream_host: Address | str | None = None,
        destination_service: str = "",
        peer_identity: str | None = None,
        local: Address | None = None,
    ) -> RequestRecord:
        """A record for an opaque TCP connection; counts it opened. The peer's
        mTLS identity labels both the opened and the closed counts; `local` (the
        address dialled, inbound) names the destination Service."""
        rec = self._record(direction, "tcp", destination_service)
        self.note_peer(rec, peer_identity, local=local)
        if peer is not None:
            rec.peer_address = str(peer)
        if upstream_host is not None:
            rec.upstream_host = str(upstream_host)
        if self._observe:
            self.metrics.observe_tcp(rec, opened=True)
        return rec

    def tcp_close(self, rec: RequestRecord) -> None:
        """The connection closed: `rec.request_bytes` (from downstream) and
        `rec.response_bytes` (to downstream) should hold the byte counts."""
        rec.protocol = "tcp"
        self.end(rec)


_UUID_VERSION_MASK: Final = ~((0xF << 76) | (0xC << 60))
_UUID_VERSION_4: Final = (0x4 << 76) | (0x8 << 60)
_ONE_TRACE: Final = f"{1:032x}"  # an all-zero id is invalid: propagation's `or 1`
_ONE_SPAN: Final = f"{1:016x}"


def _uuid4(rng: random.Random) -> str:
    """x-request-id as a version 4 UUID, from the proxy's (non-crypto) rng."""
    h = f"{(rng.getrandbits(128) & _UUID_VERSION_MASK) | _UUID_VERSION_4:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
