"""Run inside a Pod (`synchro exec POD -- python3 watch_split.py ...`): sequential
GETs to one URL, each answer's JSON field `--key` noted with wall-clock send and
receive times, until the answers show the expected change or `--seconds` pass.

`--until only`: the last `--stable` answers are all in `--want`;
`--until all-seen`: every value of `--want` has answered at least once.

Prints `ready` once its first answer came back (so the caller can make its
change knowing the watcher is already measuring), then one JSON object:
`{"done": bool, "answers": [[sent, received, value], ...]}`. Wall-clock times,
because the caller compares them with its own `time.time()` in another
network namespace of the same host.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()


def fetch(url: str, key: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(json.loads(resp.read()).get(key, "?"))
    except urllib.error.HTTPError as exc:
        return f"http-{exc.code}"
    except (OSError, ValueError) as exc:
        return f"error: {exc}"


def finished(values: list[str], want: set[str], until: str, stable: int) -> bool:
    if until == "all-seen":
        return want <= set(values)
    tail = values[-stable:]
    return len(tail) == stable and set(tail) <= want


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--key", required=True)
    parser.add_argument("--want", required=True, help="comma-separated values")
    parser.add_argument("--until", choices=("only", "all-seen"), default="only")
    parser.add_argument("--stable", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    want = set(args.want.split(","))
    answers: list[tuple[float, float, str]] = []
    deadline = time.monotonic() + args.seconds
    done = False
    while time.monotonic() < deadline:
        sent = time.time()
        value = fetch(args.url, args.key)
        answers.append((sent, time.time(), value))
        if len(answers) == 1:
            print("ready", flush=True)
        if finished([a[2] for a in answers], want, args.until, args.stable):
            done = True
            break
    print(json.dumps({"done": done, "answers": answers}), flush=True)
    return 0


# --- the test side -------------------------------------------------------------------


@dataclass(frozen=True)
class Watch:
    changed_at: float  # wall clock, just before the change was made
    done: bool
    answers: list[tuple[float, float, str]]

    def switched_at(self) -> float:
        """Send time of the first answer of the final run of new answers."""
        values = [a[2] for a in self.answers]
        i = len(values)
        while i > 0 and values[i - 1] == values[-1]:
            i -= 1
        return self.answers[i][0]

    def first_seen(self, value: str) -> float:
        return next(a[0] for a in self.answers if a[2] == value)

    def values(self) -> list[str]:
        return [a[2] for a in self.answers]


def watch(
    synchro_argv: Sequence[str], url: str, change: Callable[[], float], **options: object
) -> Watch:
    """Start the watcher in a Pod (`synchro_argv` is `synchro exec POD --mesh M --`),
    wait until it is measuring, call `change()` (which returns the wall-clock
    time the change was made or the moment to measure from), then collect."""
    argv = [*synchro_argv, "python3", str(HERE), url]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if first != "ready":
            raise AssertionError(f"watcher did not start: {first!r}")
        changed_at = change()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise AssertionError(f"watcher failed ({proc.returncode}): {err}")
    result = json.loads(out.strip().splitlines()[-1])
    answers = [(float(a), float(b), str(c)) for a, b, c in result["answers"]]
    return Watch(changed_at, bool(result["done"]), answers)


if __name__ == "__main__":
    sys.exit(main())
