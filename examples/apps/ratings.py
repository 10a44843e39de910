"""ratings: FAILURE_RATE makes a share of answers 500s, DELAY_SECONDS makes it slow."""

from __future__ import annotations

import os
import random
import time

from examples.apps.common import serve


def main() -> None:
    failure_rate = float(os.environ.get("FAILURE_RATE", "0"))
    delay = float(os.environ.get("DELAY_SECONDS", "0"))
    rng = random.Random()

    def handle(_req: object) -> tuple[int, dict[str, object]]:
        if delay:
            time.sleep(delay)
        if rng.random() < failure_rate:
            return 500, {"error": "injected failure"}
        return 200, {"stars": 4}

    serve("ratings", handle)


if __name__ == "__main__":
    main()
