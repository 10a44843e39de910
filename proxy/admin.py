"""The admin endpoint, 127.0.0.1:15000 only.

- `GET /config_dump`: settings (and, with later issues, the config in force) as JSON.
- `GET /listeners`: the capture listeners, their addresses and counters.
- `POST /logging/<debug|info|warning|error>`: change the log level.
- `POST /drain`: stop accepting, finish in-flight work, exit.
- `POST /quitquitquit`: exit now (Jobs without native sidecars call it when done).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.status import Response

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class AdminHooks:
    """What the admin endpoint reads and triggers; the process wiring provides it."""

    config_dump: Callable[[], dict[str, Any]]
    listeners: Callable[[], list[dict[str, Any]]]
    drain: Callable[[], None]
    quit: Callable[[], None]
    set_log_level: Callable[[str], None]


class AdminApp:
    def __init__(self, hooks: AdminHooks) -> None:
        self.hooks = hooks

    async def route(self, method: str, path: str) -> Response:
        # The mini server strips the query; /logging takes its level from the path too.
        name, _, arg = path.partition("/")[2].partition("/")
        if (name, method) == ("config_dump", "GET"):
            return Response.json(200, self.hooks.config_dump())
        if (name, method) == ("listeners", "GET"):
            return Response.json(200, self.hooks.listeners())
        if (name, method) == ("drain", "POST"):
            log.warning("admin: drain requested")
            self.hooks.drain()
            return Response.text(202, "draining")
        if (name, method) == ("quitquitquit", "POST"):
            log.warning("admin: quit requested")
            self.hooks.quit()
            return Response.text(200, "exiting")
        if (name, method) == ("logging", "POST"):
            if arg not in LOG_LEVELS:
                return Response.text(
                    400, f"POST /logging/<level>, level one of {', '.join(LOG_LEVELS)}"
                )
            self.hooks.set_log_level(arg)
            return Response.text(200, f"log level {arg}")
        if name in ("config_dump", "listeners", "drain", "quitquitquit", "logging"):
            return Response.text(405, f"{method} not allowed on /{name}")
        return Response.text(
            404,
            "endpoints: GET /config_dump, GET /listeners, POST /drain, POST /quitquitquit, POST /logging/<level>",
        )
