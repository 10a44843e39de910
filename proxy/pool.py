"""Per-upstream pool of idle HTTP/1.1 connections (keep-alive), bounded, with idle expiry.

`IdleSet` is the pure core: which idle connection to hand out, which ones have
expired, whether one more fits, all with the clock passed in. `Pool` is the
asyncio adapter that connects, closes and runs one expiry timer.

Upstream failures are the `UpstreamError` family; the HTTP handlers turn them
into statuses in one table (502 for connect failures and broken connections,
504 for timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from proxy import upstream
from proxy.conn import Address, ProxyContext

log = logging.getLogger(__name__)

STREAM_LIMIT: Final = 256 * 1024


class UpstreamError(Exception):
    """The upstream side failed; the handler maps the subclass to a status."""


class ConnectFailed(UpstreamError):
    """Could not open a connection (refused, unreachable, connect timeout)."""


class ConnectTimeout(ConnectFailed):
    """The connection did not open within the connect timeout."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""


class UpstreamBroken(UpstreamError):
    """The upstream closed, reset, or sent something that is not HTTP."""


@dataclass(frozen=True, slots=True)
class PoolSettings:
    idle_timeout: float = 60.0
    connect_timeout: float = 5.0
    max_idle_per_upstream: int = 64
    max_idle_total: int = 1024

    def __post_init__(self) -> None:
        if self.idle_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("pool timeouts must be positive")
        if self.max_idle_per_upstream < 0 or self.max_idle_total < 0:
            raise ValueError("pool bounds must not be negative")


T = TypeVar("T")


