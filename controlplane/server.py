"""The discovery-and-push half of synchro-controller.

`Controller` merges what its sources publish (a directory of YAML, the
Kubernetes API, Pods the local runtime reports), rebuilds the ResourceSet after
a debounce, reports invalid resources (one error line each, and through the
`on_problems` hook as status conditions in a cluster), and hands the snapshot to
the push hub. `add_arguments` and `build_servers` plug it into controlplane.main.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from controlplane import compiler
from controlplane.push import Debouncer, PushHub, Snapshot, pod_document
from controlplane.validation import ParseCache, Problem, SourceDoc, build

log = logging.getLogger(__name__)

Publish = Callable[[str, list[SourceDoc], list[Problem]], None]


class Source(Protocol):
    name: str

    async def run(self, publish: Publish) -> None: ...


class Controller:
    def __init__(
        self,
        sources: Sequence[Source] = (),
        *,
        trust_bundle: tuple[str, ...] = (),
        debouncer: Debouncer | None = None,
        on_problems: Callable[[Sequence[Problem]], None] | None = None,
    ) -> None:
        self.sources = list(sources)
        self.trust_bundle = trust_bundle
        self.hub = PushHub()
        self.debouncer = debouncer or Debouncer()
        self.on_problems = on_problems
        self._docs: dict[str, list[SourceDoc]] = {}
        self._source_problems: dict[str, list[Problem]] = {}
        self._pods: dict[tuple[str, str], SourceDoc] = {}
        self._waiting_for = {s.name for s in self.sources}
        self._wake = asyncio.Event()
        self._reported: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.generation = 0
        self.last_build_seconds = 0.0
        self._parse_cache = ParseCache()
        self._memo: dict[str, Any] = {}

    # --- inputs ---------------------------------------------------------------------

    def publish(self, source: str, docs: list[SourceDoc], problems: list[Problem]) -> None:
        self._docs[source] = docs
        self._source_problems[source] = problems
        self._waiting_for.discard(source)
        self._changed()

    def put_pod(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        doc = pod_document(namespace, name, body)
        self._pods[(namespace, name)] = SourceDoc(doc, f"api:/v1/pods/{namespace}/{name}", None)
        self._changed()

    def delete_pod(self, namespace: str, name: str) -> bool:
        if self._pods.pop((namespace, name), None) is None:
            return False
        self._changed()
        return True

    def set_trust_bundle(self, bundle: tuple[str, ...]) -> None:
        if bundle != self.trust_bundle:
            self.trust_bundle = bundle
            self._changed()

    def _changed(self) -> None:
        self.debouncer.change(time.monotonic())
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------

    def _documents(self) -> list[SourceDoc]:
        docs = [
            d
            for name in sorted(self._docs)
            for d in self._docs[name]
            if _pod_key(d.doc) not in self._pods
        ]
        # A reported Pod replaces the same Pod read from a source: a manifest in
        # --config-dir says what to run (no IP, no status), the report what runs.
        docs.extend(self._pods[k] for k in sorted(self._pods))
        return docs

    def rebuild_now(self) -> Snapshot:
        """Validate and pre-compile everything (CPU-bound; runs in a thread)."""
        started = time.perf_counter()
        resources, problems = build(
            self._documents(), self.trust_bundle, cache=self._parse_cache, memo=self._memo
        )
        compiler.shared(resources)  # compile the shared part once, before proxies ask
        for name in sorted(self._source_problems):
            problems = [*self._source_problems[name], *problems]
        self.last_build_seconds = time.perf_counter() - started
        return Snapshot(resources, tuple(problems), self.generation + 1)

    def _report(self, problems: Sequence[Problem]) -> None:
        lines = {p.line() for p in problems}
        for line in sorted(lines - self._reported):
            log.error("invalid resource: %s", line)
        for line in sorted(self._reported - lines):
            log.info("resolved: %s", line)
        self._reported = lines
        if self.on_problems is not None:
            try:
                self.on_problems(problems)
            except Exception:  # a status writer must never stop config pushes
                log.exception("reporting resource status failed")

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._waiting_for:
                continue  # a proxy must not get a config before every source has listed
            while True:
                deadline = self.debouncer.deadline()
                now = time.monotonic()
                if deadline is None or now >= deadline:
                    break
                await asyncio.sleep(deadline - now)
            self.debouncer.fire()
            self._wake.clear()
            try:
                snap = await asyncio.to_thread(self.rebuild_now)
            except Exception:  # a bug in one build must not stop later ones
                log.exception("building the configuration failed; keeping the previous one")
                continue
            self.generation = snap.generation
            self._report(snap.problems)
            self.hub.publish(snap)
            log.info(
                "configuration generation %d: %d services, %d problems, built in %.0f ms",
                snap.generation,
                len(snap.resources.services),
                len(snap.problems),
                self.last_build_seconds * 1000,
            )

    async def _run_source(self, source: Source) -> None:
        try:
            await source.run(self.publish)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("source %s stopped", source.name)

    def start(self) -> None:
        if not self.sources:
            self._changed()  # nothing to wait for: serve Pods reported through the API
        self._tasks.append(asyncio.create_task(self._loop(), name="controller-loop"))
        for s in self.sources:
            self._tasks.append(asyncio.create_task(self._run_source(s), name=f"source-{s.name}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Controller]:
        self.start()
        try:
            yield self
        finally:
            await self.stop()


# --- wiring into synchro-controller -----------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("discovery and config push")
    src = group.add_mutually_exclusive_group()
    src.add_argument(
        "--config-dir",
        type=Path,
        metavar="DIR",
        help="read resources from the YAML files in DIR (reloaded on change)",
    )
    src.add_argument(
        "--kubernetes", action="store_true", help="read resources from the Kubernetes API"
    )
    group.add_argument(
        "--api-listen",
        metavar="HOST:PORT",
        help="HTTPS listener of the controller API (config push, proxy status); e.g. 0.0.0.0:15012",
    )
    group.add_argument(
        "--api-tls-cert",
        type=Path,
        metavar="FILE",
        help="serving certificate of the API (default: --tls-cert)",
    )
    group.add_argument(
        "--api-tls-key", type=Path, metavar="FILE", help="its key (default: --tls-key)"
    )
    group.add_argument(
        "--api-plaintext",
        action="store_true",
        help="serve the API over plain HTTP (tests and local debugging only)",
    )
    group.add_argument(
        "--trust-bundle",
        type=Path,
        metavar="FILE",
        help="PEM roots pushed to proxies as their trust bundle",
    )
    group.add_argument(
        "--leader-election",
        action="store_true",
        default=None,
        help="elect a status writer with a coordination.k8s.io Lease (default: on with --kubernetes)",
    )
    from controlplane import certs  # POST /v1/certificates: its CA flags

    certs.add_arguments(parser)


def _split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--api-listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:15012")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_controller(args: argparse.Namespace) -> Controller:
    sources: list[Source] = []
    if getattr(args, "config_dir", None) is not None:
        from controlplane.sources.files import FileSource

        sources.append(FileSource(args.config_dir))
    on_problems = None
    if getattr(args, "kubernetes", False):
        from controlplane.sources.kubernetes import KubernetesSource, StatusWriter

        k8s = KubernetesSource.from_environment()
        sources.append(k8s)
        writer = StatusWriter(k8s.api, leader_election=args.leader_election is not False)
        on_problems = writer.report
        k8s.extra_tasks.append(writer.run)
    bundle: tuple[str, ...] = ()
    if getattr(args, "trust_bundle", None) is not None:
        text = Path(args.trust_bundle).read_text()
        bundle = tuple(
            "-----BEGIN CERTIFICATE-----" + part
            for part in text.split("-----BEGIN CERTIFICATE-----")[1:]
        )
    return Controller(sources, trust_bundle=bundle, on_problems=on_problems)


def build_servers(args: argparse.Namespace, uvicorn_server: type | None = None) -> list[Any]:
    """The API server for controlplane.main, when --api-listen is given."""
    if not getattr(args, "api_listen", None):
        return []
    import uvicorn

    from controlplane.api import create_app

    host, port = _split_listen(args.api_listen)
    controller = build_controller(args)
    cert = args.api_tls_cert or getattr(args, "tls_cert", None)
    key = args.api_tls_key or getattr(args, "tls_key", None)
    tls: dict[str, Any] = {}
    if not args.api_plaintext:
        if cert is None or key is None:
            raise ValueError(
                "--api-listen needs a certificate: --api-tls-cert/--api-tls-key or --tls-cert/--tls-key (or --api-plaintext)"
            )
        tls = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    from controlplane import certs

    app = create_app(controller)
    certs.mount(app, args, controller)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        # Long polls hold requests for up to a minute; keep-alive must outlive them.
        timeout_keep_alive=75,
        timeout_graceful_shutdown=10,
        backlog=2048,
        **tls,
    )
    base: Any = uvicorn_server or uvicorn.Server

    class PushServer(base):  # type: ignore[misc, valid-type]
        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn waits for in-flight requests before the app's lifespan
            # ends; release the held long polls first.
            controller.hub.close()
            await super().shutdown(sockets)

    return [PushServer(config)]


def run(argv: Sequence[str] | None = None) -> int:
    """Run only the controller API (no webhook): `python -m controlplane.server ...`."""
    import sys

    import uvloop

    parser = argparse.ArgumentParser(prog="synchro-controller-api")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        servers = build_servers(args)
    except (ValueError, OSError) as e:
        print(f"synchro-controller: {e}", file=sys.stderr)
        return 2
    if not servers:
        print("synchro-controller: --api-listen is required", file=sys.stderr)
        return 2
    uvloop.run(servers[0].serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(run())


def _pod_key(doc: Any) -> tuple[str, str] | None:
    """(namespace, name) of a core v1 Pod document, else None."""
    if not isinstance(doc, dict) or doc.get("kind") != "Pod" or doc.get("apiVersion") != "v1":
        return None
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return None
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
