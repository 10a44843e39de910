"""catalog: answers with its version, so the canary split is visible."""

from __future__ import annotations

import os

from examples.apps.common import serve


def main() -> None:
    version = os.environ.get("VERSION", "v1")
    serve("catalog", lambda _req: (200, {"version": version, "items": ["tea", "cups"]}))


if __name__ == "__main__":
    main()
