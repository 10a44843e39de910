"""The proxy's side of config push: subscribe, validate, swap, ACK or NACK.

    client = ConfigClient("https://synchro-controller.synchro-system.svc:15012",
                          namespace="shop", pod="frontend-1", ca_file=...)
    client.on_update(lambda snap: ...)     # after each swap
    task = client.start()                  # in the proxy's event loop
    await client.wait_ready()              # /healthz/ready waits for this
    snap = client.current                  # Snapshot(config, registry) or None

A config goes through `decode` (JSON -> ProxyConfig -> Registry, and any
validators) before it replaces the current one, in one assignment: readers see
the old snapshot or the new one, never a mix. A config that fails is NACKed with
the error and the old one stays. When the controller is unreachable the client
keeps the last good snapshot and retries with exponential backoff and full
jitter; its next poll names the version it runs, so a restarted controller
knows it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from proxy.config import ConfigError, ProxyConfig
from proxy.registry import Registry

log = logging.getLogger(__name__)

VERSION_HEADER = "x-synchro-version"
ENV_CONTROLLER = "SYNCHRO_CONTROLLER"


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: ProxyConfig
    registry: Registry

    @property
    def version(self) -> str:
        return self.config.version


Validator = Callable[[ProxyConfig], None]
Listener = Callable[[Snapshot], None]


# --- pure cores ----------------------------------------------------------------


def backoff_delay(
    attempt: int, rng: random.Random, *, base: float = 0.1, cap: float = 5.0
) -> float:
    """Full jitter (AWS style): uniform in [0, min(cap, base * 2**attempt)].
    Many proxies losing one controller then spread their reconnects out."""
    return rng.uniform(0.0, min(cap, base * (2 ** min(attempt, 30))))


def decode(body: bytes, validators: tuple[Validator, ...] = ()) -> Snapshot:
    """Bytes from the controller -> a ready-to-swap Snapshot, or ConfigError."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"not JSON: {e}") from None
    config = ProxyConfig.from_dict(data)
    for check in validators:
        try:
            check(config)
        except ConfigError:
            raise
        except Exception as e:  # a validator's own failure still rejects the config
            raise ConfigError(f"{getattr(check, '__name__', 'validator')}: {e}") from None
    return Snapshot(config, Registry(config))


# --- the client ------------------------------------------------------------------------


class ConfigClient:
    def __init__(
        self,
        controller_url: str,
        *,
        namespace: str,
        pod: str,
        service_account: str | None = None,
        labels: Mapping[str, str] | None = None,
        ca_file: str | None = None,
        verify: bool | ssl.SSLContext = True,
        poll_wait: float = 30.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        rng: random.Random | None = None,
        validators: tuple[Validator, ...] = (),
    ) -> None:
        self.base = controller_url.rstrip("/")
        self.namespace = namespace
        self.pod = pod
        self.service_account = service_account
        self.labels = dict(labels or {})
        self.poll_wait = poll_wait
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.rng = rng or random.Random()
        self.validators = validators
        self._verify: bool | ssl.SSLContext = verify
        if ca_file is not None:
            self._verify = ssl.create_default_context(cafile=ca_file)
        self._current: Snapshot | None = None
        self._listeners: list[Listener] = []
        self._ready = asyncio.Event()
        self._nacked = ""
        self._task: asyncio.Task[None] | None = None
        self.last_error = ""
        self.connected = False

    # --- what the proxy reads ----------------------------------------------------------

    @property
    def current(self) -> Snapshot | None:
        """The config in force and its registry; None before the first one."""
        return self._current

    @property
    def has_config(self) -> bool:
        return self._current is not None

    @property
    def version(self) -> str:
        return self._current.version if self._current else ""

    def on_update(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- applying -------------------------------------------------------------------------

    def apply(self, body: bytes) -> str | None:
        """Validate and swap; the error text (for the NACK) if the config is refused."""
        try:
            snap = decode(body, self.validators)
        except ConfigError as e:
            log.error("config refused, keeping version %s: %s", self.version or "(none)", e)
            return str(e)
        self._current = snap  # the one atomic swap
        self._ready.set()
        log.info("config version %s applied (%d services)", snap.version, len(snap.config.services))
        for listener in self._listeners:
            try:
                listener(snap)
            except Exception:
                log.exception("config listener failed on version %s", snap.version)
        return None

    # --- the loop -------------------------------------------------------------------------

    def _params(self) -> list[tuple[str, str | int | float | bool | None]]:
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("namespace", self.namespace),
            ("pod", self.pod),
            ("version", self.version),
            ("nacked", self._nacked),
            # After (re)connecting, first a poll that answers at once: it tells the
            # controller what we run and tells us the controller is back.
            ("wait", str(self.poll_wait if self.connected else 0)),
        ]
        if self.service_account:
            params.append(("sa", self.service_account))
        params.extend(("label", f"{k}={v}") for k, v in sorted(self.labels.items()))
        return params

    async def _ack(self, http: httpx.AsyncClient, version: str, error: str | None) -> None:
        url = f"{self.base}/v1/proxies/{quote(self.namespace, safe='')}/{quote(self.pod, safe='')}/ack"
        try:
            await http.post(url, json={"version": version, "error": error}, timeout=5.0)
        except httpx.HTTPError as e:
            # The next poll carries the version we run, so a lost ACK heals itself.
            log.debug("ack of %s not delivered: %s", version, e)

    async def poll_once(self, http: httpx.AsyncClient) -> None:
        resp = await http.get(
            f"{self.base}/v1/config", params=tuple(self._params()), timeout=self.poll_wait + 10.0
        )
        if resp.status_code == 304:
            return
        if resp.status_code != 200:
            raise httpx.HTTPStatusError(
                f"controller answered {resp.status_code}: {resp.text[:200]}",
                request=resp.request,
                response=resp,
            )
        offered = resp.headers.get(VERSION_HEADER, "")
        error = self.apply(resp.content)
        if error is None:
            self._nacked = ""
            await self._ack(http, self.version, None)
        else:
            # Remember it so the controller does not send the same version again
            # until the configuration changes.
            self._nacked = offered or "unknown"
            await self._ack(http, self._nacked, error)

    async def run(self) -> None:
        attempt = 0
        async with httpx.AsyncClient(verify=self._verify, http2=False) as http:
            while True:
                try:
                    await self.poll_once(http)
                    if not self.connected:
                        log.info("subscribed to %s", self.base)
                    self.connected, attempt, self.last_error = True, 0, ""
                except asyncio.CancelledError:
                    raise
                except (httpx.HTTPError, OSError, ssl.SSLError) as e:
                    delay = backoff_delay(
                        attempt, self.rng, base=self.backoff_base, cap=self.backoff_cap
                    )
                    attempt += 1
                    msg = f"{type(e).__name__}: {e}"
                    if self.connected or msg != self.last_error:
                        log.warning(
                            "controller %s unreachable (%s); keeping version %s, retrying in %.2fs",
                            self.base,
                            msg,
                            self.version or "(none)",
                            delay,
                        )
                    self.connected, self.last_error = False, msg
                    await asyncio.sleep(delay)

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="config-client")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def status(self) -> dict[str, Any]:
        """For the admin port's /config_dump."""
        return {
            "controller": self.base,
            "connected": self.connected,
            "version": self.version,
            "last_error": self.last_error,
            "nacked": self._nacked,
        }
