"""`synchro-proxy --config-file PATH`: a `ProxyConfig` from a file, without a controller.

The file holds the same JSON the controller pushes (YAML is accepted too). It
is re-read when it changes (polled: mtime and size), validated and swapped the
way the config client does it: a broken file is logged and the last good
config stays. For loopback tests and for running a proxy by hand.

    source = FileConfigSource("/etc/synchro/proxy.json")
    source.on_update(lambda snap: ...)
    source.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from proxy.config import ConfigError, ProxyConfig
from proxy.config_client import Snapshot
from proxy.registry import Registry

log = logging.getLogger(__name__)

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: bytes) -> Snapshot:
    """File bytes -> Snapshot, or ConfigError naming what is wrong."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not JSON or YAML: {exc}") from None
    config = ProxyConfig.from_dict(data)
    return Snapshot(config, Registry(config))


class FileConfigSource:
    def __init__(self, path: str, *, poll: float = 0.2) -> None:
        self.path = Path(path)
        self.poll = poll
        self.current: Snapshot | None = None
        self.last_error = ""
        self._stamp: tuple[int, int] | None = None
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def version(self) -> str:
        return self.current.version if self.current else ""

    def on_update(self, listener: Callable[[Snapshot], None]) -> None:
        self._listeners.append(listener)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def check(self) -> None:
        """Load the file if it changed since the last look."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._fail(f"cannot read {self.path}: {exc.strerror or exc}")
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            snap = load(self.path.read_bytes())
        except (OSError, ConfigError) as exc:
            self._fail(f"{self.path}: {exc}")
            return
        self.current = snap
        self.last_error = ""
        self._ready.set()
        log.info("config version %s from %s applied", snap.version, self.path)
        for listener in self._listeners:
            try:
                listener(snap)
            except Exception:
                log.exception("config listener failed on version %s", snap.version)

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.error("config refused, keeping version %s: %s", self.version or "(none)", message)
        self.last_error = message

    async def run(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(self.poll)

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="config-file")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def status(self) -> dict[str, Any]:
        return {"file": str(self.path), "version": self.version, "last_error": self.last_error}
