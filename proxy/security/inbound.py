"""Inbound mTLS, peer identity, authorization and XFCC.

The inbound listener calls `admit(downstream, ctx)` after detection. By the
PeerAuthentication mode of the destination port (`MeshSecurity.mode_for`):

| mode       | plaintext | mesh TLS (synchro-* ALPN) | other TLS (the app's own) |
|------------|-----------|---------------------------|---------------------------|
| STRICT     | reset     | terminate mTLS            | terminate mTLS (no mesh cert: refused) |
| PERMISSIVE | as usual  | terminate mTLS            | opaque TCP to the app     |
| DISABLE    | as usual  | opaque TCP to the app     | opaque TCP to the app     |

Terminating means: the server context (TLS 1.2 at least) verifies the client's
chain against the trust bundle; the client's SPIFFE ID becomes
`Downstream.peer_identity`; the inner protocol comes from the ALPN (or from the
first decrypted bytes). Every refusal is one log line saying who and why.
Opaque TCP connections are then checked against the AuthorizationPolicies
(`authorize_tcp`, closed on deny); HTTP handlers call `authorize` per request
and put `xfcc_value(...)` in `x-forwarded-client-cert`, replacing whatever the
client sent (`set_xfcc`).

Where HTTP handlers call this (inbound direction only, before routing):

    decision = inbound.authorize(ctx, ds, method, path, host, headers)
    if isinstance(decision, authz.Deny): answer 403 (inbound.DENIED_BODY)
    headers = inbound.set_xfcc(headers, inbound.xfcc_value(ctx, ds))
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import ssl
import struct
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Final, cast

import uvloop

from proxy import detect
from proxy.conn import Downstream, Protocol, ProxyContext
from proxy.engine import Reply
from proxy.security import authz, tls, tlsstream
from proxy.security.runtime import DISABLE, STRICT, MeshSecurity, security_for
from proxy.tcp import reset
from proxy.traffic.flags import Flag

log = logging.getLogger(__name__)

XFCC: Final = b"x-forwarded-client-cert"
DENIED_BODY: Final = "RBAC: access denied"
HANDSHAKE_TIMEOUT: Final = 10.0
MAX_CLIENT_HELLO: Final = 64 * 1024
_DETECT_READ: Final = 64 * 1024


class InboundRefused(Exception):
    """A connection the inbound side will not take (the message says why)."""


# --- pure cores --------------------------------------------------------------------


class Action(enum.Enum):
    PLAINTEXT = "plaintext"  # hand on as detected
    TERMINATE = "terminate"  # mTLS handshake, then the inner protocol
    OPAQUE = "opaque"  # TLS we do not terminate: bytes to the app
    REFUSE = "refuse"  # reset


def inbound_action(mode: str, is_tls: bool, mesh_alpn: bool) -> tuple[Action, str]:
    """What to do with a connection to a port in `mode` (pure)."""
    if not is_tls:
        if mode == STRICT:
            return Action.REFUSE, "plaintext to a STRICT mTLS port"
        return Action.PLAINTEXT, ""
    if mode == DISABLE:
        return Action.OPAQUE, "mTLS disabled on this port"
    if mesh_alpn or mode == STRICT:
        return Action.TERMINATE, ""
    return Action.OPAQUE, "TLS without a mesh ALPN (the application's own TLS)"


class NeedMore(enum.Enum):
    NEED_MORE = "need-more"


NEED_MORE: Final = NeedMore.NEED_MORE


def client_hello_alpn(data: bytes) -> list[str] | NeedMore:
    """The ALPN protocols a TLS ClientHello offers ([] when none, or when the
    bytes are not a ClientHello we can read), or NEED_MORE. Reads the first
    handshake record only, which is where every real client puts its hello."""
    if len(data) < 5:
        return NEED_MORE
    if data[0] != 0x16:
        return []
    (record_len,) = struct.unpack_from("!H", data, 3)
    if len(data) < 5 + record_len:
        return NEED_MORE if 5 + record_len <= MAX_CLIENT_HELLO else []
    body = data[5 : 5 + record_len]
    try:
        if body[0] != 0x01:  # ClientHello
            return []
        p = 4 + 2 + 32  # handshake header, version, random
        p += 1 + body[p]  # session id
        (n,) = struct.unpack_from("!H", body, p)
        p += 2 + n  # cipher suites
        p += 1 + body[p]  # compression methods
        (ext_total,) = struct.unpack_from("!H", body, p)
        p += 2
        end = min(len(body), p + ext_total)
        while p + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, p)
            p += 4
            if ext_type == 16:  # application_layer_protocol_negotiation
                (list_len,) = struct.unpack_from("!H", body, p)
                q, out = p + 2, []
                while q < p + 2 + list_len:
                    n = body[q]
                    out.append(body[q + 1 : q + 1 + n].decode("ascii", "replace"))
                    q += 1 + n
                return out
            p += ext_len
    except (IndexError, struct.error):
        return []
    return []


def inner_protocol(alpn: str | None) -> Protocol | None:
    """The inner protocol a mesh ALPN names; None when it names none (detect)."""
    name = tls.PROTOCOL_BY_ALPN.get(alpn or "")
    if name is None:
        return None
    return Protocol(name)


def principal_of(spiffe_id: str | None) -> tuple[str | None, str | None]:
    """(principal without spiffe://, namespace) as AuthorizationPolicy sees them."""
    if not spiffe_id:
        return None, None
    principal = spiffe_id.removeprefix("spiffe://")
    parts = principal.split("/")
    namespace = parts[2] if len(parts) >= 5 and parts[1] == "ns" and parts[3] == "sa" else None
    return principal, namespace


def xfcc(own_id: str | None, peer_id: str | None, cert_hash: str | None) -> str | None:
    """Envoy's x-forwarded-client-cert for what this hop verified (By, Hash, URI)."""
    if not peer_id:
        return None
    parts = []
    if own_id:
        parts.append(f"By={own_id}")
    if cert_hash:
        parts.append(f"Hash={cert_hash}")
    parts.append(f"URI={peer_id}")
    return ";".join(parts)


def set_xfcc(
    headers: Sequence[tuple[bytes, bytes]], value: str | bytes | None
) -> list[tuple[bytes, bytes]]:
    """Headers without any client-sent XFCC, plus ours when the peer is verified
    (Envoy's SANITIZE_SET: a client cannot claim an identity)."""
    out = [h for h in headers if h[0].lower() != XFCC]
    if value:
        out.append((XFCC, value.encode() if isinstance(value, str) else value))
    return out


# --- adapters ----------------------------------------------------------------------


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> type:
    if isinstance(loop, uvloop.Loop):
        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined,no-any-return]
    import asyncio.sslproto

    return asyncio.sslproto.SSLProtocol


