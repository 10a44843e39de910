"""The control plane's manifests (deploy/), wherever synchro is installed.

deploy/ stays the single source of truth. The package reaches it through the
symlink `synchro/_deploy -> ../deploy`: in a checkout or an editable install
the link resolves to the repository's deploy/, and building a wheel copies the
files it points at into the package (pyproject.toml's package-data lists
them), so `importlib.resources` finds them in an installed package too. A
checkout where the link did not survive (a filesystem without symlinks) falls
back to deploy/ next to the package.

deploy/kustomization.yaml is kept to a plain `resources` list, so rendering is
reading those files in order; anything else in it is refused rather than
silently ignored.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
_ALLOWED_KEYS = frozenset({"apiVersion", "kind", "resources"})

Obj = dict[str, Any]


class ManifestsError(Exception):
    """deploy/ is missing or has something this reader cannot render."""


def deploy_dir() -> Traversable:
    packaged = resources.files("synchro") / "_deploy"
    if (packaged / KUSTOMIZATION).is_file():
        return packaged
    source = Path(__file__).resolve().parents[1] / "deploy"
    if (source / KUSTOMIZATION).is_file():
        return source
    raise ManifestsError(
        "the control plane manifests are not installed (no synchro/_deploy/kustomization.yaml "
        "in the package, no deploy/ next to it); reinstall synchro"
    )


def _child(base: Traversable, relative: str) -> Traversable:
    node = base
    for part in Path(relative).parts:
        if part in ("..", "/"):
            raise ManifestsError(f"{relative}: resources must stay inside deploy/")
        node = node / part
    return node


def render(directory: Traversable | None = None) -> list[Obj]:
    """Every object of the kustomization in `directory` (default: deploy/), in order."""
    base = directory if directory is not None else deploy_dir()
    try:
        kust = yaml.safe_load((base / KUSTOMIZATION).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ManifestsError(f"{KUSTOMIZATION}: {e}") from None
    if not isinstance(kust, dict):
        raise ManifestsError(f"{KUSTOMIZATION}: expected a mapping")
    unsupported = sorted(set(kust) - _ALLOWED_KEYS)
    if unsupported:
        raise ManifestsError(
            f"{KUSTOMIZATION} uses {', '.join(unsupported)}; only a plain resources list is read"
        )
    out: list[Obj] = []
    for entry in kust.get("resources") or []:
        if not isinstance(entry, str):
            raise ManifestsError(f"{KUSTOMIZATION}: resource {entry!r} is not a path")
        node = _child(base, entry)
        if node.is_dir():
            out.extend(render(node))
            continue
        try:
            docs = list(yaml.safe_load_all(node.read_text()))
        except (OSError, yaml.YAMLError) as e:
            raise ManifestsError(f"{entry}: {e}") from None
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise ManifestsError(f"{entry}: a document is not a Kubernetes object")
            out.append(doc)
    return out
