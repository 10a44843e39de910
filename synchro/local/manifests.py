"""What `synchro up DIR` runs: the YAML in DIR expanded into Pods, Services and Namespaces.

`read_dir(DIR)` reads every YAML/JSON document (the same files the controller's
FileSource reads: recursive, sorted, hidden entries skipped); `expand(docs)` is
pure and turns them into what a local node runs:

- bare Pods as written; Deployments, ReplicaSets and ReplicationControllers as
  `replicas` Pods with stable names `<name>-<n>` (n from 0), so that `synchro
  exec shop/frontend-0` keeps meaning the same Pod across runs; StatefulSets
  as `<name>-<n>` with `hostname`/`subdomain` set as the StatefulSet
  controller does; DaemonSets as one Pod `<name>-0` (there is one node); Jobs
  as `parallelism` Pods `<name>-<n>`. CronJobs are not run (nothing schedules
  them locally) and say so in `skipped`.
- Services with their selector and ports (ClusterIPs are the controller's to
  allocate; an explicit `clusterIP` is kept);
- Namespaces with their labels: every namespace is meshed unless a Namespace
  object labels it `synchro.dev/inject=disabled`.

Errors name the file, the document and the field (`ManifestError`). Documents
of kinds the local runtime does not run (routes, policies, ConfigMaps ...) are
the controller's business and pass through untouched.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

SUFFIXES = (".yaml", ".yml", ".json")
INJECT = "synchro.dev/inject"
MESH_CONFIG_NAME = "synchro-config"
DEFAULT_NAMESPACE = "default"
# Longest name of a Pod's network namespace suffix (synchro.local.netns limits it).
MAX_KEY = 40

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_KEY_OK = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")

REPLICATED = ("Deployment", "ReplicaSet", "ReplicationController")
WORKLOADS = (*REPLICATED, "StatefulSet", "DaemonSet", "Job", "Pod")


class ManifestError(ValueError):
    """A manifest the local runtime cannot run; the message names where and why."""


@dataclass(frozen=True)
class Document:
    """One YAML document and where it came from (for error messages)."""

    body: Any
    origin: str
    index: int

    @property
    def where(self) -> str:
        return f"{self.origin}: document {self.index + 1}"


@dataclass(frozen=True)
class PodSpec:
    """One Pod to run: its manifest as the API server would admit it."""

    namespace: str
    name: str
    manifest: Mapping[str, Any]
    owner: str  # e.g. "Deployment/frontend"; "Pod/x" for a bare Pod
    where: str
    job: bool = False
    # configMap and secret volumes: volume name -> file name -> content
    volume_files: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def labels(self) -> Mapping[str, str]:
        return (self.manifest.get("metadata") or {}).get("labels") or {}

    @property
    def annotations(self) -> Mapping[str, str]:
        return (self.manifest.get("metadata") or {}).get("annotations") or {}

    @property
    def service_account(self) -> str:
        spec = self.manifest.get("spec") or {}
        return str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")

    @property
    def digest(self) -> str:
        """Changes exactly when the Pod would be replaced (a new template, or new
        contents of the ConfigMaps and Secrets it reads)."""
        both = [self.manifest, self.volume_files]
        text = json.dumps(both, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class ServiceSpec:
    namespace: str
    name: str
    selector: Mapping[str, str] | None
    ports: tuple[ServicePort, ...]
    cluster_ip: str | None = None  # written in the manifest; else the controller allocates
    headless: bool = False
    type: str = "ClusterIP"
    where: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Manifests:
    pods: tuple[PodSpec, ...] = ()
    services: tuple[ServiceSpec, ...] = ()
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    mesh_config: Mapping[str, Any] | None = None  # data of ConfigMap synchro-config
    skipped: tuple[str, ...] = ()  # what is not run locally, and why

    def namespaces(self) -> list[str]:
        names = set(self.namespace_labels)
        names.update(p.namespace for p in self.pods)
        names.update(s.namespace for s in self.services)
        return sorted(names)

    def meshed_namespace(self, namespace: str) -> bool:
        """Meshed unless its Namespace object says `synchro.dev/inject=disabled`."""
        value = str((self.namespace_labels.get(namespace) or {}).get(INJECT, "")).lower()
        return value != "disabled"

    def sends_to_webhook(self, pod: PodSpec) -> bool:
        """Whether the webhook sees the Pod (what the webhook configuration's
        namespace and object selectors decide in a cluster); the webhook itself
        then honours a Pod's own opt-out."""
        if self.meshed_namespace(pod.namespace):
            return True
        opt_in = pod.labels.get(INJECT) or pod.annotations.get(INJECT)
        return str(opt_in).lower() == "enabled"

    def pod(self, ref: str) -> PodSpec | None:
        for p in self.pods:
            if p.ref == ref:
                return p
        return None