async def terminate_tls(
    downstream: Downstream,
    context: ssl.SSLContext,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    half_close: bool = False,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Server-side TLS on an accepted connection whose first bytes detection
    already read (`downstream.preread`): they are fed to the TLS engine first.
    (`StreamWriter.start_tls` would lose them.) `half_close`: a transport that
    carries one (proxy.security.tlsstream), for opaque TCP."""
    loop = asyncio.get_running_loop()
    old_reader = downstream.reader
    # uvloop's transports are not asyncio.Transport subclasses, only alike.
    transport = cast(asyncio.Transport, downstream.writer.transport)
    transport.pause_reading()
    data = downstream.preread
    # Bytes the old reader buffered after detection belong to the handshake too.
    buffered = getattr(old_reader, "_buffer", None)
    if buffered:
        data += bytes(buffered)
        buffered.clear()
    reader = asyncio.StreamReader(limit=old_reader._limit, loop=loop)  # type: ignore[attr-defined]
    app_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    if half_close:
        app_transport = await tlsstream.accept(
            transport, context, app_protocol, data, timeout=timeout
        )
        return reader, asyncio.StreamWriter(app_transport, app_protocol, reader, loop)
    waiter = loop.create_future()
    ssl_protocol = _ssl_protocol_class(loop)(
        loop, app_protocol, context, waiter, True, None, True, timeout
    )
    transport.set_protocol(ssl_protocol)
    ssl_protocol.connection_made(transport)
    while data:
        buf = ssl_protocol.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        ssl_protocol.buffer_updated(n)
        data = data[n:]
    transport.resume_reading()
    await waiter
    writer = asyncio.StreamWriter(ssl_protocol._get_app_transport(), app_protocol, reader, loop)
    return reader, writer


async def _read_client_hello(downstream: Downstream, timeout: float) -> bytes:
    data = downstream.preread
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while client_hello_alpn(data) is NEED_MORE:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await downstream.reader.read(_DETECT_READ)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


async def _detect_inner(reader: asyncio.StreamReader, timeout: float) -> tuple[Protocol, bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data = b""
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await reader.read(_DETECT_READ)
        except TimeoutError:
            chunk = b""
        if not chunk:
            result = detect.detect(data, final=True)
            assert isinstance(result, detect.Detected)
            return result.protocol, data
        data += chunk
        result = detect.detect(data)
        if isinstance(result, detect.Detected):
            return result.protocol, data


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {type(exc).__name__}: {exc}"


async def admit(
    downstream: Downstream, ctx: ProxyContext, *, detect_timeout: float = 0.3
) -> Downstream | None:
    """The inbound decision for one accepted connection: the downstream to hand
    to a protocol handler (TLS terminated, with `peer_identity`), or None when
    the connection was refused (it is reset here, with a log line)."""
    security = security_for(ctx)
    if security is None:
        return downstream
    port = downstream.original_dst.port
    mode = security.mode_for(port)
    is_tls = downstream.protocol is Protocol.TLS
    offers_mesh = False
    offered: list[str] | NeedMore = []
    if is_tls and mode != DISABLE:
        downstream.preread = await _read_client_hello(downstream, max(detect_timeout, 1.0))
        offered = client_hello_alpn(downstream.preread)
        offers_mesh = isinstance(offered, list) and any(a in tls.PROTOCOL_BY_ALPN for a in offered)
    action, reason = inbound_action(mode, is_tls, offers_mesh)
    if action is Action.PLAINTEXT:
        return downstream
    if action is Action.OPAQUE:
        log.debug("inbound %s -> port %d: %s; passing through", downstream.peer, port, reason)
        return replace(downstream, protocol=Protocol.TCP)
    if action is Action.REFUSE:
        _refuse(downstream, port, mode, reason)
        return None
    material = security.material
    if material is None:
        _refuse(downstream, port, mode, "no workload certificate yet")
        return None
    # A sidecar offers one ALPN: synchro-tcp alone means opaque TCP, which
    # needs a TLS transport that carries a half-close.
    tcp_only = isinstance(offered, list) and [a for a in offered if a in tls.PROTOCOL_BY_ALPN] == [
        tls.mesh_alpn("tcp")
    ]
    try:
        reader, writer = await terminate_tls(downstream, material.server, half_close=tcp_only)
    except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
        _refuse(downstream, port, mode, _handshake_reason(exc))
        return None
    ssl_object = writer.get_extra_info("ssl_object")
    peer_id = tls.peer_spiffe_id(ssl_object)
    if peer_id is None:
        _refuse(downstream, port, mode, "client certificate carries no single SPIFFE ID")
        writer.transport.abort()
        return None
    alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    protocol = inner_protocol(alpn)
    preread = b""
    if protocol is None:
        protocol, preread = await _detect_inner(reader, detect_timeout)
    log.debug(
        "inbound mTLS from %s (%s) to port %d: %s", peer_id, downstream.peer, port, protocol.value
    )
    return replace(
        downstream,
        reader=reader,
        writer=writer,
        preread=preread,
        protocol=protocol,
        peer_identity=peer_id,
    )


def _refuse(downstream: Downstream, port: int, mode: str, reason: str) -> None:
    log.warning(
        "inbound connection from %s to port %d refused (mTLS %s): %s",
        downstream.peer,
        port,
        mode,
        reason,
    )
    reset(downstream.writer)


def _peer(downstream: Downstream) -> authz.Peer:
    principal, namespace = principal_of(downstream.peer_identity)
    return authz.Peer(principal, namespace, downstream.peer.host)


def _decide(
    security: MeshSecurity, downstream: Downstream, request: authz.Request
) -> authz.Decision:
    decision = authz.decide(security.policies, _peer(downstream), request)
    if decision.audited_by:
        log.info(
            "audit: %s from %s (%s) to port %d matched %s",
            request.method or "tcp",
            downstream.peer_identity or "no identity",
            downstream.peer.host,
            request.port,
            ", ".join(decision.audited_by),
        )
    return decision


def authorize(
    ctx: ProxyContext,
    downstream: Downstream,
    method: str | bytes,
    path: str | bytes,
    host: str | bytes,
    headers: Sequence[tuple[bytes, bytes]] | Mapping[str, str] = (),
) -> authz.Decision:
    """An HTTP request's authorization decision (inbound). Deny -> 403."""
    security = security_for(ctx)
    if security is None or not security.policies:
        return _ALLOW
    if isinstance(headers, Mapping):
        header_map = {k.lower(): v for k, v in headers.items()}
    else:
        header_map = {}
        for name, value in headers:
            header_map.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    request = authz.Request(
        port=downstream.original_dst.port,
        protocol="http",
        method=_text(method),
        path=_text(path).split("?", 1)[0],
        host=_text(host),
        headers=header_map,
    )
    decision = _decide(security, downstream, request)
    if isinstance(decision, authz.Deny):
        log.info(
            "denied %s %s from %s (%s): %s",
            request.method,
            request.path,
            downstream.peer_identity or "no identity",
            downstream.peer.host,
            decision.reason,
        )
    return decision


def authorize_tcp(ctx: ProxyContext, downstream: Downstream) -> authz.Decision:
    """An opaque TCP connection's decision (L7 rule fields never match here)."""
    security = security_for(ctx)
    if security is None or not security.policies:
        return _ALLOW
    request = authz.Request(port=downstream.original_dst.port, protocol="tcp")
    decision = _decide(security, downstream, request)
    if isinstance(decision, authz.Deny):
        log.info(
            "denied TCP connection from %s (%s) to port %d: %s",
            downstream.peer_identity or "no identity",
            downstream.peer.host,
            request.port,
            decision.reason,
        )
    return decision


def xfcc_value(ctx: ProxyContext, downstream: Downstream) -> str | None:
    """The XFCC value for requests on this connection; None without a verified peer."""
    if not downstream.peer_identity:
        return None
    security = security_for(ctx)
    own = security.own_id if security is not None else None
    ssl_object = downstream.writer.get_extra_info("ssl_object")
    cert_hash = None
    if ssl_object is not None:
        der = ssl_object.getpeercert(binary_form=True)
        if der:
            cert_hash = hashlib.sha256(der).hexdigest()
    return xfcc(own, downstream.peer_identity, cert_hash)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


_ALLOW: Final = authz.Allow()


def detects_tls(ctx: ProxyContext, port: int) -> bool:
    """Whether the inbound listener must look for TLS on `port` (even a
    server-first one): mesh security is on and the port is not DISABLE."""
    security = security_for(ctx)
    return security is not None and security.mode_for(port) != DISABLE


def tcp_allowed(ctx: ProxyContext, downstream: Downstream) -> bool:
    """For the listener: opaque TCP must pass authorization (reset on deny);
    HTTP is decided per request by the handlers."""
    if downstream.protocol not in (Protocol.TCP, Protocol.TLS):
        return True
    if isinstance(authorize_tcp(ctx, downstream), authz.Deny):
        reset(downstream.writer)
        # Counted and logged like any connection, with the denial's flag.
        rec = ctx.telemetry.tcp_open(
            downstream.direction,
            peer=downstream.peer,
            upstream_host=downstream.upstream,
            peer_identity=downstream.peer_identity,
            local=downstream.original_dst,
        )
        rec.flags = Flag.UNAUTHORIZED.value
        ctx.telemetry.tcp_close(rec)
        return False
    return True


def http_request(
    ctx: ProxyContext,
    downstream: Downstream,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]] | authz.Deny:
    """For the HTTP handlers, once per inbound request: the headers to forward
    (x-forwarded-client-cert replaced by what this hop verified) or a Deny
    (answer 403 with DENIED_BODY). HTTP/2 passes `:path`/`:authority` headers."""
    security = security_for(ctx)
    if security is None:
        return headers
    if security.policies:
        host = b""
        for name, value in headers:
            # HTTP/1 field names arrive as the client wrote them ("Host").
            if name.lower() in (b"host", b":authority"):
                host = value
                break
        decision = authorize(ctx, downstream, method, target, host, headers)
        if isinstance(decision, authz.Deny):
            return decision
    return set_xfcc(headers, xfcc_value(ctx, downstream))


def denied_reply() -> Reply:
    """The local answer to a denied HTTP request: 403, a short body, flag UAEX."""
    return Reply(403, DENIED_BODY, Flag.UNAUTHORIZED, grpc_status=7)  # PERMISSION_DENIED
