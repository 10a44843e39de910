"""Reading the controller API from the CLI, wherever the controller runs.

- `--controller URL` (default `$SYNCHRO_CONTROLLER`): a reachable API, e.g. a
  `kubectl -n synchro-system port-forward svc/synchro-controller 15012` or a
  test's controller; verified with `--cacert FILE` (default
  `$SYNCHRO_CONTROLLER_CA`; `--ca` is an old spelling), or not at all with
  `--insecure`.
- otherwise a local mesh (`--mesh NAME`, default `$SYNCHRO_MESH` or the only
  one up): its controller lives in the mesh's node network namespace, so the
  request is made from a socket opened there (root, as for `synchro exec`).

Commands add the flags with `add_controller_flags` and get a client with
`client_from_args`; `client.get(path)` returns the decoded JSON or raises
`CommandError` with the controller's own error message.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

from synchro.commands import CommandError


class ControllerClient(Protocol):
    @property
    def where(self) -> str: ...

    def get(self, path: str) -> Any: ...


def _decode(where: str, path: str, status: int, raw: bytes) -> Any:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if status >= 400:
        detail = data.get("error") or data.get("detail") if isinstance(data, dict) else None
        detail = detail or raw[:200].decode(errors="replace") or f"HTTP {status}"
        raise CommandError(f"{where}{path}: {detail} (HTTP {status})")
    if data is None:
        raise CommandError(f"{where}{path}: the answer is not JSON")
    return data


@dataclass(frozen=True)
class UrlClient:
    url: str
    cacert: str | None = None
    insecure: bool = False
    timeout: float = 10.0

    @property
    def where(self) -> str:
        return self.url

    def _context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        ctx = ssl.create_default_context(cafile=self.cacert) if self.cacert else None
        ctx = ctx or ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(
                self.url + path, context=self._context(), timeout=self.timeout
            ) as resp:
                return _decode(self.url, path, resp.status, resp.read())
        except urllib.error.HTTPError as e:
            return _decode(self.url, path, e.code, e.read())
        except (urllib.error.URLError, OSError) as e:
            raise CommandError(f"cannot reach the controller at {self.url}: {e}") from None


@dataclass(frozen=True)
class MeshClient:
    """The controller of a local mesh, reached from inside its node namespace."""

    mesh: str
    netns: str
    host: str
    port: int
    cacert: str
    timeout: float = 10.0

    @property
    def where(self) -> str:
        return f"https://{self.host}:{self.port} (mesh {self.mesh})"

    def get(self, path: str) -> Any:
        from synchro.local import mesh as local_mesh
        from synchro.local.netns import LocalError

        ctx = ssl.create_default_context(cafile=self.cacert or None)
        try:
            status, raw = local_mesh.netns_request(
                self.netns, "GET", self.host, self.port, path, context=ctx, timeout=self.timeout
            )
        except (LocalError, OSError) as e:
            raise CommandError(f"cannot reach the controller of mesh {self.mesh}: {e}") from None
        return _decode(self.where, path, status, raw)


def normalize_url(text: str) -> str:
    url = text.rstrip("/")
    return url if "://" in url else "https://" + url


def mesh_client(name: str | None) -> MeshClient:
    from synchro.local import mesh as local_mesh

    try:
        paths = local_mesh.resolve_mesh(name)
        info = local_mesh.read_info(paths)
    except local_mesh.MeshError as e:
        raise CommandError(f"{e} (or give --controller URL)") from None
    ctrl = info.get("controller") or {}
    host, _, port = str(ctrl.get("api") or "").rpartition(":")
    if not host or not port.isdigit() or not info.get("node_netns"):
        raise CommandError(f"mesh {paths.name}: the controller's address is not recorded yet")
    if os.geteuid() != 0:
        raise CommandError(
            f"mesh {paths.name}: its controller lives in the mesh's network namespace; "
            "reading it needs root (sudo), or give --controller URL"
        )
    return MeshClient(paths.name, str(info["node_netns"]), host, int(port), str(ctrl.get("ca", "")))


def add_controller_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("controller")
    group.add_argument(
        "--controller",
        default=os.environ.get("SYNCHRO_CONTROLLER"),
        metavar="URL",
        help="controller API, e.g. https://127.0.0.1:15012 (default: $SYNCHRO_CONTROLLER, "
        "else the local mesh's)",
    )
    group.add_argument(
        "--cacert",
        default=os.environ.get("SYNCHRO_CONTROLLER_CA"),
        metavar="FILE",
        help="CA of the controller's certificate (default: $SYNCHRO_CONTROLLER_CA)",
    )
    # `--ca`: what `synchro top` called it once; kept working, not advertised.
    group.add_argument("--ca", dest="cacert", metavar="FILE", help=argparse.SUPPRESS)
    group.add_argument(
        "--insecure", action="store_true", help="do not verify the controller's certificate"
    )
    group.add_argument(
        "--mesh",
        default=os.environ.get("SYNCHRO_MESH"),
        metavar="NAME",
        help="local mesh whose controller to ask (default: $SYNCHRO_MESH, else the only one up)",
    )


def client_from_args(args: argparse.Namespace) -> ControllerClient:
    if getattr(args, "controller", None):
        return UrlClient(normalize_url(args.controller), args.cacert, args.insecure)
    return mesh_client(getattr(args, "mesh", None))
