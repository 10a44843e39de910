"""`synchro inject` and `synchro uninject`: the webhook's core, offline.

YAML in (a file or `-`), YAML out on stdout, like `linkerd inject` and
`istioctl kube-inject`. Pods and the Pod templates of Deployment, StatefulSet,
DaemonSet, ReplicaSet, ReplicationController, Job and CronJob are changed,
`List` items are walked, every other document passes through untouched.
What happened to each workload goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synchro.commands import CommandError
from webhook.config import ConfigError, InjectorConfig
from webhook.config import load as load_config
from webhook.inject import InjectionError, Skip, apply, is_injected, patch, plan, uninject_pod

TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass
class Report:
    """What happened, one line per workload, for stderr."""

    lines: list[str] = field(default_factory=list)


# Turns one Pod (or Pod template) into its new form; `where` names it in messages.
PodFn = Callable[[dict[str, Any], str, str, Report], dict[str, Any]]


def _describe(doc: dict[str, Any], where: str) -> str:
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    name = metadata.get("name") or metadata.get("generateName") or "<unnamed>"
    return f"{where} ({doc.get('kind')} {name})"


def _field(template_path: tuple[str, ...], name: str) -> str:
    # Annotation keys stay as they are; Pod fields get the template's path.
    if "/" in name or not template_path:
        return name
    return ".".join((*template_path, name))


def inject_one(
    config: InjectorConfig,
) -> PodFn:
    def run(pod: dict[str, Any], namespace: str, where: str, report: Report) -> dict[str, Any]:
        decision = plan(pod, namespace, config)
        if isinstance(decision, Skip):
            report.lines.append(f"{where}: skipped: {decision.reason}")
            return pod
        for warning in decision.warnings:
            report.lines.append(f"{where}: warning: {warning}")
        report.lines.append(f"{where}: injected")
        return apply(pod, patch(pod, decision))

    return run


def uninject_one(pod: dict[str, Any], namespace: str, where: str, report: Report) -> dict[str, Any]:
    if not is_injected(pod):
        report.lines.append(f"{where}: not injected")
        return pod
    report.lines.append(f"{where}: uninjected")
    return uninject_pod(pod)


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def transform(doc: Any, fn: PodFn, default_namespace: str, where: str, report: Report) -> Any:
    """`doc` with its Pod or Pod template run through `fn`; other kinds unchanged."""
    if not isinstance(doc, dict):
        return doc
    kind = doc.get("kind")
    if kind == "List":
        items = doc.get("items")
        if not isinstance(items, list):
            return doc
        new_items = [
            transform(item, fn, default_namespace, f"{where} items[{i}]", report)
            for i, item in enumerate(items)
        ]
        return {**doc, "items": new_items}
    path: tuple[str, ...]
    if kind == "Pod":
        path = ()
    elif isinstance(kind, str) and kind in TEMPLATE_PATHS:
        path = TEMPLATE_PATHS[kind]
    else:
        return doc
    metadata = doc.get("metadata")
    namespace = (metadata.get("namespace") if isinstance(metadata, dict) else None) or (
        default_namespace
    )
    label = _describe(doc, where)
    pod = _get(doc, path) if path else doc
    if not isinstance(pod, dict):
        raise CommandError(f"{label}: {'.'.join(path)}: missing; expected a Pod template")
    try:
        new_pod = fn(pod, str(namespace), label, report)
    except InjectionError as exc:
        raise CommandError(
            f"{label}: {_field(path, exc.annotation)}: {exc.value!r} is not valid; "
            f"expected {exc.accepted}"
        ) from None
    return _replace(doc, path, new_pod)


def _replace(doc: dict[str, Any], path: tuple[str, ...], value: dict[str, Any]) -> dict[str, Any]:
    if not path:
        return value
    # Rebuild along the path only: siblings keep their identity and key order.
    head, *rest = path
    return {**doc, head: _replace(doc[head], tuple(rest), value)}


def read_documents(source: str) -> Iterator[tuple[int, Any]]:
    text = _read(source)
    try:
        yield from enumerate(yaml.safe_load_all(text), start=1)
    except yaml.YAMLError as exc:
        raise CommandError(f"{_name(source)}: not valid YAML: {exc}") from None


def _name(source: str) -> str:
    return "<stdin>" if source == "-" else source


def _read(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{source}: {exc}") from None


def dump(docs: list[Any]) -> str:
    return yaml.safe_dump_all(
        docs, sort_keys=False, default_flow_style=False, explicit_start=True, width=10_000
    )


def run_documents(source: str, fn: PodFn, namespace: str, quiet: bool) -> int:
    report = Report()
    out: list[Any] = []
    for index, doc in read_documents(source):
        if doc is None:
            continue  # an empty document, e.g. a trailing `---`
        out.append(transform(doc, fn, namespace, f"{_name(source)}: document {index}", report))
    sys.stdout.write(dump(out) if out else "")
    if not quiet:
        for line in report.lines:
            print(line, file=sys.stderr)
    return 0


def _config(args: argparse.Namespace) -> InjectorConfig:
    if args.mesh_config is None:
        return InjectorConfig()
    try:
        return load_config(args.mesh_config)
    except ConfigError as exc:
        raise CommandError(f"--mesh-config {exc}") from None


def cmd_inject(args: argparse.Namespace) -> int:
    return run_documents(args.filename, inject_one(_config(args)), args.namespace, args.quiet)


def cmd_uninject(args: argparse.Namespace) -> int:
    return run_documents(args.filename, uninject_one, args.namespace, args.quiet)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="YAML file, or - for stdin"
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default="default",
        help="namespace of documents that name none (default: default)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-workload report")


def register(subparsers: Any) -> None:
    inject = subparsers.add_parser(
        "inject",
        help="add the Synchro proxy to Pods and workloads in YAML",
        description="Inject the init container and proxy sidecar, as the webhook would, "
        "into the Pods and Pod templates of FILE; write the YAML to stdout.",
        epilog="examples:\n  synchro inject -f app.yaml | kubectl apply -f -\n"
        "  kubectl get deploy web -o yaml | synchro inject -f - | kubectl apply -f -\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(inject)
    inject.add_argument(
        "--mesh-config",
        type=Path,
        metavar="PATH",
        help="ConfigMap synchro-config (file, manifest or mounted directory) for the defaults",
    )
    inject.set_defaults(func=cmd_inject)
    uninject = subparsers.add_parser(
        "uninject",
        help="remove what `synchro inject` or the webhook added",
        description="Remove the injected containers, volumes and annotations from the "
        "Pods and Pod templates of FILE, restoring the rewritten probes; YAML to stdout.",
        epilog="examples:\n  kubectl get deploy web -o yaml | synchro uninject -f - | kubectl apply -f -\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(uninject)
    uninject.set_defaults(func=cmd_uninject)
