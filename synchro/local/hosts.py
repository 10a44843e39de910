"""Name resolution for local Pods: a hosts file per Pod.

Kubernetes gives each Pod cluster DNS; locally each Pod gets
`/etc/netns/<pod-netns>/hosts`, which `ip netns exec` (and therefore every
process `synchro.local` starts in the Pod) sees as `/etc/hosts`. It maps

- every Service to its ClusterIP as `name.ns`, `name.ns.svc` and
  `name.ns.svc.cluster.local`, and Services of the Pod's own namespace also
  as plain `name` (what the DNS search path does in a cluster);
- a headless Service to the IPs of its ready Pods, and a StatefulSet Pod
  (`hostname` + `subdomain`) to its own IP as `pod.svc.ns.svc.cluster.local`
  and the shorter forms the search path completes (`pod.svc.ns`, and
  `pod.svc` in its own namespace);
- the Pod's own hostname to its IP.

A `resolv.conf` next to it points at 127.0.0.1, where nothing answers DNS, so a
name that is not in the hosts file fails at once instead of timing out
against the host's resolver, which a Pod cannot reach.

`render` is pure; `write` replaces a file's content in place, because a running
process sees the file through a bind mount of the old inode, and a new file
renamed over it would stay invisible to the Pods already running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ETC_NETNS = Path("/etc/netns")
CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class ServiceAddress:
    """A Service and the addresses its name resolves to."""

    namespace: str
    name: str
    ips: tuple[str, ...]


@dataclass(frozen=True)
class PodAddress:
    """A Pod with a stable DNS name (StatefulSet: hostname + subdomain)."""

    namespace: str
    hostname: str
    subdomain: str
    ip: str


def service_names(
    namespace: str, name: str, own_namespace: str, domain: str = CLUSTER_DOMAIN
) -> list[str]:
    names = [f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.{domain}"]
    if namespace == own_namespace:
        names.insert(0, name)
    return names


def render(
    *,
    namespace: str,
    pod: str,
    ip: str,
    services: Iterable[ServiceAddress],
    pods: Iterable[PodAddress] = (),
    hostname: str | None = None,
    subdomain: str | None = None,
    domain: str = CLUSTER_DOMAIN,
) -> str:
    """The hosts file of Pod `namespace/pod` (pure)."""
    own = [hostname or pod]
    if subdomain:
        own.extend(service_names(namespace, f"{hostname or pod}.{subdomain}", namespace, domain))
    lines = [
        f"# synchro up: hosts of Pod {namespace}/{pod}; rewritten when Services change",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{ip}\t{' '.join(own)}",
    ]
    for svc in sorted(services, key=lambda s: (s.namespace != namespace, s.namespace, s.name)):
        names = " ".join(service_names(svc.namespace, svc.name, namespace, domain))
        lines.extend(f"{addr}\t{names}" for addr in svc.ips)
    for p in sorted(pods, key=lambda p: (p.namespace, p.subdomain, p.hostname)):
        if p.ip == ip and p.namespace == namespace and p.hostname == (hostname or pod):
            continue  # already on its own line
        # Every form the DNS search path completes, as for Services.
        forms = service_names(p.namespace, f"{p.hostname}.{p.subdomain}", namespace, domain)
        lines.append(f"{p.ip}\t{' '.join(forms)}")
    return "\n".join(lines) + "\n"


def render_resolv(namespace: str, domain: str = CLUSTER_DOMAIN) -> str:
    return (
        "# synchro up: no DNS server; Service names are in /etc/hosts\n"
        "nameserver 127.0.0.1\n"
        f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
        "options timeout:1 attempts:1\n"
    )


def _write_in_place(path: Path, text: str) -> bool:
    data = text.encode()
    try:
        with open(path, "r+b") as f:
            if f.read() == data:
                return False
            f.seek(0)
            f.write(data)
            f.truncate()
        return True
    except FileNotFoundError:
        path.write_bytes(data)
        path.chmod(0o644)
        return True


def write(netns: str, hosts: str, resolv: str | None = None, *, root: Path = ETC_NETNS) -> bool:
    """Install the files of one Pod's namespace; True when anything changed."""
    directory = root / netns
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    changed = _write_in_place(directory / "hosts", hosts)
    if resolv is not None:
        changed = _write_in_place(directory / "resolv.conf", resolv) or changed
    return changed


def remove(netns: str, *, root: Path = ETC_NETNS) -> None:
    shutil.rmtree(root / netns, ignore_errors=True)


def remove_prefix(prefix: str, *, root: Path = ETC_NETNS) -> list[str]:
    """Remove the files of every namespace named `<prefix>-*`; returns their names."""
    removed: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(root)):
            if entry.startswith(prefix + "-"):
                shutil.rmtree(root / entry, ignore_errors=True)
                removed.append(entry)
    return removed


def existing(prefix: str, *, root: Path = ETC_NETNS) -> Sequence[str]:
    try:
        return sorted(e for e in os.listdir(root) if e.startswith(prefix + "-"))
    except FileNotFoundError:
        return []
