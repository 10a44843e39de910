"""kubectl helpers for tests/kind (imported by conftest and the tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

INJECT = "synchro.dev/inject"

Kubectl = Callable[..., str]


class KubectlError(AssertionError):
    """kubectl exited non-zero; the message carries its stderr."""


def make_kubectl(binary: str, context: str) -> Kubectl:
    def run(*args: str, stdin: str | None = None, timeout: float = 240) -> str:
        done = subprocess.run(
            [binary, "--context", context, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    return run


def find_kubectl() -> tuple[str | None, str]:
    return shutil.which("kubectl"), os.environ.get("SYNCHRO_KIND_CONTEXT", "kind-synchro")


def get_json(kubectl: Kubectl, *args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json"))
