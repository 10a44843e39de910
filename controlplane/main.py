"""`synchro-controller`: the control plane process.

Each listener is a uvicorn server; `main` runs them all on one event loop and
stops them together on SIGTERM/SIGINT. Add a listener by adding its flags in
`build_parser` and a server in `build_servers`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

from controlplane import dashboard, webhook_tls
from controlplane import server as discovery
from proxy import ports
from webhook.app import create_app
from webhook.config import ConfigError, InjectorConfig
from webhook.config import load as load_injector_config

log = logging.getLogger(__name__)

CA_BUNDLE_RESYNC_SECONDS = 60.0
DEFAULT_MESH_CONFIG = Path("/etc/synchro")  # where deploy/ mounts ConfigMap synchro-config


class ControllerError(Exception):
    """A start-up problem reported to the user as one line."""


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 0.0.0.0:9443")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synchro-controller", description=__doc__)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    hook = parser.add_argument_group("admission webhook")
    hook.add_argument(
        "--webhook-listen",
        type=host_port,
        default=("0.0.0.0", ports.WEBHOOK_PORT),
        metavar="HOST:PORT",
        help=f"HTTPS listener of POST /mutate (default 0.0.0.0:{ports.WEBHOOK_PORT})",
    )
    hook.add_argument("--no-webhook", action="store_true", help="do not serve the webhook")
    hook.add_argument("--tls-cert", type=Path, metavar="FILE", help="serving certificate (PEM)")
    hook.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")
    hook.add_argument(
        "--mesh-config",
        type=Path,
        metavar="PATH",
        default=DEFAULT_MESH_CONFIG if DEFAULT_MESH_CONFIG.is_dir() else None,
        help="ConfigMap synchro-config: a mounted directory (one file per key), "
        f"a YAML mapping of its data, or the ConfigMap manifest (default {DEFAULT_MESH_CONFIG} "
        "when it exists)",
    )
    hook.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", webhook_tls.NAMESPACE),
        help="the controller's namespace (for the self-signed certificate's Secret)",
    )
    hook.add_argument(
        "--webhook-service",
        default=os.environ.get("SYNCHRO_SERVICE_NAME", webhook_tls.SERVICE_NAME),
        help="Service in front of the webhook: the self-signed certificate's names",
    )
    hook.add_argument(
        "--webhook-configuration",
        default=os.environ.get("SYNCHRO_WEBHOOK_CONFIG", webhook_tls.WEBHOOK_CONFIGURATION),
        help="MutatingWebhookConfiguration whose caBundle is set",
    )
    discovery.add_arguments(parser)
    dashboard.add_arguments(parser)
    return parser


def load_mesh_config(path: Path | None) -> InjectorConfig:
    if path is None:
        return InjectorConfig()
    try:
        return load_injector_config(path)
    except ConfigError as exc:
        raise ControllerError(f"--mesh-config {exc}") from exc


def in_cluster() -> bool:
    return "KUBERNETES_SERVICE_HOST" in os.environ


def _cluster_serving_cert(args: argparse.Namespace) -> webhook_tls.ServingCert:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()  # --kubernetes from outside the cluster
        except (config.ConfigException, OSError) as exc:
            raise ControllerError(f"no Kubernetes API configuration: {exc}") from exc
    names = webhook_tls.service_dns_names(args.webhook_service, args.namespace)
    return webhook_tls.ensure_serving_cert(client.CoreV1Api(), args.namespace, names)


def _keep_ca_bundle(ca_pem: bytes, name: str, stop: threading.Event) -> None:
    """Publish the CA now and again every minute: a re-applied manifest or a
    webhook configuration created after the controller would otherwise lack it."""
    from kubernetes import client

    api = client.AdmissionregistrationV1Api()
    while True:
        try:
            if patched := webhook_tls.patch_ca_bundle(api, ca_pem, name):
                log.info("set caBundle of %d webhooks in %s", patched, name)
        except webhook_tls.WebhookTLSError as exc:
            log.warning("caBundle not published yet: %s", exc)
        if stop.wait(CA_BUNDLE_RESYNC_SECONDS):
            return


def webhook_tls_files(args: argparse.Namespace, stop: threading.Event) -> tuple[str, str]:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ControllerError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None:
        for path in (args.tls_cert, args.tls_key):
            if not path.is_file():
                raise ControllerError(f"{path}: no such file")
        return str(args.tls_cert), str(args.tls_key)
    if not args.kubernetes:
        raise ControllerError(
            "no --tls-cert/--tls-key given and not in a cluster: "
            "give a certificate, or run in Kubernetes (--kubernetes) to get a self-signed one"
        )
    try:
        cert = _cluster_serving_cert(args)
    except webhook_tls.WebhookTLSError as exc:
        raise ControllerError(str(exc)) from exc
    threading.Thread(
        target=_keep_ca_bundle,
        args=(cert.ca_pem, args.webhook_configuration, stop),
        name="ca-bundle",
        daemon=True,
    ).start()
    return (
        webhook_tls.memory_file("tls.crt", cert.cert_pem),
        webhook_tls.memory_file("tls.key", cert.key_pem),
    )


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # `serve_all` owns the signals so one SIGTERM stops every listener.
        yield


def build_servers(args: argparse.Namespace, stop: threading.Event) -> list[uvicorn.Server]:
    servers: list[uvicorn.Server] = []
    if not args.no_webhook:
        config = load_mesh_config(args.mesh_config)
        cert, key = webhook_tls_files(args, stop)
        host, port = args.webhook_listen
        servers.append(
            _Server(
                uvicorn.Config(
                    create_app(config),
                    host=host,
                    port=port,
                    ssl_certfile=cert,
                    ssl_keyfile=key,
                    loop="uvloop",
                    http="httptools",
                    lifespan="off",
                    access_log=False,
                    log_config=None,
                    timeout_keep_alive=30,
                    backlog=1024,
                )
            )
        )
    try:
        servers.extend(discovery.build_servers(args, _Server))
        servers.extend(dashboard.build_servers(args, servers, _Server))
    except (ValueError, OSError) as exc:
        raise ControllerError(str(exc)) from exc
    return servers


async def serve_all(servers: Sequence[uvicorn.Server]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(server.serve() for server in servers))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()
    try:
        servers = build_servers(args, stop)
    except ControllerError as exc:
        print(f"synchro-controller: {exc}", file=sys.stderr)
        return 2
    if not servers:
        print("synchro-controller: nothing to serve", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.run(serve_all(servers))
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
