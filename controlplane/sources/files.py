"""FileSource: a directory of YAML (or JSON) documents, reloaded on change.

Change detection polls (path, mtime, size, inode) every `interval` seconds
(0.2 s by default) rather than using inotify: the standard library has no
inotify, polling works the same on every filesystem (bind mounts, overlay, NFS)
and sees a mounted ConfigMap's atomic symlink swap, which a watch on the old
files would miss. A stat per file per tick is cheap for the hundreds of files a
mesh directory holds, and 0.2 s plus the controller's debounce stays well inside
the one-second budget for a change to reach the proxies.

`scan` is synchronous and pure apart from reading files; `run` is the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from controlplane.validation import Problem, SourceDoc

log = logging.getLogger(__name__)

# libyaml's loader when present: the same documents, several times faster.
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class _Parsed:
    signature: tuple[int, int, int]
    docs: tuple[SourceDoc, ...]
    problems: tuple[Problem, ...]


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_file(path: Path, display: str) -> tuple[tuple[SourceDoc, ...], tuple[Problem, ...]]:
    """Every document of one file; a syntax error is a Problem naming the document."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return (), (
            Problem(display, None, "", "", "", "", f"cannot read: {e}", reason="Unreadable"),
        )
    docs: list[SourceDoc] = []
    index = 0
    try:
        for doc in yaml.load_all(text, Loader=_Loader):
            if doc is not None:
                docs.append(SourceDoc(doc, display, index))
            index += 1
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        return tuple(docs), (
            Problem(
                display,
                index,
                "",
                "",
                "",
                "",
                f"invalid YAML{where}: {problem}",
                reason="InvalidYAML",
            ),
        )
    return tuple(docs), ()


class FileSource:
    """Reads every YAML/JSON file under `directory` (recursively, sorted)."""

    name = "files"

    def __init__(self, directory: str | Path, *, interval: float = 0.2) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self._files: dict[Path, _Parsed] = {}

    def _paths(self) -> list[Path]:
        out = []
        for root, dirs, files in os.walk(self.directory, followlinks=True):
            # Skip hidden entries: editors' swap files and ConfigMap's ..data farm
            # (its files are reached again through the visible symlinks).
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if not f.startswith(".") and f.endswith(SUFFIXES):
                    out.append(Path(root) / f)
        return out

    def scan(self) -> bool:
        """Re-read what changed; True when anything did."""
        changed = False
        seen = set()
        for path in self._paths():
            try:
                sig = _signature(path.stat())
            except OSError:
                continue  # removed between listing and stat
            seen.add(path)
            old = self._files.get(path)
            if old is not None and old.signature == sig:
                continue
            display = str(path)
            docs, problems = load_file(path, display)
            self._files[path] = _Parsed(sig, docs, problems)
            changed = True
        for gone in set(self._files) - seen:
            del self._files[gone]
            changed = True
        return changed

    def documents(self) -> list[SourceDoc]:
        return [d for p in sorted(self._files) for d in self._files[p].docs]

    def problems(self) -> list[Problem]:
        return [pr for p in sorted(self._files) for pr in self._files[p].problems]

    async def run(self, publish: Callable[[str, list[SourceDoc], list[Problem]], None]) -> None:
        """Publish the documents now and after every change, until cancelled."""
        if not self.directory.is_dir():
            log.error("config directory %s does not exist; waiting for it", self.directory)
        first = True
        while True:
            try:
                changed = await asyncio.to_thread(self.scan)
            except OSError as e:  # the directory vanished or is unreadable
                log.warning("scanning %s: %s", self.directory, e)
                changed = False
            if changed or first:
                publish(self.name, self.documents(), self.problems())
                first = False
            await asyncio.sleep(self.interval)