class IdleSet(Generic[T]):
    """Idle connections per upstream; newest first out (keeps the warm ones warm).

    Each item may carry its own idle timeout (the service's TrafficPolicy
    `timeouts.idle`); without one, the settings' applies."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        # Per key: [(expires_at, item)], in the order they were put.
        self._idle: dict[Any, list[tuple[float, T]]] = {}
        self.total = 0

    def take(self, key: Any, now: float) -> tuple[T | None, list[T]]:
        """The newest unexpired idle item for `key`, and expired ones to close."""
        stack = self._idle.get(key)
        if not stack:
            return None, []
        expired: list[T] = []
        found: T | None = None
        while stack:
            expires_at, item = stack.pop()
            self.total -= 1
            if now < expires_at:
                found = item
                break
            expired.append(item)
        if not stack:
            del self._idle[key]
        return found, expired

    def put(self, key: Any, item: T, now: float, idle_timeout: float | None = None) -> bool:
        """Keep `item` idle; False when the bounds say close it instead."""
        stack = self._idle.setdefault(key, [])
        if (
            len(stack) >= self.settings.max_idle_per_upstream
            or self.total >= self.settings.max_idle_total
        ):
            if not stack:
                del self._idle[key]
            return False
        stack.append((now + (idle_timeout or self.settings.idle_timeout), item))
        self.total += 1
        return True

    def discard(self, key: Any, item: T) -> bool:
        stack = self._idle.get(key)
        if not stack:
            return False
        for i, (_, it) in enumerate(stack):
            if it is item:
                del stack[i]
                self.total -= 1
                if not stack:
                    del self._idle[key]
                return True
        return False

    def expire(self, now: float) -> tuple[list[T], float | None]:
        """Remove expired items; also the time the next one expires (None if empty)."""
        expired: list[T] = []
        next_at: float | None = None
        for key in list(self._idle):
            stack = self._idle[key]
            keep = [(at, item) for at, item in stack if now < at]
            if len(keep) != len(stack):
                expired += (item for at, item in stack if now >= at)
                self.total -= len(stack) - len(keep)
                stack[:] = keep
            if stack:
                at = min(at for at, _ in stack)
                next_at = at if next_at is None or at < next_at else next_at
            else:
                del self._idle[key]
        return expired, next_at

    def drain(self) -> list[T]:
        items = [item for stack in self._idle.values() for _, item in stack]
        self._idle.clear()
        self.total = 0
        return items


class UpstreamConnection:
    """One connection to an upstream; `codec` is protocol state the handler attaches."""

    __slots__ = ("address", "codec", "idle_timeout", "reader", "requests", "writer")

    def __init__(
        self, address: Address, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer
        self.codec: Any = None
        # Requests sent on it; > 0 means it came from the pool (it may have gone stale).
        self.requests = 0
        # How long it may stay pooled (the service's idle timeout); None: the pool's.
        self.idle_timeout: float | None = None

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


async def connect(
    address: Address, timeout: float, ctx: ProxyContext | None = None
) -> UpstreamConnection:
    try:
        # proxy.upstream decides mTLS (meshed endpoint) or plaintext.
        reader, writer = await upstream.open_connection(
            address, ctx, alpn="http/1.1", timeout=timeout, limit=STREAM_LIMIT
        )
    except TimeoutError as exc:
        raise ConnectTimeout(f"connect to {address} timed out after {timeout}s") from exc
    except OSError as exc:
        raise ConnectFailed(f"connect to {address}: {exc.strerror or exc}") from exc
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return UpstreamConnection(address, reader, writer)


class Pool:
    """Idle keep-alive connections per upstream address, closed after `idle_timeout`."""

    def __init__(self, settings: PoolSettings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self._idle: IdleSet[UpstreamConnection] = IdleSet(settings)
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.closed = False
        self.connects = 0
        self.reuses = 0
        # Whose security settings (certificate, config) upstream connections use.
        self.ctx_ref: weakref.ref[ProxyContext] | None = None

    def _ctx(self) -> ProxyContext | None:
        return self.ctx_ref() if self.ctx_ref is not None else None

    def _now(self) -> float:
        if self._clock is None:
            self._clock = asyncio.get_running_loop().time
        return self._clock()

    @property
    def idle_count(self) -> int:
        return self._idle.total

    async def acquire(
        self, address: Address, connect_timeout: float | None = None
    ) -> UpstreamConnection:
        """A pooled connection to `address` if one is idle and alive, else a new one
        (opened within `connect_timeout`, the pool's when None)."""
        conn = self.take(address)
        if conn is not None:
            return conn
        self.connects += 1
        return await connect(address, connect_timeout or self.settings.connect_timeout, self._ctx())

    def take(self, address: Address) -> UpstreamConnection | None:
        """A pooled connection to `address` if one is idle and alive (no coroutine:
        the hot path of a keep-alive proxy)."""
        now = self._now()
        while True:
            conn, expired = self._idle.take(address, now)
            for old in expired:
                old.close()
            if conn is None:
                return None
            if conn.usable():
                self.reuses += 1
                return conn
            conn.close()

    async def connect(
        self, address: Address, connect_timeout: float | None = None
    ) -> UpstreamConnection:
        """A new connection that will not come from the pool (retries of stale ones, tunnels)."""
        self.connects += 1
        return await connect(address, connect_timeout or self.settings.connect_timeout, self._ctx())

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give `conn` back after a complete exchange, or close it."""
        if not reusable or self.closed or not conn.usable():
            conn.close()
            return
        now = self._now()
        idle = conn.idle_timeout or self.settings.idle_timeout
        if not self._idle.put(conn.address, conn, now, idle):
            conn.close()
            return
        self._schedule(now + idle)

    def _schedule(self, at: float) -> None:
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = at
        self._timer = loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        # Timers may fire up to a clock tick early; do not spin on that.
        expired, next_at = self._idle.expire(self._now() + 0.001)
        for conn in expired:
            conn.close()
        if next_at is not None:
            self._schedule(next_at)

    def close(self) -> None:
        """Close every idle connection and pool nothing from now on."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn in self._idle.drain():
            conn.close()


_pools: weakref.WeakKeyDictionary[ProxyContext, Pool] = weakref.WeakKeyDictionary()


def pool_for(ctx: ProxyContext) -> Pool:
    """The process's HTTP/1.1 pool for `ctx`, made on first use from its settings."""
    pool = _pools.get(ctx)
    if pool is None:
        pool = Pool(
            PoolSettings(idle_timeout=ctx.pool_idle_timeout, connect_timeout=ctx.connect_timeout)
        )
        pool.ctx_ref = weakref.ref(ctx)
        _pools[ctx] = pool
    return pool