# --- reading -----------------------------------------------------------------------


def manifest_paths(directory: Path) -> list[Path]:
    """The files the controller's FileSource reads too (so both see the same set)."""
    if directory.is_file():
        return [directory]
    out: list[Path] = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(
            Path(root) / f for f in sorted(files) if not f.startswith(".") and f.endswith(SUFFIXES)
        )
    return out


def signature(directory: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when any manifest file does (path, mtime, size, inode)."""
    out = []
    for path in manifest_paths(directory):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def parse_text(text: str, origin: str) -> list[Document]:
    docs: list[Document] = []
    index = 0
    try:
        for body in yaml.safe_load_all(text):
            if body is not None:
                docs.append(Document(body, origin, index))
            index += 1
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(
            f"{origin}: document {index + 1}: invalid YAML{where}: {problem}"
        ) from None
    return docs


def read_dir(directory: Path) -> list[Document]:
    if not directory.exists():
        raise ManifestError(f"{directory}: no such file or directory")
    paths = manifest_paths(directory)
    if not paths:
        raise ManifestError(f"{directory}: no .yaml, .yml or .json files")
    docs: list[Document] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: cannot read: {exc}") from None
        docs.extend(parse_text(text, str(path)))
    return docs


def load(directory: Path) -> Manifests:
    return expand(read_dir(directory))


# --- expanding -------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where}: expected an object")
    return value


def _str_map(value: Any, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in _mapping(value, where).items():
        if not isinstance(k, str) or isinstance(v, Mapping | list):
            raise ManifestError(f"{where}: expected string keys and values")
        out[k] = "true" if v is True else "false" if v is False else str(v)
    return out


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise ManifestError(
            f"{where}: {value!r} is not a valid name (lowercase letters, digits and '-', "
            "at most 63, starting and ending with a letter or digit)"
        )
    return value


def _count(value: Any, where: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(f"{where}: {value!r} is not a non-negative integer")
    return value


def _unlist(docs: Iterable[Document]) -> Iterable[Document]:
    for doc in docs:
        body = doc.body
        if isinstance(body, Mapping) and body.get("kind") == "List":
            for item in body.get("items") or []:
                yield Document(item, doc.origin, doc.index)
        else:
            yield doc


def _pod(
    namespace: str,
    name: str,
    template: Mapping[str, Any],
    label: str,
    path: str = "",
    *,
    extra_labels: Mapping[str, str] | None = None,
    spec_fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    where = f"{label}: {path}"
    meta = _mapping(template.get("metadata"), f"{where}metadata")
    spec = _mapping(template.get("spec"), f"{where}spec")
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise ManifestError(f"{where}spec.containers: expected a non-empty list")
    labels = _str_map(meta.get("labels"), f"{where}metadata.labels")
    labels.update(extra_labels or {})
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    annotations = _str_map(meta.get("annotations"), f"{where}metadata.annotations")
    if annotations:
        metadata["annotations"] = annotations
    new_spec = copy.deepcopy(dict(spec))
    new_spec.update(spec_fields or {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": new_spec}


def _workload_pods(doc: Document, kind: str) -> list[PodSpec]:
    body = doc.body
    where = doc.where
    meta = _mapping(body.get("metadata"), f"{where}: metadata")
    name = _name(meta.get("name"), f"{where}: metadata.name")
    namespace = _name(meta.get("namespace") or DEFAULT_NAMESPACE, f"{where}: metadata.namespace")
    label = f"{where} ({kind} {namespace}/{name})"
    if kind == "Pod":
        manifest = _pod(namespace, name, body, label)
        return [PodSpec(namespace, name, manifest, f"Pod/{name}", label)]
    spec = _mapping(body.get("spec"), f"{label}: spec")
    template = _mapping(spec.get("template"), f"{label}: spec.template")
    if not template:
        raise ManifestError(f"{label}: spec.template: missing; expected a Pod template")
    tpath = "spec.template."
    owner = f"{kind}/{name}"
    out: list[PodSpec] = []
    if kind in REPLICATED:
        for n in range(_count(spec.get("replicas"), f"{label}: spec.replicas", 1)):
            pod = _pod(namespace, f"{name}-{n}", template, label, tpath)
            out.append(PodSpec(namespace, f"{name}-{n}", pod, owner, label))
    elif kind == "StatefulSet":
        service = spec.get("serviceName")
        for n in range(_count(spec.get("replicas"), f"{label}: spec.replicas", 1)):
            pod_name = f"{name}-{n}"
            fields: dict[str, Any] = {"hostname": pod_name}
            if isinstance(service, str) and service:
                fields["subdomain"] = service
            pod = _pod(
                namespace,
                pod_name,
                template,
                label,
                tpath,
                extra_labels={
                    "statefulset.kubernetes.io/pod-name": pod_name,
                    "apps.kubernetes.io/pod-index": str(n),
                },
                spec_fields=fields,
            )
            out.append(PodSpec(namespace, pod_name, pod, owner, label))
    elif kind == "DaemonSet":
        pod = _pod(namespace, f"{name}-0", template, label, tpath)
        out.append(PodSpec(namespace, f"{name}-0", pod, owner, label))
    elif kind == "Job":
        parallelism = _count(spec.get("parallelism"), f"{label}: spec.parallelism", 1)
        completions = _count(spec.get("completions"), f"{label}: spec.completions", parallelism)
        job_labels = {"job-name": name, "batch.kubernetes.io/job-name": name}
        for n in range(min(parallelism, completions)):
            pod = _pod(namespace, f"{name}-{n}", template, label, tpath, extra_labels=job_labels)
            out.append(PodSpec(namespace, f"{name}-{n}", pod, owner, label, job=True))
    return out


def _service(doc: Document) -> ServiceSpec:
    body = doc.body
    where = doc.where
    meta = _mapping(body.get("metadata"), f"{where}: metadata")
    name = _name(meta.get("name"), f"{where}: metadata.name")
    namespace = _name(meta.get("namespace") or DEFAULT_NAMESPACE, f"{where}: metadata.namespace")
    label = f"{where} (Service {namespace}/{name})"
    spec = _mapping(body.get("spec"), f"{label}: spec")
    selector = spec.get("selector")
    sel = _str_map(selector, f"{label}: spec.selector") if selector is not None else None
    ports: list[ServicePort] = []
    for i, item in enumerate(spec.get("ports") or []):
        here = f"{label}: spec.ports[{i}]"
        item = _mapping(item, here)
        port = item.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ManifestError(f"{here}.port: {port!r} is not a port number")
        target = item.get("targetPort", port)
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if not isinstance(target, int | str) or isinstance(target, bool):
            raise ManifestError(f"{here}.targetPort: {target!r} is not a port number or name")
        ports.append(
            ServicePort(port, target, str(item.get("name") or ""), str(item.get("protocol", "TCP")))
        )
    cluster_ip = spec.get("clusterIP")
    headless = cluster_ip == "None"
    return ServiceSpec(
        namespace,
        name,
        sel,
        tuple(ports),
        cluster_ip if isinstance(cluster_ip, str) and cluster_ip and not headless else None,
        headless,
        str(spec.get("type") or "ClusterIP"),
        label,
    )


def expand(docs: Sequence[Document]) -> Manifests:
    """Documents -> what the node runs (pure). Raises ManifestError naming the document."""
    pods: list[PodSpec] = []
    services: list[ServiceSpec] = []
    namespaces: dict[str, dict[str, str]] = {}
    mesh_config: Mapping[str, Any] | None = None
    skipped: list[str] = []
    data = _config_data(docs)
    for doc in _unlist(docs):
        body = doc.body
        if not isinstance(body, Mapping):
            raise ManifestError(f"{doc.where}: expected a Kubernetes object (a mapping)")
        kind = body.get("kind")
        if kind in WORKLOADS:
            pods.extend(_workload_pods(doc, str(kind)))
        elif kind == "Service":
            services.append(_service(doc))
        elif kind == "Namespace":
            meta = _mapping(body.get("metadata"), f"{doc.where}: metadata")
            name = _name(meta.get("name"), f"{doc.where}: metadata.name")
            namespaces[name] = _str_map(meta.get("labels"), f"{doc.where}: metadata.labels")
        elif kind == "ConfigMap":
            meta = _mapping(body.get("metadata"), f"{doc.where}: metadata")
            if meta.get("name") == MESH_CONFIG_NAME:
                mesh_config = dict(_mapping(body.get("data"), f"{doc.where}: data"))
        elif kind == "CronJob":
            cron = (body.get("metadata") or {}).get("name")
            skipped.append(f"{doc.where}: CronJob {cron}: not run locally (nothing schedules it)")
    _check_unique(pods, lambda p: p.ref, "Pod")
    _check_unique(services, lambda s: s.ref, "Service")
    pods = [_resolve_config(p, data) for p in pods]
    return Manifests(tuple(pods), tuple(services), namespaces, mesh_config, tuple(skipped))


# --- ConfigMaps and Secrets ------------------------------------------------------------

# (kind, namespace, name) -> key -> value
ConfigData = Mapping[tuple[str, str, str], Mapping[str, str]]


def _config_data(docs: Sequence[Document]) -> ConfigData:
    out: dict[tuple[str, str, str], dict[str, str]] = {}
    for doc in _unlist(docs):
        body = doc.body
        if not isinstance(body, Mapping) or body.get("kind") not in ("ConfigMap", "Secret"):
            continue
        meta = _mapping(body.get("metadata"), f"{doc.where}: metadata")
        name = meta.get("name")
        if not isinstance(name, str):
            continue
        ns = str(meta.get("namespace") or DEFAULT_NAMESPACE)
        values = _str_map(body.get("data"), f"{doc.where}: data")
        if body["kind"] == "Secret":
            decoded = {}
            for k, v in values.items():
                try:
                    decoded[k] = base64.b64decode(v, validate=True).decode()
                except (ValueError, UnicodeDecodeError):
                    raise ManifestError(
                        f"{doc.where}: data.{k}: not base64 of UTF-8 text"
                    ) from None
            values = {**decoded, **_str_map(body.get("stringData"), f"{doc.where}: stringData")}
        out[(str(body["kind"]), ns, name)] = values
    return out


_REFS = {"configMapKeyRef": "ConfigMap", "secretKeyRef": "Secret"}
_FROM = {"configMapRef": "ConfigMap", "secretRef": "Secret"}


def _lookup(
    data: ConfigData, kind: str, ns: str, ref: Mapping[str, Any], where: str
) -> Mapping[str, str] | None:
    name = ref.get("name")
    values = data.get((kind, ns, str(name)))
    if values is None and not ref.get("optional"):
        raise ManifestError(f"{where}: {kind} {ns}/{name} is not in the directory")
    return values


def _resolve_env(container: dict[str, Any], ns: str, data: ConfigData, where: str) -> None:
    env: list[Any] = []
    for i, source in enumerate(container.pop("envFrom", None) or []):
        here = f"{where}.envFrom[{i}]"
        for key, kind in _FROM.items():
            ref = (source or {}).get(key)
            if isinstance(ref, Mapping):
                values = _lookup(data, kind, ns, ref, f"{here}.{key}") or {}
                prefix = str(source.get("prefix") or "")
                env.extend({"name": prefix + k, "value": v} for k, v in sorted(values.items()))
    for i, item in enumerate(container.get("env") or []):
        resolved = _env_value(item, ns, data, f"{where}.env[{i}]")
        if resolved is not None:
            env.append(resolved)
    if env or "env" in container:
        container["env"] = env


def _env_value(item: Any, ns: str, data: ConfigData, where: str) -> Any:
    """One `env` entry with a ConfigMap or Secret reference replaced by its value
    (None: an optional reference that is missing, so the variable is unset)."""
    value_from = item.get("valueFrom") if isinstance(item, Mapping) else None
    if not isinstance(value_from, Mapping):
        return item
    for key, kind in _REFS.items():
        ref = value_from.get(key)
        if not isinstance(ref, Mapping):
            continue
        here = f"{where}.valueFrom.{key}"
        found = _lookup(data, kind, ns, ref, here)
        if found is not None and ref.get("key") in found:
            return {"name": item.get("name"), "value": found[ref["key"]]}
        if ref.get("optional"):
            return None
        raise ManifestError(f"{here}: no key {ref.get('key')!r} in {kind} {ns}/{ref.get('name')}")
    return item


def _volume_contents(
    volume: Mapping[str, Any], ns: str, data: ConfigData, where: str
) -> dict[str, str] | None:
    for key, kind, name_key in (
        ("configMap", "ConfigMap", "name"),
        ("secret", "Secret", "secretName"),
    ):
        source = volume.get(key)
        if not isinstance(source, Mapping):
            continue
        ref = {"name": source.get(name_key), "optional": source.get("optional")}
        values = _lookup(data, kind, ns, ref, f"{where}.{key}") or {}
        items = source.get("items")
        if not items:
            return dict(values)
        out = {}
        for item in items:
            if item.get("key") in values:
                out[str(item.get("path") or item["key"])] = values[item["key"]]
        return out
    return None


def _resolve_config(pod: PodSpec, data: ConfigData) -> PodSpec:
    """Env from ConfigMaps and Secrets in DIR written out as values, and their
    volumes' files listed, so the local runtime needs no API server."""
    manifest = copy.deepcopy(dict(pod.manifest))
    spec = manifest.get("spec") or {}
    for key in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(key) or []):
            if isinstance(container, dict):
                _resolve_env(container, pod.namespace, data, f"{pod.where}: spec.{key}[{i}]")
    files: dict[str, dict[str, str]] = {}
    for i, volume in enumerate(spec.get("volumes") or []):
        if isinstance(volume, Mapping):
            contents = _volume_contents(
                volume, pod.namespace, data, f"{pod.where}: spec.volumes[{i}]"
            )
            if contents is not None:
                files[str(volume.get("name"))] = contents
    return replace(pod, manifest=manifest, volume_files=files)


def _check_unique(items: Sequence[Any], key: Any, what: str) -> None:
    seen: dict[str, str] = {}
    for item in items:
        ref = key(item)
        if ref in seen:
            raise ManifestError(
                f"{item.where}: {what} {ref} is defined twice (also in {seen[ref]})"
            )
        seen[ref] = item.where


# --- local names ------------------------------------------------------------------------


def local_key(ref: str, taken: Collection[str] = ()) -> str:
    """A network-namespace-safe name for Pod `ns/name`: `<ns>-<name>`, or, when
    that is too long, not a DNS label or already `taken` by another Pod, a
    shortened form with a hash of the reference. A Pod keeps its key for life,
    so the caller passes the keys in use."""
    key = ref.replace("/", "-")
    if key not in taken and _KEY_OK.match(key):
        return key
    digest = hashlib.sha256(ref.encode()).hexdigest()[:8]
    stem = key[: MAX_KEY - 9].rstrip("-")
    return f"{stem}-{digest}"
